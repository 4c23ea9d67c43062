"""The "Which method" table: one row per entry of the test registry, plus the wrappers.

What a row says comes from three places, so that it cannot drift from the code:

* *reads* from the public weighting itself (``tx.weighting.needs``, and the registry's
  ``stacked_init=False`` for a state shaped like the stacked gradients);
* *guarantees* from the registry's claimed properties (``tests/methods.py``), which the
  property suite verifies;
* *measured* from ``benchmarks/RESULTS.md``, parsed at build time (whatever run it holds).

Only the call, the per-step cost note and the "pick it when" sentence are written here, in
:data:`GUIDE`, keyed by registry name. :func:`rows` raises if a registry entry or a public
weighting (``ob.weightings.__all__``) has no entry, so a new method cannot be missing from
the page: the docs build (``tests/test_docs.py``) fails until its sentence is written.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

# registry name -> (call, pick it when). The sentence says what the method is for, from
# its paper, and its price or catch where there is one.
GUIDE: dict[str, tuple[str, str]] = {
    # ---- losses only: one backward pass -------------------------------------------------
    "mean": (
        "ob.mean()",
        "The baseline to beat: plain training on the average loss. Well-tuned, it matches "
        "most balancing methods on common benchmarks (Xin et al., NeurIPS 2022; Kurin et "
        "al., NeurIPS 2022), so always run it next to any other method.",
    ),
    "sum": (
        "ob.sum()",
        "The same as `ob.mean()` with T times its learning rate (the unitary scalarisation); "
        "pick whichever matches the learning rate you tuned.",
    ),
    "constant": (
        "ob.constant(weights)",
        "You already know (or have tuned) a fixed weight per task.",
    ),
    "rlw": (
        "ob.rlw(seed=0)",
        "A cheap baseline: Lin et al. (TMLR 2022) find random weights each step competitive "
        "with many adaptive methods, at the cost of one backward pass.",
    ),
    "uw": (
        "ob.uw(num_tasks)",
        "Regression and classification losses on different scales or noise levels: each "
        "loss is divided by a learned variance (Kendall et al., CVPR 2018), one backward "
        "pass; a task with a large irreducible loss ends up down-weighted.",
    ),
    "imtl_l": (
        "ob.imtl_l(num_tasks)",
        "Losses on very different scales that you want brought to the same scale by learned "
        "factors (the loss half of IMTL, Liu et al., ICLR 2021), one backward pass.",
    ),
    "dwa": (
        "ob.dwa(temperature=2.0, every=1)",
        "A cheap heuristic: up-weight the tasks whose loss has stopped falling over the last "
        "period (Liu et al., CVPR 2019); set `every` to the batches per epoch for the "
        "paper's per-epoch form.",
    ),
    "gls": (
        "ob.gls()",
        "Positive losses on very different scales: minimising their geometric mean makes "
        "each task's relative progress count equally (Chennupati et al., CVPRW 2019); every "
        "loss must stay > 0.",
    ),
    "famo": (
        "ob.famo(num_tasks)",
        "Many tasks or a large model, where T backward passes are too dear: it balances the "
        "rates at which the log-losses fall from the losses alone (Liu et al., NeurIPS "
        "2023), which the paper finds on par with gradient-based methods at O(1) cost.",
    ),
    "stch": (
        "ob.stch(mu=...)",
        "You want one particular Pareto-optimal trade-off, set by preference `weights`, "
        "including points on non-convex parts of the front that no weighted sum reaches: a "
        "smooth Tchebycheff scalarisation (Lin et al., ICML 2024); needs a `reference` "
        "point of your own.",
    ),
    "cosmos": (
        "ob.cosmos(lambda_=..., weights=...)",
        "A preference ray given as `weights`: the weighted sum plus a reward for losses "
        "aligned with the ray (Ruchte & Grabocka, ICDM 2021), for a solution near that "
        "ray rather than any point a weighted sum prefers.",
    ),
    "pbi": (
        "ob.pbi(theta=..., weights=...)",
        "The decomposition view of multi-objective optimisation (MOEA/D, Zhang & Li 2007): "
        "progress along a preference ray with a penalty `theta` for leaving it.",
    ),
    # ---- gradient norms -------------------------------------------------------------------
    "balancer": (
        "ob.balancer(weights)",
        "Losses on wildly different scales whose importance you can state as fixed shares "
        "of the update (EnCodec's reconstruction and adversarial losses, Défossez et al. "
        "2022): the update does not change when a loss is rescaled; norms only, so cheap.",
    ),
    "balancer_plain": (
        "ob.balancer(weights, balance_grads=False)",
        "A fixed weighted sum of the gradients (the balancer switched off): the baseline "
        "for the balancer's own runs.",
    ),
    "gradnorm": (
        "ob.gradnorm(num_tasks, alpha=1.5)",
        "Tasks that train at different rates: weights are learned so that each weighted "
        "gradient norm tracks the task's relative inverse training rate (Chen et al., ICML "
        "2018), with one knob `alpha` (larger: stronger balancing).",
    ),
    "metabalance": (
        "ob.metabalance(relax_factor=0.7)",
        "One main task and auxiliary tasks (He et al., WWW 2022, recommender systems): "
        "per parameter leaf, the auxiliary gradients' norms are pulled toward the main "
        "task's so they neither dominate nor vanish; task 0 is the main task.",
    ),
    # ---- Gramian --------------------------------------------------------------------------
    "mgda": (
        "ob.mgda()",
        "You need an update that decreases every loss to first order (a Pareto-stationary "
        "method; Sener & Koltun, NeurIPS 2018); it follows the smallest gradient, so tasks "
        "with large gradients can make little progress (the CAGrad and Nash-MTL papers show "
        "it stalling on their toy problem).",
    ),
    "mgda_l2": (
        'ob.mgda(norm_type="l2")',
        "Sener & Koltun's normalisation: the min-norm weights of the unit gradients, "
        "independent of each gradient's scale, but applied to the raw gradients, so a task "
        "with a much larger gradient still sets the direction (see the quickstart).",
    ),
    "mgda_loss+": (
        'ob.mgda(norm_type="loss+")',
        "As `l2`, with each gradient also divided by its loss (Sener & Koltun's "
        "`loss+`): favours tasks whose loss is still large relative to its gradient; needs "
        "positive losses.",
    ),
    "pcgrad": (
        "ob.pcgrad(seed=0)",
        "A few tasks with pairwise conflicting gradients (Yu et al., NeurIPS 2020): each "
        "gradient's component against another is projected out; random order each step, "
        "and for T >= 3 the sum can still conflict.",
    ),
    "imtl_g": (
        "ob.imtl_g()",
        "Gradients of different magnitudes that should all progress alike: the combination "
        "has an equal projection on every task's unit gradient (Liu et al., ICLR 2021), in "
        "closed form.",
    ),
    "aligned_mtl": (
        "ob.aligned_mtl()",
        "An ill-conditioned set of gradients (one dominating, or nearly collinear): the "
        "gradient system's singular values are equalised before weighting (Senushkin et "
        "al., CVPR 2023), for a stable, scale-balanced direction.",
    ),
    "upgrad": (
        "ob.upgrad()",
        "Conflicting gradients and an update that must not increase any task's loss to "
        "first order, while every task's gradient stays in the mix (Quinton & Rey 2024); "
        "unlike MGDA it does not collapse onto the smallest gradient.",
    ),
    "dualproj": (
        "ob.dualproj()",
        "As UPGrad, with one QP instead of T: the mean gradient projected onto the dual cone "
        "of the gradients (Quinton & Rey 2024); non-conflicting, and it leaves the mean "
        "untouched when nothing conflicts.",
    ),
    "cagrad": (
        "ob.cagrad(c=0.5)",
        "You want to follow the average loss (and converge to its minimum) but improve the "
        "worst task on the way: the best worst-task update within a ball around the mean "
        "gradient (Liu et al., NeurIPS 2021); `c` trades the two, `c=0` is the mean.",
    ),
    "nash_mtl": (
        "ob.nash_mtl(num_tasks)",
        "Tasks whose gradients differ in scale, with proportionally fair progress as the "
        "goal: the Nash bargaining solution (Navon et al., ICML 2022), strong in the "
        "paper's benchmarks; a Newton solve per re-solve (`update_weights_every` amortises "
        "it).",
    ),
    "gradvac": (
        "ob.gradvac(seed=0)",
        "Related tasks whose gradients are less aligned than they usually are (multilingual "
        "models, Wang et al., ICLR 2021): each pairwise cosine is raised toward its moving "
        "average, also when positive, where PCGrad acts on negative cosines only.",
    ),
    "gradvac_per_leaf": (
        "ob.gradvac(seed=0, per_leaf=True)",
        "The paper's per-layer form of Gradient Vaccine, when alignment differs layer by layer.",
    ),
    "con_fig": (
        "ob.con_fig()",
        "Conflicting gradients where every task should progress at the same rate per unit "
        "gradient, whatever the gradients' magnitudes (Liu et al., ICLR 2025, physics-"
        "informed losses); conflict-free when the gradients are linearly independent.",
    ),
    "krum": (
        "ob.krum(n_byzantine)",
        "Robustness, not balancing: some task gradients may be outliers or corrupted "
        "(Byzantine-robust aggregation, Blanchard et al., NeurIPS 2017); it selects the "
        "most central gradient(s) and drops the rest.",
    ),
    "trimmed_mean": (
        "ob.trimmed_mean(trim_number)",
        "Robustness to a few outlying task gradients, coordinate by coordinate (Yin et "
        "al., ICML 2018); needs T >= 2 trim_number + 1.",
    ),
    "fairgrad": (
        "ob.fairgrad(alpha=1.0)",
        "You want to choose how fairly progress is shared: `alpha=1` is Nash-MTL's "
        "proportional fairness, larger `alpha` approaches max-min fairness, `alpha=0` is "
        "the mean (Ban & Ji, ICML 2024).",
    ),
    "imtl": (
        "ob.imtl(num_tasks)",
        "Both the loss scales and the gradient directions differ: the full IMTL (Liu et al., "
        "ICLR 2021, the hybrid as LibMTL), IMTL-L's learned loss scales with IMTL-G's "
        "equal-projection closed form on the scaled gradients.",
    ),
    # ---- two mini-batches -----------------------------------------------------------------
    "sdmgrad": (
        "ob.sdmgrad(lambda_=0.3)",
        "Mini-batch training where you want MGDA's conflict avoidance kept near a preferred "
        "direction (the mean by default): SDMGrad (Xiao, Ban & Ji, NeurIPS 2023) estimates "
        "the Gramian without bias from two independent batches; `lambda_` trades the two. "
        "Needs a second batch (`task_grads2=`).",
    ),
    "modo": (
        "ob.modo(gamma=0.1, rho=0.1)",
        "Mini-batch MGDA with a convergence guarantee: MoDo (Chen et al., JMLR 2024) takes "
        "one projected step on the task weights per update, on the cross-Gramian of two "
        "independent batches (unbiased, where one batch's Gramian is not). Needs a second "
        "batch (`task_grads2=`).",
    ),
    "pcd": (
        "ob.pcd(tau=0.02)",
        "One primary task that must keep descending, with the other tasks guaranteed a "
        "share `tau` of their normalised progress (priority constraints, TMLR 2026).",
    ),
    # ---- stacked gradients ----------------------------------------------------------------
    "graddrop": (
        "ob.graddrop(seed=0)",
        "Tasks that disagree in sign on some coordinates only (Chen et al., NeurIPS 2020): "
        "per coordinate one sign is kept at random with its purity's odds, which acts as a "
        "regulariser; it adds noise to every step.",
    ),
    "moco": (
        "ob.moco(beta=0.5, gamma=0.1)",
        "Mini-batch training where MGDA-type weights on noisy gradients are biased: MoCo "
        "(Fernando et al., ICLR 2023) tracks each task's gradient with a moving average and "
        "steps the weights on the estimates' Gramian, with a convergence guarantee; the "
        "update's length follows the losses (the paper trains it with SGD), and it keeps "
        "one gradient-sized estimate per task.",
    ),
    "db_mtl": (
        "ob.db_mtl(beta=0.9)",
        "Losses and gradients on very different scales: DB-MTL (Lin et al. 2023) balances "
        "the losses by their logarithm and the gradients by scaling each task's averaged "
        "log-loss gradient to the largest norm; keeps one gradient-sized average per task.",
    ),
    "excess_mtl": (
        "ob.excess_mtl()",
        "Tasks with different noise levels: weight goes to the tasks farthest from their "
        "achievable loss rather than those with the largest (possibly noisy) loss (He et "
        "al., ICML 2024); keeps one gradient-sized accumulator.",
    ),
}

# Public weightings that are not registry entries (wrappers): name -> row fields.
EXTRA: dict[str, tuple[str, str, str, str]] = {
    "cr_mogm": (
        "ob.cr_mogm(weighting, alpha=0.9)",
        "as the wrapped weighting",
        "as the wrapped weighting, + O(T)",
        "Mini-batch MGDA-type weights that jump from step to step: smoothing them with an "
        "exponential moving average restores convergence (Zhou et al., NeurIPS 2022).",
    ),
}

_FAMILIES = ("losses only", "gradient norms", "Gramian", "two batches", "stacked gradients")

# Per-step cost by what a method reads (P: shared parameters, T: tasks), as the README's
# methods table states it.
_COST = {
    "losses only": "1 backward pass (with `ob.weighted_loss`), + O(T)",
    "gradient norms": "T backward passes, + T·P",
    "Gramian": "T backward passes, + T²·P",
    "two batches": "2T backward passes (two mini-batches), + T²·P",
    "stacked gradients": "T backward passes, + T·P or more",
}
_COST_NOTES = {
    "trimmed_mean": "T backward passes, + O(T²·P) (pairwise ranks per coordinate)",
    "graddrop": "T backward passes, + O(T·P) (per-coordinate masks)",
    "excess_mtl": "T backward passes, + T·P, and T·P more memory (state)",
    "gradvac_per_leaf": "T backward passes, + T²·P (Gramian per leaf)",
    "moco": "T backward passes, + T²·P (the estimates' Gramian) + ~6 passes over T·P, and "
    "T·P more memory (estimates)",
    "db_mtl": "T backward passes, + ~6 passes over T·P, and T·P more memory (averages)",
}


@dataclasses.dataclass
class Row:
    name: str  # registry name
    public: str  # ob.<public>
    call: str
    family: str
    reads: str
    cost: str
    guarantees: list[str]
    when: str
    measured: str = ""


def _family(needs: tuple[str, ...]) -> str:
    if needs == ("losses",):
        return "losses only"
    if "cross_gram" in needs:
        return "two batches"
    if "grads" in needs:
        return "stacked gradients"
    if "gram" in needs or "leaf_gram" in needs:
        return "Gramian"
    return "gradient norms"


def _reads(needs: tuple[str, ...], gradient_state: bool, extra_args: tuple[str, ...]) -> str:
    if needs == ("losses",):
        parts = ["losses only"]
    else:
        parts = []
        if "cross_gram" in needs:
            parts.append("two batches' cross-Gramian (`task_grads2=`)")
        if "gram" in needs:
            parts.append("Gramian")
        if "leaf_gram" in needs:
            parts.append("per-leaf Gramians")
        if {"sq_norms", "item_sq_norms"} & set(needs):
            parts.append("gradient norms")
        if "leaf_sq_norms" in needs:
            parts.append("per-leaf gradient norms")
        if "grads" in needs:
            parts.append("stacked gradients")
        if "losses" in needs:
            parts.append("losses")
    if gradient_state:
        parts.append("gradient-sized state")
    for arg in extra_args:
        parts.append(f"optional `{arg}=`")
    return " + ".join(parts)


def _guarantees(m) -> list[str]:
    out = []
    if m.non_conflicting:
        out.append("non-conflicting")
    if m.permutation_invariant:
        out.append("permutation-invariant")
    if m.homogeneous:
        out.append("homogeneous")
    if m.scale_invariant_output:
        out.append("scale-invariant output")
    elif m.scale_invariant_weights:
        out.append("scale-invariant weights")
    if m.stochastic:
        out.append("random")
    return out


def rows() -> list[Row]:
    """Every method's row, grouped by what it reads (losses, norms, Gramian, gradients)."""
    import optax_balance as ob

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.methods import METHODS

    missing = [m.name for m in METHODS if m.name not in GUIDE]
    stale = sorted(set(GUIDE) - {m.name for m in METHODS})
    if missing or stale:
        raise RuntimeError(
            "docs/_method_guide.py GUIDE must have exactly one entry per registry entry of "
            f"tests/methods.py: missing {missing}, not in the registry {stale}"
        )
    out = []
    for m in METHODS:
        weighting = m.make(max(3, m.min_tasks)).weighting
        needs = weighting.needs
        family = _family(needs)
        call, when = GUIDE[m.name]
        out.append(
            Row(
                name=m.name,
                public=weighting.name,
                call=call,
                family=family,
                reads=_reads(
                    needs,
                    not m.stacked_init or bool(getattr(weighting, "tracked", None)),
                    weighting.extra_args,
                ),
                cost=_COST_NOTES.get(m.name, _COST[family]),
                guarantees=_guarantees(m),
                when=when,
            )
        )
    for name, (call, reads, cost, when) in EXTRA.items():
        out.append(Row(name, name, call, "wrappers", reads, cost, [], when))
    covered = {r.public for r in out}
    uncovered = [n for n in ob.weightings.__all__ if n not in covered]
    if uncovered:
        raise RuntimeError(
            f"public weightings {uncovered} have no row on the Which method page: add a "
            "registry entry (tests/methods.py) and its GUIDE line, or an EXTRA row"
        )
    order = {f: i for i, f in enumerate((*_FAMILIES, "wrappers"))}
    return sorted(out, key=lambda r: order[r.family])  # stable: registry order within


# --------------------------------------------------------------------------------------
# Measured figures from benchmarks/RESULTS.md.
# --------------------------------------------------------------------------------------


def _table_rows(section: str) -> list[dict[str, str]]:
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    if len(lines) < 3:
        return []
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, [c.strip() for c in ln.strip("|").split("|")], strict=False))
        for ln in lines[2:]
    ]


def measured(results: pathlib.Path | None = None) -> tuple[str, dict[str, list[str]]]:
    """A sentence naming the run, and per method name the figures quoted from RESULTS.md.

    Quoted: the train step against the equal-weight step at T=8 (section "Train-step
    overhead"), the update against the one-pass floor at T=8, P=1e6 ("Aggregation
    cost"), and the one-backward step against the plain summed loss at T=8 ("Loss-based
    methods: the cost of one backward pass"), whichever the file holds.
    """
    path = results or ROOT / "benchmarks" / "RESULTS.md"
    if not path.exists():
        return "benchmarks/RESULTS.md is absent: no measured figures.", {}
    text = path.read_text()
    meta = {}  # the two-column table of the run (date, CPU, cores) before the sections
    for ln in text.split("\n## ", 1)[0].splitlines():
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if ln.startswith("|") and len(cells) == 2:
            meta[cells[0]] = cells[1]
    sections = {}
    for part in text.split("\n## ")[1:]:
        title, _, body = part.partition("\n")
        sections[re.sub(r"^\d+\.\s*", "", title.strip())] = body
    figures: dict[str, list[str]] = {}

    def add(name: str, figure: str) -> None:
        figures.setdefault(name, []).append(figure)

    for r in _table_rows(sections.get("Train-step overhead", "")):
        if r.get("T") == "8" and r.get("ratio"):
            add(r["method"], f"step {r['ratio']}x the equal-weight step (T=8)")
    for r in _table_rows(sections.get("Aggregation cost against the one-pass floor", "")):
        if r.get("T") == "8" and r.get("P") == "1e+06" and r.get("ours/floor"):
            add(r["method"], f"update {r['ours/floor']}x the one-pass floor (T=8, P=1e6)")
    for title, body in sections.items():
        if title.startswith("Loss-based methods"):
            for r in _table_rows(body):
                cell = r.get("T=8: ms (median, best x plain)", "")
                m = re.search(r"\(([0-9.]+)x", cell)
                if m and r.get("method", "").split(" ")[0] != "plain":
                    add(r["method"], f"step {m.group(1)}x the plain summed-loss step (T=8)")
    stale = "**Stale" in text
    where = (
        f"the run of {meta.get('date (UTC)', '?')} on {meta.get('CPU', '?')} "
        f"({meta.get('cores (usable)', '?').split(' ')[0]} cores)"
    )
    note = f"Measured: `benchmarks/RESULTS.md`, {where}"
    if stale:
        note += ", which the file itself marks stale (`make bench` regenerates it)"
    note += ". An empty cell: that run did not time the method."
    return note, figures
