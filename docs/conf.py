"""Sphinx configuration of the marginloss documentation.

Build with ``make docs`` (HTML in nitpicky mode and the doctest run, warnings as errors).
The version comes from ``marginloss.__version__``, the one place it is written.  The
changelog and the benchmark results are Markdown files read by myst-parser; the figures
are drawn at build time by the local extension ``_ext/marginloss_docs.py``.  The build needs
no network: MathJax is served from the package sphinx-mathjax-offline, and the intersphinx
inventories of Python and PyTorch are written locally by the extension.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))
sys.path.insert(0, str(ROOT))

import marginloss  # noqa: E402  (after the path set-up: documents the source tree)

# ---------------------------------------------------------------- project

project = "marginloss"
author = "marginloss developers"
# The copyright line of the LICENSE, so the two cannot disagree.
_license = (ROOT / "LICENSE").read_text(encoding="utf-8")
_holder = re.search(r"Copyright \(c\) (.+)", _license)
copyright = _holder.group(1).strip() if _holder else author
release = marginloss.__version__
version = ".".join(release.split(".")[:2])

# ---------------------------------------------------------------- general

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax 3 copied into _static: math renders without a network
    "sphinx.ext.viewcode",
    "sphinx.ext.intersphinx",
    "myst_parser",  # CHANGELOG.md and benchmarks/results/*.md, read as they are
    "sphinx_copybutton",
    "sphinxcontrib.bibtex",
    "marginloss_docs",
]
source_suffix = {".rst": "restructuredtext"}  # Markdown only where included explicitly
exclude_patterns = ["_build", "_generated", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
default_role = "code"
pygments_style = "sphinx"
pygments_dark_style = "monokai"

# ---------------------------------------------------------------- autodoc + napoleon

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_default_options = {"members": True}
autodoc_inherit_docstrings = False
autoclass_content = "class"
autodoc_preserve_defaults = True
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_ivar = True
# "Shape:" paragraphs become this section (see _ext/marginloss_docs.py, shape_sections).
napoleon_custom_sections = ["Shape"]
# Parse "int, default 1000" / "{"mean", "sum"}, optional" as a type followed by annotations,
# so only the type becomes a cross-reference (and is checked in nitpicky mode).
napoleon_preprocess_types = True
napoleon_type_aliases = {
    "callable": "collections.abc.Callable",
    "sequence": "collections.abc.Sequence",
    "iterable": "collections.abc.Iterable",
}

# ---------------------------------------------------------------- cross-references
# Nitpicky: every reference must resolve (``make docs`` and CI build with -n -W).  The build
# runs without a network, so the inventories of Python and PyTorch are written at build time
# by ``_ext/marginloss_docs.py`` from its table of the external objects these pages name
# (``EXTERNAL_OBJECTS``, each with its address in the official documentation).

nitpicky = True
nitpick_ignore = [
    # marginloss.fused's alias of the chunk_size argument (an int, "auto" or None), spelled
    # out in every docstring that takes it.
    ("py:class", "ChunkSize"),
    # register_head's type variable (a MarginHead subclass in, the same class out).
    ("py:class", "marginloss.heads.base.HeadT"),
]
# Napoleon splits a numpy type at every ", ", so the halves of an interval ("float in (0, 1]")
# and of a generic ("dict[float, float]") reach Sphinx as class names: they are text, not
# references.  Anything else unresolved is an error.
nitpick_ignore_regex = [
    ("py:class", r"(int|float) in [\[(][^\])]*"),  # "float in (0" of "float in (0, 1]"
    ("py:class", r"\(?[-+]?[0-9.]+(e[-+]?[0-9]+)?[\])]?\)?"),  # "1]", "(1e-1", "1e-4)"
    ("py:class", r"(dict|list|tuple)\[\w+"),  # "dict[float" of "dict[float, float]"
    ("py:class", r"\w+\]+"),  # "float]"
]
# References that do not resolve yet, each in a docstring under marginloss/ or an API page
# being rewritten: one "role target" per line in nitpick-pending.txt.  Delete a line when its
# source is fixed (tests/test_docs.py fails on a line whose target no longer occurs anywhere).
nitpick_ignore += [
    tuple(line.split(None, 1))  # type: ignore[misc]
    for line in (DOCS / "nitpick-pending.txt").read_text(encoding="utf-8").splitlines()
    if line.strip() and not line.startswith("#")
]

intersphinx_mapping = {
    "python": ("https://docs.python.org/3", str(DOCS / "_generated" / "python.inv")),
    "torch": ("https://docs.pytorch.org/docs/stable", str(DOCS / "_generated" / "torch.inv")),
}

# ---------------------------------------------------------------- bibliography

bibtex_bibfiles = ["references.bib"]
bibtex_default_style = "plain"
bibtex_reference_style = "author_year"

# ---------------------------------------------------------------- Markdown (myst-parser)

myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]

# ---------------------------------------------------------------- copy button
# Copy what a user types: no ">>> "/"... " prompts, no "$ " of console blocks, no output.

copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True
copybutton_only_copy_prompt_lines = True
copybutton_line_continuation_character = "\\"  # a console line ending in \ continues below

# ---------------------------------------------------------------- doctest
# The guide's ``.. doctest::`` / ``.. testcode::`` blocks run here.  The ``>>>`` examples
# of the docstrings shown in the API pages run under pytest (``--doctest-modules``) in
# their module's namespace, so the doctest builder leaves plain ``>>>`` blocks alone.

doctest_test_doctest_blocks = ""
# One thread: the examples are tiny, and on a busy machine (CI on two shared cores) the
# thread pool's synchronisation would cost more than the work itself.
doctest_global_setup = """
import torch
import marginloss
torch.set_num_threads(1)
torch.manual_seed(0)
"""

# ---------------------------------------------------------------- HTML

html_theme = "furo"
html_title = f"marginloss {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_show_sourcelink = False
html_theme_options = {
    "source_repository": "https://github.com/marginloss/marginloss",
    "source_branch": "main",
    "source_directory": "docs/",
}
