"""Sphinx configuration of the marginloss documentation.

Build with ``make docs`` (HTML and the doctest run, warnings as errors).  The version comes
from ``marginloss.__version__``, the one place it is written.  Changelog, benchmark tables
and figures are generated at build time by the local extension ``_ext/marginloss_docs.py``.
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
    "sphinx.ext.viewcode",
    "marginloss_docs",
]
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
