"""The benchmarks' multi-task model: a shared two-layer ReLU trunk and T linear heads.

One definition for ``run.py``'s train-step and memory sections, ``loss_cost.py`` and
``lowmem.py``, so their tables measure the same model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def mlp_params(t: int, d_in: int, hidden: int, key: jax.Array) -> dict[str, Any]:
    """``{"trunk": {w1, b1, w2, b2}, "heads": {w (T, hidden), b (T,)}}``, scaled init."""
    k = jax.random.split(key, 3)
    return {
        "trunk": {
            "w1": jax.random.normal(k[0], (d_in, hidden)) / np.sqrt(d_in),
            "b1": jnp.zeros(hidden),
            "w2": jax.random.normal(k[1], (hidden, hidden)) / np.sqrt(hidden),
            "b2": jnp.zeros(hidden),
        },
        "heads": {"w": jax.random.normal(k[2], (t, hidden)) / np.sqrt(hidden), "b": jnp.zeros(t)},
    }


def mlp_losses(params: dict[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
    """(T,) mean squared errors, one per linear head (``y``: ``(B, T)``)."""
    tr = params["trunk"]
    h = jax.nn.relu(x @ tr["w1"] + tr["b1"])
    h = jax.nn.relu(h @ tr["w2"] + tr["b2"])
    pred = h @ params["heads"]["w"].T + params["heads"]["b"]  # (B, T)
    return jnp.mean((pred - y) ** 2, axis=0)
