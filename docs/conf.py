"""Sphinx configuration: the site is built from the docstrings, README.md and these pages.

``make docs`` builds it into ``docs/_build/html`` with warnings as errors (``-W``); the test
suite builds it too (``tests/test_docs.py``), so a docstring or a README link that breaks
it fails CI.

README.md is the one source of the guide: at build time its ``##`` sections are written
into the pages that ``PAGES`` names (``docs/_generated/``), with links rewritten for the
site (a link to another section points at the page that now holds it; a link to a file
of the repository becomes the file's path in code).
"""

from __future__ import annotations

import pathlib
import re

import optax_balance

project = "optax_balance"
author = "optax_balance developers"
copyright = "2026, optax_balance developers"
release = optax_balance.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "none"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"optax_balance {release}"
html_static_path = ["_static"]

# --------------------------------------------------------------------------------------
# The guide pages, from README.md.
# --------------------------------------------------------------------------------------

HERE = pathlib.Path(__file__).resolve().parent
README = HERE.parent / "README.md"

# page -> (title, intro, README sections in order). Every README section must be on a
# page (the build fails otherwise), so a new section cannot silently go missing.
PAGES: dict[str, tuple[str, str, list[str]]] = {
    "getting_started": (
        "Getting started",
        "",
        ["Install", "Quickstart", "Write your own method"],
    ),
    "methods_table": ("The methods", "", ["Methods"]),
    "concepts": (
        "Concepts",
        "How the library sees a multi-task step: the data it takes, the state it keeps, "
        "and the ways to run a method (stacked gradients, the losses alone, the memory of "
        "one gradient, a shared representation, many devices).",
        [],  # filled below: every section not placed elsewhere, in README order
    ),
    "examples": ("Examples", "", ["Examples"]),
    "benchmarks": ("Benchmarks", "", ["Benchmarks"]),
}
_SKIP = {"License"}


def _slug(title: str) -> str:
    """MyST's (GitHub's) heading anchor."""
    s = re.sub(r"[^\w\- ]", "", title.strip().lower())
    return s.replace(" ", "-")


def _sections(text: str) -> tuple[str, list[tuple[str, str]]]:
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return parts[0], [(parts[i].strip(), parts[i + 1]) for i in range(1, len(parts), 2)]


def _rewrite(body: str, where: dict[str, str], page: str) -> str:
    def link(m: re.Match) -> str:
        text, target = m.group(1), m.group(2)
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            return m.group(0)
        if target.startswith("#"):
            home = where.get(target[1:], page)
            return f"[{text}]({target})" if home == page else f"[{text}]({home}.md{target})"
        return f"{text} (`{target}`)" if text.strip("`") != target else f"`{target}`"

    return re.sub(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)", link, body)


def write_guide_pages() -> None:
    _, sections = _sections(README.read_text())
    placed = {s for _, _, names in PAGES.values() for s in names}
    PAGES["concepts"][2][:] = [t for t, _ in sections if t not in placed and t not in _SKIP]
    titles = [t for t, _ in sections]
    for _, _, names in PAGES.values():
        for name in names:
            if name not in titles:
                raise RuntimeError(
                    f"docs/conf.py PAGES names a README section {name!r} that is gone"
                )
    where = {}
    for page, (_, _, names) in PAGES.items():
        for name in names:
            where[_slug(name)] = page
            body = dict(sections)[name]
            for sub in re.findall(r"^### (.+)$", body, flags=re.M):
                where[_slug(sub)] = page
    out = HERE / "_generated"
    out.mkdir(exist_ok=True)
    bodies = dict(sections)
    for page, (title, intro, names) in PAGES.items():
        text = [f"# {title}\n", intro + "\n" if intro else ""]
        text += [f"## {n}\n{_rewrite(bodies[n], where, page)}" for n in names]
        (out / f"{page}.md").write_text("\n".join(text))


write_guide_pages()


# --------------------------------------------------------------------------------------
# The API reference, from __all__: every public name, grouped by the family its module
# belongs to, so a new method appears without editing the docs.
# --------------------------------------------------------------------------------------

_FAMILIES = [
    ("_gramian", "Methods on the Gramian"),
    ("_norm", "Methods on gradient norms"),
    ("_loss", "Methods on the losses alone (one backward pass)"),
    ("_jacobian", "Methods on the stacked gradients"),
    ("_wrappers", "Wrappers"),
    ("_core", "Building blocks"),
    ("", "Helpers"),
]


def write_api_page() -> None:
    import inspect

    import optax_balance as ob

    groups: dict[str, list[str]] = {title: [] for _, title in _FAMILIES}
    states: list[str] = []
    for name in ob.__all__:
        obj = getattr(ob, name)
        if inspect.ismodule(obj):
            continue
        if inspect.isclass(obj) and name.endswith(("State", "Stats")) and name != "Stats":
            states.append(name)
            continue
        module = getattr(obj, "__module__", "")
        for key, title in _FAMILIES:
            if f"optax_balance.{key}." in module + "." or key == "":
                groups[title].append(name)
                break
    lines = [
        "API reference",
        "=============",
        "",
        "Every public name of ``optax_balance`` (imported as ``ob``) and of",
        "``optax_balance.weightings``.",
        "",
        ".. currentmodule:: optax_balance",
        "",
    ]

    def entry(name: str, obj: object, prefix: str = "") -> list[str]:
        kind = "autoclass" if inspect.isclass(obj) else "autofunction"
        return [f".. {kind}:: {prefix}{name}", ""]

    for title, names in groups.items():
        if not names:
            continue
        lines += [title, "-" * len(title), ""]
        for name in names:
            lines += entry(name, getattr(ob, name))
    lines += ["States", "------", ""]
    for name in states:
        lines += entry(name, getattr(ob, name))
    lines += [
        "Weightings",
        "----------",
        "",
        ".. automodule:: optax_balance.weightings",
        "",
    ]
    for name in ob.weightings.__all__:
        lines += entry(name, getattr(ob.weightings, name), "optax_balance.weightings.")
    (HERE / "_generated" / "api.rst").write_text("\n".join(lines))


write_api_page()


# --------------------------------------------------------------------------------------
# The properties table of "Which method", from the test registry (tests/methods.py): the
# same flags the property suite checks, so the page claims what the tests verify.
# --------------------------------------------------------------------------------------


def _needs_text(needs: tuple[str, ...]) -> str:
    if needs == ("losses",):
        return "losses only"
    parts = []
    if "cross_gram" in needs:
        parts.append("two batches' Gramian")
    if "gram" in needs:
        parts.append("Gramian")
    if "leaf_gram" in needs:
        parts.append("per-leaf Gramians")
    if {"sq_norms", "item_sq_norms"} & set(needs):
        parts.append("norms")
    if "leaf_sq_norms" in needs:
        parts.append("per-leaf norms")
    if "grads" in needs:
        parts.append("stacked gradients")
    if "losses" in needs:
        parts.append("losses")
    return " + ".join(parts)


def write_properties_table() -> None:
    import sys

    sys.path.insert(0, str(HERE.parent))
    from tests.methods import METHODS

    yes = "yes"
    rows = [
        "| registry entry | reads | non-conflicting | permutation-invariant | "
        "homogeneous | per-task scale-invariant | random |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in METHODS:
        tx = m.make(3) if getattr(m, "min_tasks", 1) <= 3 else m.make(m.min_tasks)
        needs = tx.weighting.needs
        scale = "weights" if m.scale_invariant_weights else ""
        scale = "output" if m.scale_invariant_output else scale
        rows.append(
            f"| `{m.name}` | {_needs_text(needs)} | {yes if m.non_conflicting else ''} | "
            f"{yes if m.permutation_invariant else ''} | {yes if m.homogeneous else ''} | "
            f"{scale} | {yes if m.stochastic else ''} |"
        )
    (HERE / "_generated" / "properties.md").write_text("\n".join(rows) + "\n")


write_properties_table()
