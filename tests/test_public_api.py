"""The public surface: explicit `__all__`, documented names, the design's signatures."""

import inspect

import pytest

import optax_balance as ob

FUNCTIONS = [n for n in ob.__all__ if callable(getattr(ob, n)) and not n[0].isupper()]
STATES = [n for n in ob.__all__ if n.endswith("State")]
WEIGHTINGS = list(ob.weightings.__all__)


def test_all_is_sorted_and_complete():
    assert list(ob.__all__) == sorted(ob.__all__)
    assert all(hasattr(ob, n) for n in ob.__all__)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_function_docstrings_have_math_args_returns_doctest(name):
    doc = inspect.getdoc(getattr(ob, name)) or ""
    summary = doc.split("\n", 1)[0]
    assert summary.endswith(".") and len(summary) < 100, summary
    for section in ("Args:", "Returns:", "Examples:", ">>>"):
        assert section in doc, f"{name}: no {section!r} in its docstring"


@pytest.mark.parametrize("name", [n for n in FUNCTIONS if n not in ("task_weights",)])
def test_methods_and_helpers_cite_references(name):
    assert "References:" in (inspect.getdoc(getattr(ob, name)) or "") or name in (
        "value_and_task_grads",
        "value_and_balanced_grad",
    )


def test_weightings_namespace_is_sorted_and_complete():
    assert list(ob.weightings.__all__) == sorted(ob.weightings.__all__)
    # every method factory whose math is a weighting has one, under the same name
    helpers = ("accumulate", "balance", "conflict_stats", "task_weights", "weighted_loss")
    methods = [n for n in FUNCTIONS if n not in helpers and "value" not in n]
    assert set(methods) <= set(WEIGHTINGS), set(methods) - set(WEIGHTINGS)


@pytest.mark.parametrize("name", WEIGHTINGS)
def test_weighting_docstrings_and_hyperparameters(name):
    fn = getattr(ob.weightings, name)
    doc = inspect.getdoc(fn) or ""
    summary = doc.split("\n", 1)[0]
    assert summary.endswith(".") and len(summary) < 100, summary
    for section in ("Returns:", "Examples:", ">>>", "References:"):
        assert section in doc, f"weightings.{name}: no {section!r} in its docstring"
    params = inspect.signature(fn).parameters
    assert not params or "Args:" in doc
    # the same hyperparameters, names and defaults, as the transformation (if there is one)
    if hasattr(ob, name):
        full = inspect.signature(getattr(ob, name)).parameters
        for p, par in params.items():
            assert p in full, (name, p)
            assert full[p].default == par.default, (name, p)
        core = {"shared", "axis_name", "sync", "num_tasks"}
        assert set(full) - core <= set(params), (name, set(full) - core - set(params))


@pytest.mark.parametrize("name", STATES)
def test_states_are_namedtuples_with_weights(name):
    cls = getattr(ob, name)
    assert issubclass(cls, tuple) and "weights" in cls._fields
    assert inspect.getdoc(cls)


@pytest.mark.parametrize(
    "name, params",
    [
        ("balancer", ["weights", "balance_grads", "total_norm", "ema_decay", "per_batch_item",
                      "epsilon", "shared", "axis_name"]),
        ("gradnorm", ["num_tasks", "alpha", "weight_optimizer", "norm_mask", "shared",
                      "axis_name"]),
        ("mgda", ["norm_type", "epsilon", "max_iters", "shared", "axis_name"]),
        ("metabalance", ["relax_factor", "beta", "main_task", "strategy", "epsilon", "shared",
                         "axis_name"]),
        ("upgrad", ["pref_vector", "norm_eps", "reg_eps"]),
        ("dualproj", ["pref_vector", "norm_eps", "reg_eps"]),
        ("pcgrad", ["seed"]),
        ("cagrad", ["c", "rescale"]),
        ("nash_mtl", ["num_tasks", "max_norm", "update_weights_every", "optim_niter"]),
        ("aligned_mtl", ["pref_vector", "scale_mode"]),
    ],
)  # fmt: skip
def test_design_signatures(name, params):
    sig = inspect.signature(getattr(ob, name))
    names = list(sig.parameters)
    assert names[: len(params)] == params or all(p in names for p in params), names
    for p in ("shared", "axis_name"):
        assert p in names, f"{name} lacks `{p}`"
        assert sig.parameters[p].default is None


@pytest.mark.parametrize(
    "name, defaults",
    [
        ("balancer", {"balance_grads": True, "total_norm": 1.0, "ema_decay": 0.999,
                      "per_batch_item": False, "epsilon": 1e-12}),
        ("gradnorm", {"alpha": 1.5, "weight_optimizer": None, "norm_mask": None}),
        ("mgda", {"norm_type": "none", "epsilon": 1e-5, "max_iters": 250}),
        ("metabalance", {"relax_factor": 0.7, "beta": 0.9, "main_task": 0, "strategy": "both",
                         "epsilon": 1e-12}),
        ("upgrad", {"pref_vector": None, "norm_eps": 1e-4, "reg_eps": 1e-4}),
        ("dualproj", {"pref_vector": None, "norm_eps": 1e-4, "reg_eps": 1e-4}),
        ("pcgrad", {"seed": 0}),
        ("cagrad", {"c": 0.5, "rescale": True}),
        ("nash_mtl", {"max_norm": 1.0, "update_weights_every": 1, "optim_niter": 20}),
        ("aligned_mtl", {"pref_vector": None, "scale_mode": "min"}),
    ],
)  # fmt: skip
def test_design_defaults(name, defaults):
    sig = inspect.signature(getattr(ob, name))
    for p, v in defaults.items():
        assert sig.parameters[p].default == v, (name, p)
        assert sig.parameters[p].kind == inspect.Parameter.KEYWORD_ONLY, (name, p)
