"""Tolerances derived from float32 error bounds, not from one machine's rounding.

A float32 dot product (or a sum) of n terms, accumulated in any order, has an error
bounded by ``gamma_n * sum_k |x_k y_k|`` in the worst case (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2002, eq. 3.5), with ``gamma_n = n u / (1 - n u)``
and ``u = 2^-24``. That bound is reached only when every rounding error has the same
sign; rounding errors behave as independent zero-mean variables, and then the error is
below ``lam * sqrt(n) * u * sum_k |x_k y_k|`` with probability at least
``1 - 2 exp(-lam^2 (1 - u)^2 / 2)`` (Higham & Mary, "A New Approach to Probabilistic
Rounding Error Analysis", SIAM J. Sci. Comput. 2019, Theorem 3.1). With ``lam = 6`` that
is a failure chance of 3e-8 per entry, whatever the summation order a kernel, a BLAS or
a CPU uses: an Intel and an AMD machine give different roundings, and both stay within
it. Inputs in bfloat16 or float16 are exact in float32, so they add nothing.
"""

from __future__ import annotations

import numpy as np

U32 = 2.0**-24  # unit roundoff of float32
LAM = 6.0


def dot_bound(abs_sum: np.ndarray, n: int, *, u: float = U32, lam: float = LAM) -> np.ndarray:
    """Error bound of float32 dot products of ``n`` terms with ``sum_k |x_k y_k| = abs_sum``."""
    return lam * np.sqrt(n + 1.0) * u * np.asarray(abs_sum, np.float64)


def assert_gram_close(got, x, *, u: float = U32) -> None:
    """``got`` (T, T) equals the Gramian of ``x`` (T, n; any float dtype) within the bound.

    ``x`` holds the values the kernel saw (cast to float64 here); the reference is its
    float64 Gramian.
    """
    f = np.asarray(x, np.float64).reshape(np.shape(x)[0], -1)
    want = f @ f.T
    bound = dot_bound(np.abs(f) @ np.abs(f).T, f.shape[1], u=u)
    err = np.abs(np.asarray(got, np.float64) - want)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (
        f"Gramian entry {worst}: error {err[worst]:.3g} above the float32 bound "
        f"{bound[worst]:.3g} (n={f.shape[1]}, value {want[worst]:.6g})"
    )
