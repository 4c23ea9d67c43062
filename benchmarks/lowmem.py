"""Benchmark: parameter-level balancing at the memory of one gradient.

An MLP with a shared ReLU trunk (256 -> 1024 -> 1024, 1.31M parameters) and T linear
heads (task-specific), batch 256, squared error per task. For T in {2, 8, 32} it
compiles one jitted gradient step (losses and gradient, no optimizer) of

* ``plain``: the summed loss, ``jax.value_and_grad`` (one forward, one backward pass);
* ``stacked``: ``ob.value_and_task_grads`` (one forward, T backward passes, vectorised)
  and the method's ``update`` on the stacked gradients;
* ``weighted``: ``ob.value_and_weighted_grad`` with the same method (one forward, T
  VJPs, T JVPs for a Gramian method, one more VJP; T + 1 VJPs for a norm method);

for UPGrad (a Gramian method) and the EnCodec balancer (norms only), and prints

* the compiled step's memory from XLA's memory analysis (temp + output bytes: what the
  step allocates beyond its inputs), with the ratio to ``plain``;
* the step time: the median over rounds of the three timed interleaved (the timer of
  ``benchmarks/run.py``), with the ratio to ``plain``.

Target: ``weighted`` memory <= 1.5x ``plain`` at every T. Time is not a target: the
columns cost 2T + 2 passes against the stacked path's T + 1, in a sequential loop.

Run:  python -m benchmarks.lowmem                  (a few minutes on a 2-core CPU)
      python -m benchmarks.lowmem --tasks 2 8 --batch 64
It is also section ``lowmem`` of ``benchmarks/run.py`` (``BENCH_SECTIONS=lowmem``).
"""

from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

import optax_balance as ob
from benchmarks import run as bench
from benchmarks.mlp import mlp_losses, mlp_params

QUICK = bench.QUICK
D_IN, HIDDEN = (16, 64) if QUICK else (256, 1024)
BATCH = 16 if QUICK else 256
TASKS: Sequence[int] = (2,) if QUICK else (2, 8, 32)
MEMORY_TARGET = 1.5
SHARED = {"trunk": True, "heads": False}
METHODS: dict[str, Callable[[int], Any]] = {
    "upgrad": lambda t: ob.upgrad(num_tasks=t, shared=SHARED),
    "balancer": lambda t: ob.balancer([1.0] * t, shared=SHARED),
}


def init_params(key: jax.Array, num_tasks: int) -> dict[str, Any]:
    return mlp_params(num_tasks, D_IN, HIDDEN, key)


task_losses = mlp_losses


def plain_step(params: Any, state: Any, x: jax.Array, y: jax.Array) -> Any:
    loss, g = jax.value_and_grad(lambda p: jnp.sum(task_losses(p, x, y)))(params)
    return loss, g, state


def method_steps(tx: Any) -> dict[str, Callable[..., Any]]:
    """The method's two steps, each ``(params, state, x, y) -> (losses, grad, state)``."""

    def stacked(params: Any, state: Any, x: jax.Array, y: jax.Array) -> Any:
        losses, grads = ob.value_and_task_grads(task_losses)(params, x, y)
        upd, state = tx.update(grads, state, params, task_losses=losses)
        return losses, upd, state

    return {"stacked": stacked, "weighted": ob.value_and_weighted_grad(task_losses, tx)}


def passes(path: str, method: str, t: int) -> str:
    if path == "plain":
        return "1 + 1"
    if path == "stacked":
        return f"1 + {t} (vmap)"
    return f"1 + {2 * t + 1}" if method == "upgrad" else f"1 + {t + 1}"


def _call(compiled: Any, args: tuple[Any, ...]) -> Any:
    return jax.block_until_ready(compiled(*args))


def measure(tasks: Sequence[int], batch: int, timed: bool = True) -> list[list[Any]]:
    """Per T: the plain step, then each method's stacked and weighted steps, all timed
    interleaved in one loop."""
    rows = []
    for t in tasks:
        key = jax.random.key(t)
        params = init_params(key, t)
        x = jax.random.normal(jax.random.fold_in(key, 1), (batch, D_IN))
        y = jax.random.normal(jax.random.fold_in(key, 2), (batch, t))
        cells: dict[tuple[str, str], tuple[Any, Any]] = {("(sum)", "plain"): (plain_step, None)}
        for method, make in METHODS.items():
            tx = make(t)
            for path, fn in method_steps(tx).items():
                cells[(method, path)] = (fn, tx.init(params))
        compiled, mem = {}, {}
        for k, (fn, state) in cells.items():
            c = jax.jit(fn).lower(params, state, x, y).compile()
            m = c.memory_analysis()
            mem[k] = m.temp_size_in_bytes + m.output_size_in_bytes
            compiled[k] = (c, state)
        res = None
        if timed:
            calls = {
                "/".join(k): functools.partial(_call, c, (params, s, x, y))
                for k, (c, s) in compiled.items()
            }
            res = bench.interleaved(calls, rounds=2 if QUICK else 5)
        base = ("(sum)", "plain")
        for (method, path), m in mem.items():
            ratio = m / mem[base]
            flag = ""
            if path == "weighted":
                flag = "ok" if ratio <= MEMORY_TARGET else f"**MISS** (>{MEMORY_TARGET})"
            name = f"{method}/{path}"
            rows.append(
                [
                    t,
                    method,
                    path,
                    passes(path, method, t),
                    f"{m / 2**20:.1f}",
                    f"{ratio:.2f}",
                    flag,
                    bench.ms(res[name]) if res else "-",
                    f"{res.ratio(name, '/'.join(base)):.1f}" if res else "-",
                ]
            )
        print(f"  [{bench.load()}] lowmem T={t}: done", flush=True)
    return rows


HEADER = ["T", "method", "path", "passes", "memory MiB", "/ plain", "target", "ms", "/ plain"]


def section(rep: bench.Report) -> None:
    """Section ``lowmem`` of ``benchmarks/run.py``."""
    load_before = bench.load()
    rows = measure(TASKS, BATCH)
    n_trunk = sum(v.size for v in jax.tree.leaves(init_params(jax.random.key(0), 1)["trunk"]))
    rep.section("Parameter-level balancing at the memory of one gradient")
    rep.add(
        f"A jitted gradient step (losses and gradient, no optimizer) of an MLP: ReLU trunk "
        f"{D_IN}-{HIDDEN}-{HIDDEN} ({n_trunk:,} shared parameters, "
        f"{4 * n_trunk / 2**20:.1f} MiB in float32), T linear heads, batch {BATCH}. Memory: "
        "XLA's memory analysis of the compiled step, temp + output. `plain`: "
        "`jax.value_and_grad` of the summed loss; `stacked`: `ob.value_and_task_grads` + "
        "the method's `update`; `weighted`: `ob.value_and_weighted_grad` (chunk_size=1). "
        "Passes: forward + backward-type passes (VJPs and JVPs). Time: median ms of 5 "
        f"interleaved rounds. Target: weighted memory <= {MEMORY_TARGET:g}x plain. "
        f"Load before: {load_before}; after: {bench.load()}."
    )
    for r in rows:
        if r[6].startswith("**MISS"):
            rep.misses.append(f"lowmem T={r[0]} {r[1]}: memory {r[5]}x plain > {MEMORY_TARGET}")
    rep.add(bench.table(HEADER, rows))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=list(TASKS))
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--no-time", action="store_true", help="memory only (compile, no runs)")
    args = parser.parse_args(argv)
    rows = measure(args.tasks, args.batch, timed=not args.no_time)
    print(
        f"\njax {jax.__version__}, {jax.default_backend()} ({os.cpu_count()} cpus), "
        f"load {bench.load()}; trunk {D_IN}-{HIDDEN}-{HIDDEN}, batch {args.batch}\n"
    )
    print(bench.table(HEADER, rows))


if __name__ == "__main__":
    main()
