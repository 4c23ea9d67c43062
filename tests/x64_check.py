"""Every registry method end to end in float64; run by ``test_contract`` with x64 on.

``python -m tests.x64_check`` (from the repository root, ``JAX_ENABLE_X64=1``) prints one
JSON line: for each method, the output and state dtypes after two jitted steps, whether
the state's avals stayed the same, whether every hostile input gave a finite output and
state, and the weights and output on the generic input (compared with float32 by the
test). Nothing happens on import.
"""

from __future__ import annotations

import json
import traceback


def _report(m) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tests import inputs as I

    f64 = jnp.float64
    t = I.HOSTILE_T
    tx = m.make(t)
    p = I.params(f64)

    def step(g, s, losses):
        return tx.update(g, s, p, task_losses=losses, **m.batch_kwargs(g))

    j0, l0 = I.FINITE_CASES["generic"]
    jstep = jax.jit(step)  # one compile: every call below has the same avals
    s0 = tx.init(p)
    out, s1 = jstep(I.tree(j0.astype(np.float64), f64), s0, l0.astype(np.float64))
    _, s2 = jstep(I.tree(I.rand_j(99, t).astype(np.float64), f64), s1, 2.0 * l0)
    finite = True
    hostile = ("all_zero", "duplicate_rows", "one_task_1e10_larger", "scale_1e-10", "scale_1e+10")
    for name in hostile:
        j, losses = I.FINITE_CASES[name]
        o, s = jstep(I.tree(j.astype(np.float64), f64), s1, losses.astype(np.float64))
        finite = finite and I.all_finite(o) and I.all_finite(s)
    floats = [x for x in jax.tree.leaves(s1) if jnp.issubdtype(x.dtype, jnp.floating)]
    return {
        "error": None,
        "out_dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(out)}),
        "state_float_dtypes": sorted({str(x.dtype) for x in floats}),
        "stable_avals": I.avals(s0) == I.avals(s1) == I.avals(s2),
        "finite": finite,
        "weights": np.asarray(s1.weights).tolist(),
        "out": I.flat(out).tolist(),
    }


def main() -> None:
    import jax

    from tests.methods import METHODS

    assert jax.config.jax_enable_x64, "run with JAX_ENABLE_X64=1"
    report = {}
    for m in METHODS:
        try:
            report[m.name] = _report(m)
        except Exception:  # reported per method by the test
            report[m.name] = {"error": traceback.format_exc()[-3000:]}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
