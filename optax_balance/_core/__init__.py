"""The machinery every balancing method shares, once.

A method is a :class:`Weighting` (``_weighting``): statistics [+ state] -> weights
[+ state]. Everything else lives here, split by concern:

* ``_checks``: hyperparameter validation at construction (``ValueError`` naming the
  parameter and its range; traced values under ``inject_hyperparams`` pass);
* ``_tree``: the stacked gradient tree (one leading task axis of the same size on every
  leaf, or an ordinary gradient for loss-based methods), the ``shared`` mask, the losses;
* ``_gram`` and ``_stats``: the statistics, leaf by leaf in float32 (float64 under x64),
  never by ravelling all parameters into one vector, with CPU/GPU Gramian kernels (and
  the cross-Gramian of two mini-batches, ``task_grads2=``), and their sync over devices;
* ``_combine``: ``sum_i w_i g_i`` leaf by leaf, cast back to each leaf's dtype;
* ``_weighting``: the :class:`Weighting` value and the non-finite guard;
* ``_transform``: :func:`balance`, the optax transformation with device sync.

Method modules import this package as ``_core`` and use the names below.
"""

from optax_balance._core._checks import (
    check_choice,
    check_int,
    check_num_tasks,
    check_range,
    check_task_vector,
    is_concrete,
    is_traced,
)
from optax_balance._core._combine import combine, combine_leaf, fused_sum, sum_leaf
from optax_balance._core._gram import (
    leaf_cross_gram,
    leaf_gram,
    leaf_sq_norms,
    mix_leaf,
    task_rows,
)
from optax_balance._core._stats import (
    STAT_NAMES,
    Stats,
    all_finite,
    compute_stats,
    cross_gramian,
    gramian,
    mix_gramian,
    mix_sq_norms,
    safe_inverse,
    safe_sqrt,
    sq_norms,
    stats_from_cross_gram,
    stats_from_gram,
    sync_stats,
)
from optax_balance._core._transform import (
    BalancedTransform,
    balance,
    grads_finite,
    initial_state,
    loss_stats,
    ready_state,
    resolve_num_tasks,
    statistic_masks,
)
from optax_balance._core._tree import (
    check_losses,
    check_second_batch,
    is_stacked,
    num_tasks_of,
    resolve_mask,
    stacked_zeros_like,
    unstacked_like,
)
from optax_balance._core._types import Array, PyTree, SharedMask, Sync, stat_dtype
from optax_balance._core._weighting import Weighting, guarded_weigh, tree_none_outside

__all__ = [
    "STAT_NAMES",
    "Array",
    "BalancedTransform",
    "PyTree",
    "SharedMask",
    "Stats",
    "Sync",
    "Weighting",
    "all_finite",
    "fused_sum",
    "balance",
    "check_choice",
    "check_int",
    "check_losses",
    "check_second_batch",
    "check_num_tasks",
    "check_range",
    "check_task_vector",
    "combine",
    "combine_leaf",
    "compute_stats",
    "cross_gramian",
    "gramian",
    "grads_finite",
    "guarded_weigh",
    "initial_state",
    "is_concrete",
    "is_stacked",
    "is_traced",
    "leaf_cross_gram",
    "leaf_gram",
    "leaf_sq_norms",
    "loss_stats",
    "mix_gramian",
    "mix_leaf",
    "mix_sq_norms",
    "num_tasks_of",
    "ready_state",
    "resolve_mask",
    "resolve_num_tasks",
    "safe_inverse",
    "safe_sqrt",
    "sq_norms",
    "stacked_zeros_like",
    "stat_dtype",
    "stats_from_cross_gram",
    "statistic_masks",
    "stats_from_gram",
    "sum_leaf",
    "task_rows",
    "sync_stats",
    "tree_none_outside",
    "unstacked_like",
]
