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
# Pages included by others (not documents of their own).
exclude_patterns = ["_build", "_concepts_intro.md", "_generated/which_method_table.md"]
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
        (HERE / "_concepts_intro.md").read_text(),
        [  # then every README section not placed elsewhere, in README order
            "Conventions",
            "Task heads: marking parameters as not shared",
            "Loss-based methods: one backward pass",
            "Two mini-batches (SDMGrad, MoDo)",
            "Balancing at the memory of one gradient",
            "Balancing at the shared representation (EnCodec, MGDA-UB)",
            "Many devices",
        ],
    ),
    "guides": (
        "Guides",
        "Using a method with Flax, logging and checkpointing it, accumulating gradients, "
        "and the mistakes the library catches.",
        [
            "Flax NNX",
            "Logging task weights",
            "Checkpointing",
            "Gradient accumulation and optax's aggregation API",
            "Common mistakes",
        ],
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

    body = re.sub(r"!\[([^\]]*)\]\(docs/([^)\s]+)\)", r"![\1](../\2)", body)
    return re.sub(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)", link, body)


def write_guide_pages() -> None:
    _, sections = _sections(README.read_text())
    placed = {s for _, _, names in PAGES.values() for s in names}
    PAGES["concepts"][2][:] += [t for t, _ in sections if t not in placed and t not in _SKIP]
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
    for stale in out.iterdir():  # pages an older conf.py wrote must not linger as documents
        if stale.is_file():
            stale.unlink()
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
# The "Which method" table, from the test registry (tests/methods.py), the public
# weightings' `needs` and benchmarks/RESULTS.md (docs/_method_guide.py): a method in the
# registry or in `ob.weightings` without a row fails the build.
# --------------------------------------------------------------------------------------

_SECTION_TITLES = {
    "losses only": "Losses only: one backward pass",
    "gradient norms": "Gradient norms: T backward passes",
    "Gramian": "The Gramian: T backward passes",
    "two batches": "Two mini-batches: 2T backward passes",
    "stacked gradients": "The stacked gradients themselves: T backward passes",
    "wrappers": "Wrappers",
}


def write_which_method_table() -> None:
    import sys

    sys.path.insert(0, str(HERE))
    import _method_guide

    note, figures = _method_guide.measured()
    lines = []
    family = None
    for row in _method_guide.rows():
        if row.family != family:
            family = row.family
            lines += [
                "",
                f"### {_SECTION_TITLES[family]}",
                "",
                "| method | reads | cost per step | measured | guarantees | pick it when |",
                "|---|---|---|---|---|---|",
            ]
        cells = [
            f"`{row.call}`",
            row.reads,
            row.cost,
            "; ".join(figures.get(row.name, [])),
            ", ".join(row.guarantees),
            row.when,
        ]
        if any("|" in c for c in cells):
            raise RuntimeError(f"a '|' in the Which method row of {row.name}")
        lines.append("| " + " | ".join(cells) + " |")
    (HERE / "_generated" / "which_method_table.md").write_text(
        note + "\n" + "\n".join(lines) + "\n"
    )


write_which_method_table()
