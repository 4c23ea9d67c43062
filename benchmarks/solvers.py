"""The small dense solvers: every Gramian method's update and weighting, timed.

``python -m benchmarks.solvers`` prints one table: for each Gramian method of
``benchmarks/methods.py`` and T in 2, 8, 32 (P = 1e4 float32 parameters, the inputs of
``benchmarks/run.py``), the median milliseconds of

* ``update``: the jitted ``update`` (Gramian + weights + combination), and
* ``weigh``: the jitted weighting alone on a precomputed ``(T, T)`` Gramian (the solver),

on *conflicting* task gradients: ``g_i = s_i (sum_k c_ik v_k + 0.1 z_i)`` with
``min(T, 8)`` shared random directions ``v_k``, Gaussian ``c_ik`` and scales ``s_i`` from
0.1 to 10, so about half the pairs conflict and the QPs of UPGrad, DualProj and CAGrad
have non-trivial active sets (``benchmarks/run.py``'s gradients share one direction and
rarely conflict: there the projections end at once),

with the solver's iteration count where the state has one, and ``update / mgda``: the
update against MGDA's update at the same T and P, timed in the same rounds (issue 17's
target: UPGrad at T=32 within 2x of MGDA). The calls of one T are timed interleaved,
round-robin (``benchmarks.run.interleaved``), so load swings hit them alike; on a shared
machine repeat the run and compare medians.

Options: ``--rounds N`` (default 15), ``--methods a,b``, ``--tasks 2,8,32``,
``--save FILE`` writes the medians as JSON, ``--compare FILE`` adds the saved medians as
"before" columns (for before/after tables).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import optax_balance as ob
from benchmarks.methods import METHODS
from benchmarks.run import interleaved, leaf_shapes, load, machine, ms, table, update_fn

P = 10_000


def conflicting_grads(t: int, p: int, seed: int = 0) -> tuple[dict[str, Any], np.ndarray]:
    """Stacked float32 gradients (leaves of ``benchmarks.run.leaf_shapes``) and ``(T, P)``."""
    rng = np.random.default_rng(seed)
    k = min(t, 8)
    coef = rng.standard_normal((t, k)) * np.logspace(-1, 1, t)[:, None]
    scales = np.logspace(-1, 1, t)[:, None]
    mat = coef @ rng.standard_normal((k, p)) + 0.1 * scales * rng.standard_normal((t, p))
    mat = mat.astype(np.float32)
    tree, start = {}, 0
    for name, shape in leaf_shapes(p).items():
        size = int(np.prod(shape))
        tree[name] = mat[:, start : start + size].reshape(t, *shape)
        start += size
    return tree, mat


def cells(names: list[str], t: int, rounds: int) -> dict[str, dict[str, Any]]:
    """Median seconds of ``update`` and ``weigh`` for every method at T=t, interleaved."""
    grads, mat = conflicting_grads(t, P)
    grads = jax.tree.map(jnp.asarray, grads)
    gram = jnp.asarray(mat.astype(np.float64) @ mat.T.astype(np.float64), jnp.float32)
    losses = jnp.linspace(1.0, 2.0, t)
    calls, iters = {}, {}
    for name in names:
        m = next(x for x in METHODS if x.name == name)
        tx = m.make(t)
        state = tx.init(jax.tree.map(lambda g: g[0], grads))
        upd = update_fn(tx, m)
        weighting = getattr(ob.weightings, m.factory)(**_weighting_kwargs(m, t))
        w_state = weighting.init(t)
        weigh = jax.jit(lambda g, s, w=weighting: w(g, s))
        _, new_state = weigh(gram, w_state)
        iters[name] = _iterations(new_state)
        calls[f"{name}/update"] = lambda u=upd, s=state: jax.block_until_ready(u(grads, s, losses))
        calls[f"{name}/weigh"] = lambda f=weigh, s=w_state: jax.block_until_ready(f(gram, s))
    res = interleaved(calls, sample=5e-3, rounds=rounds)
    out = {}
    for name in names:
        out[name] = {
            "update": res[f"{name}/update"],
            "weigh": res[f"{name}/weigh"],
            "iterations": iters[name],
            "vs_mgda": res.ratio(f"{name}/update", "mgda/update") if "mgda" in names else None,
        }
    return out


def _weighting_kwargs(m: Any, t: int) -> dict[str, Any]:
    kw = dict(m.kwargs(t))
    if m.factory == "nash_mtl":
        kw.setdefault("num_tasks", t)
    return kw


def _iterations(state: Any) -> str:
    its = getattr(state, "iterations", None)
    return "" if its is None else str(int(its))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--methods", default="")
    ap.add_argument("--tasks", default="2,8,32")
    ap.add_argument("--save", default="")
    ap.add_argument("--compare", default="")
    args = ap.parse_args(argv)
    names = [m.name for m in METHODS if m.kind == "gram" and m.available()]
    if args.methods:
        wanted = args.methods.split(",")
        names = [n for n in names if n in wanted or n == "mgda"]
    before = json.load(open(args.compare)) if args.compare else {}
    print(machine() + "\n")
    print(f"P = {P:g}, float32; load before: {load()}\n", flush=True)
    saved: dict[str, Any] = {}
    rows = []
    for t in (int(x) for x in args.tasks.split(",")):
        res = cells(names, t, args.rounds)
        saved[str(t)] = res
        for name, r in res.items():
            b = before.get(str(t), {}).get(name)
            row = [name, t]
            if before:
                row += [ms(b["update"]) if b else "", ms(b["weigh"]) if b else ""]
            row += [ms(r["update"]), ms(r["weigh"]), r["iterations"]]
            row += ["" if r["vs_mgda"] is None else f"{r['vs_mgda']:.2f}"]
            rows.append(row)
        print(f"T={t} done (load {load()})", flush=True)
    head = ["method", "T"]
    if before:
        head += ["update ms (before)", "weigh ms (before)"]
    head += ["update ms", "weigh ms", "iterations", "update / mgda"]
    print()
    print(table(head, rows))
    print(f"\nload after: {load()}")
    if args.save:
        with open(args.save, "w") as f:
            json.dump(saved, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
