"""Loss-based methods cost one backward pass: train-step time against the plain summed loss.

One jitted training step (gradient + method + Adam) of an MLP (a 128-512-512 ReLU trunk,
shared, and T linear heads; batch 256: the model of ``benchmarks/run.py``'s train-step
section) for T in {2, 8, 32}:

* ``plain``: the plain sum of the T losses, ``jax.grad`` of ``sum(losses)``;
* every loss-based method, trained the one-backward way: ``jax.grad`` of
  ``ob.weighted_loss(method, losses, opt_state)``, then ``update`` with ``task_losses``
  (it passes the gradient through and advances the method's state);
* a few gradient-based methods, for contrast: the T per-task gradients
  (``ob.value_and_task_grads``: T vectorised backward passes) and the method on them
  (``shared``: the heads are task-specific).

Each method's step is timed interleaved with the plain step, round by round (each sample
averages enough back-to-back calls to last a few ms), so machine load hits both alike.
Two ratios are printed: the median over rounds of the per-round ratio (the target's
figure, as in ``benchmarks/run.py``) and the fastest round over the fastest round. XLA's
cost analysis of both compiled steps (flops, bytes accessed) is printed too: it does not
depend on the machine's load. Target (a benchmark, not a test): every loss-based method
within 1.05x of the plain step at every T.

Run:  python -m benchmarks.loss_cost                 (a few minutes on 2 CPU cores)
      python -m benchmarks.loss_cost --quick         (a smoke run: small model, T=2)
      python -m benchmarks.loss_cost --tasks 8 --methods famo,uw,mgda
``python -m benchmarks.run`` includes it as a section (``BENCH_SECTIONS=loss``).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_balance as ob
from benchmarks.mlp import mlp_losses, mlp_params

TARGET = 1.05
SHARED = {"trunk": True, "heads": False}

# name -> (what it reads, factory of T). Loss-based first, then gradient-based.
LOSS_METHODS: dict[str, Callable[[int], Any]] = {
    "mean": lambda t: ob.mean(num_tasks=t),
    "sum": lambda t: ob.sum(num_tasks=t),
    "constant": lambda t: ob.constant([1.0] * t),
    "rlw": lambda t: ob.rlw(num_tasks=t),
    "uw": lambda t: ob.uw(t),
    "imtl_l": lambda t: ob.imtl_l(t),
    "dwa": lambda t: ob.dwa(num_tasks=t),
    "gls": lambda t: ob.gls(num_tasks=t),
    "famo": lambda t: ob.famo(t),
    "stch": lambda t: ob.stch(mu=0.5, num_tasks=t),
    "cosmos": lambda t: ob.cosmos(lambda_=0.1, weights=[1.0 / t] * t),
    "pbi": lambda t: ob.pbi(theta=1.0, weights=[1.0] * t),
}
GRAD_METHODS: dict[str, tuple[str, Callable[[int], Any]]] = {
    "mgda": ("Gramian", lambda t: ob.mgda(num_tasks=t, shared=SHARED)),
    "upgrad": ("Gramian", lambda t: ob.upgrad(num_tasks=t, shared=SHARED)),
    "balancer": ("gradient norms", lambda t: ob.balancer([1.0] * t, shared=SHARED)),
}


# --------------------------------------------------------------------------------------
# The model and the three kinds of step.
# --------------------------------------------------------------------------------------


def plain_step() -> tuple[Callable[..., Any], optax.GradientTransformation]:
    adam = optax.adam(1e-3)

    def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
        grads = jax.grad(lambda p: jnp.sum(mlp_losses(p, x, y)))(params)
        updates, opt_state = adam.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1)), adam


def loss_step(tx: Any) -> tuple[Callable[..., Any], optax.GradientTransformation]:
    """The one-backward step: grad of ob.weighted_loss, then update with the losses."""
    full = optax.chain(tx, optax.adam(1e-3))

    def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
        def loss_fn(p: Any) -> Any:
            losses = mlp_losses(p, x, y)
            return ob.weighted_loss(tx, losses, opt_state), losses

        (_, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = full.update(grads, opt_state, params, task_losses=losses)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1)), full


def grad_step(tx: Any) -> tuple[Callable[..., Any], optax.GradientTransformation]:
    """The per-task-gradient step: T backward passes, then the method."""
    full = optax.chain(tx, optax.adam(1e-3))

    def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
        losses, grads = ob.value_and_task_grads(mlp_losses)(params, x, y)
        updates, opt_state = full.update(grads, opt_state, params, task_losses=losses)
        return optax.apply_updates(params, updates), opt_state

    return jax.jit(step, donate_argnums=(0, 1)), full


# --------------------------------------------------------------------------------------
# Timing: interleaved rounds, per-round ratios.
# --------------------------------------------------------------------------------------


def interleaved(
    calls: dict[str, Callable[[], Any]],
    *,
    sample: float,
    min_rounds: int,
    max_rounds: int,
    seconds: float,
) -> dict[str, list[float]]:
    """Per-round seconds per call of each callable (two warm-up calls each)."""
    reps = {}
    for k, fn in calls.items():
        fn()
        t0 = time.perf_counter()
        fn()
        reps[k] = max(1, min(100, int(sample / max(time.perf_counter() - t0, 1e-7))))
    out: dict[str, list[float]] = {k: [] for k in calls}
    start = time.perf_counter()
    for r in range(max_rounds):
        for k, fn in calls.items():
            fn()  # one untimed call after switching callables
            t0 = time.perf_counter()
            for _ in range(reps[k]):
                fn()
            out[k].append((time.perf_counter() - t0) / reps[k])
        if r + 1 >= min_rounds and time.perf_counter() - start > seconds:
            break
    return out


def xla_cost(step: Any, full: Any, params: Any, x: Any, y: Any) -> tuple[float, float] | None:
    """(flops, bytes accessed) of the compiled step from XLA's cost analysis, if it has one."""
    try:
        cost = step.lower(params, full.init(params), x, y).compile().cost_analysis()
    except Exception:  # a backend without cost analysis
        return None
    cost = cost[0] if isinstance(cost, list) else cost
    if not cost or "flops" not in cost or "bytes accessed" not in cost:
        return None
    return float(cost["flops"]), float(cost["bytes accessed"])


def runner(step: Callable[..., Any], full: Any, params: Any, x: Any, y: Any) -> Callable[[], Any]:
    carry = [jax.tree.map(jnp.copy, params), None]
    carry[1] = full.init(carry[0])

    def run() -> None:
        carry[0], carry[1] = jax.block_until_ready(step(carry[0], carry[1], x, y))

    return run


def measure(
    t: int, names: Sequence[str], *, d_in: int, hidden: int, batch: int, timing: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """name -> timings and XLA costs at T = t.

    ``plain``/``ours``: median seconds; ``median``: the median over rounds of the
    per-round ratio; ``best``: fastest round against fastest round; ``flops``/``bytes``:
    XLA's cost analysis of the compiled step over the plain one's (``None`` if absent).
    """
    key = jax.random.key(t)
    params = mlp_params(t, d_in, hidden, key)
    x = jax.random.normal(jax.random.fold_in(key, 1), (batch, d_in))
    y = jax.random.normal(jax.random.fold_in(key, 2), (batch, t))
    base = plain_step()
    plain = runner(*base, params, x, y)
    base_cost = xla_cost(*base, params, x, y)
    out = {}
    for name in names:
        if name in LOSS_METHODS:
            step, full = loss_step(LOSS_METHODS[name](t))
        else:
            step, full = grad_step(GRAD_METHODS[name][1](t))
        cost = xla_cost(step, full, params, x, y)
        res = interleaved({"plain": plain, name: runner(step, full, params, x, y)}, **timing)
        a, b = np.asarray(res[name]), np.asarray(res["plain"])
        r = {
            "plain": float(np.median(b)),
            "ours": float(np.median(a)),
            "median": float(np.median(a / b)),
            "best": float(a.min() / b.min()),
            "flops": None if not (cost and base_cost) else cost[0] / base_cost[0],
            "bytes": None if not (cost and base_cost) else cost[1] / base_cost[1],
        }
        out[name] = r
        print(
            f"  T={t} {name}: {r['ours'] * 1e3:.3g} ms, {r['median']:.3f}x plain (median), "
            f"{r['best']:.3f}x (best), XLA flops {r['flops']}, bytes {r['bytes']}",
            flush=True,
        )
    return out


# --------------------------------------------------------------------------------------
# The table.
# --------------------------------------------------------------------------------------


def select(names: str | None) -> list[str]:
    every = list(LOSS_METHODS) + list(GRAD_METHODS)
    if not names:
        return every
    wanted = {n.strip() for n in names.split(",")}
    return [n for n in every if n in wanted]


def _ms(seconds: float) -> str:
    v = seconds * 1e3
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def run_table(
    tasks: Sequence[int], names: Sequence[str], quick: bool
) -> tuple[list[str], list[str]]:
    """The markdown lines of the section and the cells that miss the target."""
    d_in, hidden, batch = (16, 32, 16) if quick else (128, 512, 256)
    timing = (
        dict(sample=0.0, min_rounds=3, max_rounds=3, seconds=0.0)
        if quick
        else dict(sample=5e-3, min_rounds=31, max_rounds=301, seconds=5.0)
    )
    load_before = _load()
    results = {t: measure(t, names, d_in=d_in, hidden=hidden, batch=batch, timing=timing)
               for t in tasks}  # fmt: skip
    plain_ms = [
        _ms(float(np.median([r["plain"] for r in results[t].values()]))) if results[t] else "—"
        for t in tasks
    ]
    header = ["method", "needs"] + [f"T={t}: ms (median, best x plain)" for t in tasks]
    rows = [["plain sum of the losses", "—"] + plain_ms]
    cost_rows = []
    misses = []
    for name in names:
        loss_based = name in LOSS_METHODS
        needs = "losses only" if loss_based else GRAD_METHODS[name][0]
        row, cost_row = [name, needs], [name, needs]
        for t in tasks:
            r = results[t][name]
            flag = " **MISS**" if loss_based and r["median"] > TARGET else ""
            if flag:
                misses.append(
                    f"loss cost {name} T={t}: {r['median']:.3f}x the plain step (median of "
                    f"rounds; fastest rounds {r['best']:.3f}x) > {TARGET}"
                )
            row.append(f"{_ms(r['ours'])} ({r['median']:.2f}x, {r['best']:.2f}x){flag}")
            if r["flops"] is None:
                cost_row.append("n/a")
            else:
                cost_row.append(f"{r['flops']:.4f}x, {r['bytes']:.4f}x")
        rows.append(row)
        cost_rows.append(cost_row)
    lines = [
        "## Loss-based methods: the cost of one backward pass",
        f"A jitted train step of an MLP ({d_in}-{hidden}-{hidden} ReLU trunk, T linear heads, "
        f"batch {batch}, Adam): the plain summed loss against each method. Loss-based "
        "methods: one backward pass of `ob.weighted_loss`, then `update` with the losses. "
        "Gradient-based methods: the T per-task gradients (`ob.value_and_task_grads`), then "
        "the method. Median ms per step; in brackets, method / plain as the median over "
        "interleaved rounds of the per-round ratio (the target's figure), and as fastest "
        "round over fastest round. On a loaded machine both swing by several percent; the "
        "cost analysis below does not. "
        f"Target: every loss-based method <= {TARGET}x at every T. "
        f"Load before: {load_before}; after: {_load()}.",
        "\n".join(_table(header, rows)),
        "XLA's cost analysis of the same compiled steps (load-independent): flops and bytes "
        "accessed, each relative to the plain step's.",
        "\n".join(
            _table(["method", "needs"] + [f"T={t}: flops, bytes" for t in tasks], cost_rows)
        ),  # fmt: skip
    ]
    return lines, misses


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(r) + " |" for r in rows],
    ]


def _load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def section(rep: Any, *, quick: bool = False, names: str | None = None) -> None:
    """Adds the section to ``benchmarks/run.py``'s report (``rep.add``, ``rep.misses``)."""
    tasks = (2,) if quick else (2, 8, 32)
    lines, misses = run_table(tasks, select(names), quick)
    for text in lines:
        rep.add(text)
    rep.misses.extend(misses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=None)
    parser.add_argument("--methods", default=None, help="comma-separated names")
    parser.add_argument("--quick", action="store_true", help="small model, T=2, 3 rounds")
    args = parser.parse_args()
    tasks = args.tasks or ((2,) if args.quick else (2, 8, 32))
    print(f"JAX {jax.__version__}, {jax.default_backend()}, {os.cpu_count()} CPUs")
    lines, misses = run_table(tasks, select(args.methods), args.quick)
    print("\n\n".join(lines))
    print("\n".join(["", "Misses:"] + misses) if misses else "\nEvery cell meets its target.")


if __name__ == "__main__":
    main()
