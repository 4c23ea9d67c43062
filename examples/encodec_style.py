"""EnCodec-style training: reconstruction losses balanced at the model's output.

A small MLP autoencoder learns to reconstruct synthetic signals (sums of sinusoids with
random frequencies, amplitudes and phases, plus noise) under three losses of very
different scales: L1 and L2 on the waveform, and an L1 distance between the magnitude
spectra (``jnp.fft.rfft``, summed over frequency bins), whose output gradient is
hundreds of times larger than the others'. As in EnCodec, the balancer never looks at parameter
gradients: ``ob.value_and_balanced_grad`` takes each loss's gradient with respect to the
reconstruction ``y_hat`` (cheap: the losses are small functions of ``y_hat``), balances
them with ``ob.balancer(weights, per_batch_item=True)``, and runs ONE backward pass
through the autoencoder with the balanced output gradient; Adam then updates the
parameters.

Every few steps it prints, per loss:

* ``raw``: ``BalancerState.ratios``, each loss's (EMA) share of the output-gradient norm
  without balancing; these are wildly unequal, set by the losses' scales;
* ``balanced``: each loss's share of the balanced output gradient, ``scale_i * ||g_i||``
  over the sum (``||g_i||`` measured at the step's parameters). It is exactly the
  requested ``w_i / sum(w)`` at step 1 (the bias-corrected EMA starts at the first norm)
  and stays within a few hundredths of it as the norms drift during training, whatever
  the losses' scales (the EMA lags the shrinking L2 gradient a little).

Run:  python examples/encodec_style.py              (600 steps, a few seconds on a CPU)
      python examples/encodec_style.py --steps 100  (fast)
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_balance as ob

LENGTH = 128  # samples per signal
BATCH = 32
WEIGHTS = {"l1": 0.2, "l2": 0.3, "spectral": 0.5}  # the requested shares


def make_batch(key, batch=BATCH, length=LENGTH):
    """Sums of three sinusoids, random frequency/amplitude/phase, plus a little noise."""
    kf, ka, kp, kn = jax.random.split(key, 4)
    t = jnp.arange(length) / length
    freqs = jax.random.uniform(kf, (batch, 3, 1), minval=1.0, maxval=20.0)
    amps = jax.random.uniform(ka, (batch, 3, 1), minval=0.1, maxval=1.0)
    phases = jax.random.uniform(kp, (batch, 3, 1), maxval=2 * jnp.pi)
    clean = jnp.sum(amps * jnp.sin(2 * jnp.pi * freqs * t + phases), axis=1)
    return clean + 0.01 * jax.random.normal(kn, (batch, length))


def init_params(key, sizes=(LENGTH, 256, 32, 256, LENGTH)):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (m, n)) / jnp.sqrt(m), "b": jnp.zeros(n)}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:])
    ]


def autoencoder(params, x):
    """The whole model: encoder to a 32-d code, decoder back to the waveform."""
    h = x
    for layer in params[:-1]:
        h = jax.nn.gelu(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]  # y_hat: (BATCH, LENGTH)


def reconstruction_losses(params, y_hat, x):
    """(3,) losses from the reconstruction; they have no parameters of their own."""
    del params
    err = y_hat - x
    l1 = jnp.mean(jnp.abs(err))
    l2 = jnp.mean(err**2)
    mag_err = jnp.abs(jnp.abs(jnp.fft.rfft(y_hat)) - jnp.abs(jnp.fft.rfft(x)))
    spectral = jnp.mean(jnp.sum(mag_err, axis=-1))  # summed over frequency bins
    return jnp.stack([l1, l2, spectral])


def output_grad_norms(params, x):
    """Per loss, the mean over items of ||dL_i/dy_hat[b]||: what the balancer measures."""
    y_hat = autoencoder(params, x)
    _, g = ob.value_and_task_grads(lambda y: reconstruction_losses(None, y, x))(y_hat)
    return jnp.mean(jnp.linalg.norm(g, axis=-1), axis=1)


def main(steps: int = 600, log_every: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Trains and prints the shares; returns the last (balanced shares, raw ratios)."""
    params = init_params(jax.random.key(0))
    # A shorter EMA memory (0.99) than EnCodec's 0.999 so the short run can track the
    # norms as they shrink during training.
    balancer = ob.balancer(WEIGHTS, per_batch_item=True, ema_decay=0.99)
    optimizer = optax.adam(1e-3)
    grad_fn = ob.value_and_balanced_grad(autoencoder, reconstruction_losses, balancer)

    x0 = make_batch(jax.random.key(1))
    bal_state = balancer.init(jax.eval_shape(autoencoder, params, x0))
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, bal_state, x):
        losses, grads, bal_state = grad_fn(params, bal_state, x)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, bal_state, losses

    norms_fn = jax.jit(output_grad_norms)
    target = np.array(list(WEIGHTS.values())) / sum(WEIGHTS.values())
    names = list(WEIGHTS)
    log_every = log_every or max(steps // 8, 1)
    print("requested shares  " + "  ".join(f"{n} {v:.3f}" for n, v in zip(names, target)))
    shares = np.full(len(names), np.nan)
    for step in range(1, steps + 1):
        x = make_batch(jax.random.fold_in(jax.random.key(2), step))
        log = step == 1 or step % log_every == 0 or step == steps
        norms = norms_fn(params, x) if log else None
        params, opt_state, bal_state, losses = train_step(params, opt_state, bal_state, x)
        if log:
            contrib = np.asarray(bal_state.weights * norms)
            shares = contrib / contrib.sum()
            print(
                f"step {step:4d}  losses "
                + " ".join(f"{n} {v:8.4f}" for n, v in zip(names, losses))
                + "\n           raw "
                + " ".join(f"{v:.4f}" for v in bal_state.ratios)
                + "   balanced "
                + " ".join(f"{v:.4f}" for v in shares)
            )
    return shares, np.asarray(bal_state.ratios)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    main(parser.parse_args().steps)
