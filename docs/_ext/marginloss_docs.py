"""Build-time steps of the marginloss documentation (a local Sphinx extension).

On ``builder-inited`` it writes into ``docs/_generated/`` (ignored by git):

* ``python.inv`` and ``torch.inv`` — intersphinx inventories of the Python and PyTorch
  objects these pages refer to (:data:`EXTERNAL_OBJECTS`), so cross-references to
  ``torch.Tensor`` or ``collections.abc.Callable`` resolve, link to the official pages and
  are checked in nitpicky mode, with no network at build time;
* ``benchmarks/`` — the plots of ``benchmarks/results/`` (the page includes the Markdown
  tables themselves with myst-parser, so a file that does not parse fails the build);
* ``decision_boundaries.png``, ``decision_boundaries_adaptive.png``, ``target_logits.png`` and
  ``target_logits_adaptive.png`` —
  drawn by ``docs/scripts/decision_boundaries.py`` from :mod:`marginloss.functional` itself,
  redrawn only when the script, the functional module or a head's module (where the
  functional forms live) is newer than the figures.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent.parent
ROOT = DOCS.parent
GENERATED = DOCS / "_generated"
RESULTS = ROOT / "benchmarks" / "results"
FIGURE_SCRIPT = DOCS / "scripts" / "decision_boundaries.py"
FIGURES = (
    "decision_boundaries.png", "decision_boundaries_adaptive.png", "target_logits.png", "target_logits_adaptive.png",
)

# ---------------------------------------------------------------- intersphinx inventories

_PY_LIB = "library/"
#: External objects the docs and docstrings name: inventory -> {(role, name): page#anchor}.
#: The addresses are those of docs.python.org/3 and docs.pytorch.org/docs/stable; add a
#: name here when nitpicky mode reports it unresolved.
EXTERNAL_OBJECTS: dict[str, dict[tuple[str, str], str]] = {
    "python": {
        **{("py:class", name): f"{_PY_LIB}functions.html#{name}"
           for name in ("int", "float", "str", "bool", "tuple", "list", "dict", "slice", "range")},
        **{("py:data", name): f"{_PY_LIB}constants.html#{name}" for name in ("None", "True", "False")},
        ("py:class", "None"): f"{_PY_LIB}constants.html#None",
        **{("py:class", f"collections.abc.{name}"): f"{_PY_LIB}collections.abc.html#collections.abc.{name}"
           for name in ("Callable", "Iterable", "Iterator", "Sequence", "Mapping")},
        **{("py:exception", name): f"{_PY_LIB}exceptions.html#{name}"
           for name in ("ValueError", "TypeError", "RuntimeError", "KeyError")},
        ("py:class", "typing.Any"): f"{_PY_LIB}typing.html#typing.Any",
        ("py:class", "pathlib.Path"): f"{_PY_LIB}pathlib.html#pathlib.Path",
        ("py:function", "math.log"): f"{_PY_LIB}math.html#math.log",
    },
    "torch": {
        ("py:class", "torch.Tensor"): "tensors.html#torch.Tensor",
        # As the modules' annotations say it (``from torch import Tensor``).
        ("py:class", "Tensor"): "tensors.html#torch.Tensor",
        ("py:class", "ProcessGroup"): "distributed.html#groups",
        ("py:class", "torch.device"): "tensor_attributes.html#torch.device",
        ("py:class", "torch.dtype"): "tensor_attributes.html#torch.dtype",
        ("py:class", "torch.Generator"): "generated/torch.Generator.html#torch.Generator",
        ("py:class", "torch.autocast"): "amp.html#torch.autocast",
        ("py:function", "torch.autocast"): "amp.html#torch.autocast",
        ("py:function", "torch.compile"): "generated/torch.compile.html#torch.compile",
        ("py:function", "torch.tensor_split"): "generated/torch.tensor_split.html#torch.tensor_split",
        ("py:function", "torch.set_num_threads"): "generated/torch.set_num_threads.html#torch.set_num_threads",
        ("py:function", "torch.autograd.grad"): "generated/torch.autograd.grad.html#torch.autograd.grad",
        ("py:function", "torch.autograd.gradcheck"): "generated/torch.autograd.gradcheck.gradcheck.html",
        ("py:class", "torch.autograd.Function"): "autograd.html#torch.autograd.Function",
        **{("py:class", f"torch.nn.{name}"): f"generated/torch.nn.{name}.html#torch.nn.{name}"
           for name in ("Module", "Linear", "CrossEntropyLoss", "BatchNorm1d", "Sequential")},
        ("py:class", "torch.nn.Parameter"): "generated/torch.nn.parameter.Parameter.html",
        ("py:class", "Parameter"): "generated/torch.nn.parameter.Parameter.html",
        ("py:class", "torch.utils.data.DataLoader"): "data.html#torch.utils.data.DataLoader",
        ("py:class", "torch.utils.data.distributed.DistributedSampler"):
            "data.html#torch.utils.data.distributed.DistributedSampler",
        ("py:method", "torch.utils.data.distributed.DistributedSampler.set_epoch"):
            "data.html#torch.utils.data.distributed.DistributedSampler",
        ("py:function", "torch.utils.checkpoint.checkpoint"): "checkpoint.html#torch.utils.checkpoint.checkpoint",
        ("py:function", "torch.distributed.init_process_group"):
            "distributed.html#torch.distributed.init_process_group",
        ("py:class", "torch.nn.parallel.DistributedDataParallel"):
            "generated/torch.nn.parallel.DistributedDataParallel.html",
        **{("py:function", f"torch.nn.functional.{name}"):
           f"generated/torch.nn.functional.{name}.html#torch.nn.functional.{name}"
           for name in ("linear", "cross_entropy", "mse_loss", "normalize", "softmax")},
        ("py:module", "torch.distributed"): "distributed.html#module-torch.distributed",
        ("py:class", "torch.distributed.ProcessGroup"): "distributed.html#groups",
        ("py:function", "torch.distributed.all_reduce"): "distributed.html#torch.distributed.all_reduce",
    },
}


def inventory_bytes(project: str, objects: dict[tuple[str, str], str]) -> bytes:
    """An intersphinx inventory (format version 2) of ``objects``: (role, name) -> address."""
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        "# Version: \n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    lines = [f"{name} {role} 1 {uri} -\n" for (role, name), uri in sorted(objects.items())]
    return header.encode() + zlib.compress("".join(lines).encode())


def write_inventories() -> None:
    for project, objects in EXTERNAL_OBJECTS.items():
        _write_if_changed(GENERATED / f"{project}.inv", inventory_bytes(project, objects))


# ---------------------------------------------------------------- generated files


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomic write that leaves an unchanged file (and its mtime) alone."""
    if path.exists() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _prepare_generated() -> None:
    GENERATED.mkdir(exist_ok=True)
    _write_if_changed(GENERATED / ".gitignore", b"# written by docs/_ext/marginloss_docs.py\n*\n")


def _prefer_full_runs(paths: list[Path]) -> list[Path]:
    """Drop a ``--quick`` run's ``<name>-quick.<ext>`` / ``<name>_quick.<ext>`` where the full
    run's ``<name>.<ext>`` exists."""
    names = {path.name for path in paths}

    def superseded(path: Path) -> bool:
        full = re.sub(r"[-_]quick$", "", path.stem)
        return full != path.stem and f"{full}{path.suffix}" in names

    return [path for path in paths if not superseded(path)]


def benchmark_include(results: Path = RESULTS, prefix: str = "/_generated/benchmarks/", source_dir: Path = DOCS) -> str:
    """The reST of the benchmark page's "Results" section, from the files in ``results``.

    Every ``*.md`` is included as Markdown (myst-parser: a file it cannot parse fails a
    ``-W`` build instead of being shown as raw text); every ``*.png`` follows as a figure.
    A ``--quick`` run's files are left out where a full run's exist.  Empty when there are
    no results.
    """
    if not results.is_dir():
        return ""
    reports = _prefer_full_runs(sorted(results.glob("*.md")))
    images = _prefer_full_runs(sorted(results.glob("*.png")))
    parts = []
    for report in reports:
        relative = os.path.relpath(report, source_dir).replace(os.sep, "/")  # "/" = the source folder
        parts.append(f".. include:: /{relative}\n   :parser: myst_parser.sphinx_\n")
    for image in images:
        parts.append(
            f".. figure:: {prefix}{image.name}\n   :alt: {image.stem}\n   :width: 100%\n\n"
            f"   ``benchmarks/results/{image.name}``\n"
        )
    return "\n".join(parts)


def write_benchmarks(results: Path = RESULTS) -> None:
    """Write the "Results" include and copy the plots next to it."""
    target = GENERATED / "benchmarks"
    target.mkdir(exist_ok=True)
    images = _prefer_full_runs(sorted(results.glob("*.png"))) if results.is_dir() else []
    for image in images:
        _write_if_changed(target / image.name, image.read_bytes())
    keep = {image.name for image in images}
    for stale in target.glob("*.png"):
        if stale.name not in keep:
            stale.unlink()
    rst = benchmark_include(results) or (
        ".. note::\n\n"
        "   No benchmark results are in ``benchmarks/results/`` yet.  Run ``make bench``\n"
        "   (or ``make bench-quick``) and rebuild the documentation: the tables and plots it\n"
        "   writes there appear on this page.\n"
    )
    _write_if_changed(GENERATED / "benchmarks.rst.inc", rst.encode())


def _newest_mtime(paths: Iterable[Path]) -> float:
    return max((path.stat().st_mtime for path in paths if path.exists()), default=0.0)


def write_figures() -> None:
    outputs = [GENERATED / name for name in FIGURES]
    inputs = [FIGURE_SCRIPT, ROOT / "marginloss" / "functional.py", *(ROOT / "marginloss" / "heads").glob("*.py")]
    if all(path.exists() for path in outputs) and min(
        path.stat().st_mtime for path in outputs
    ) >= _newest_mtime(inputs):
        return
    spec = importlib.util.spec_from_file_location("_decision_boundaries", FIGURE_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Draw into a private folder and move the files in whole: two builds running at once
    # (html and doctest in parallel tests) never read a half-written figure.
    with tempfile.TemporaryDirectory(dir=GENERATED) as private:
        module.main(["--out-dir", private])
        for name in FIGURES:
            os.replace(Path(private, name), GENERATED / name)


def _generate(app: Any) -> None:
    _prepare_generated()
    write_inventories()
    write_benchmarks()
    write_figures()


# ---------------------------------------------------------------- docstrings

_SHAPE_HEADER = re.compile(r"^Shape:\s*$")


def shape_sections(lines: list[str]) -> list[str]:
    """Turn the ``Shape:`` paragraph of a docstring into a numpy-style ``Shape`` section.

    The docstrings follow torch and kornia in writing ``Shape:`` with a colon; napoleon's
    numpy parser only ends the previous section (Parameters, Raises) at an underlined
    header, so without this the shapes would be read as one more parameter.

    Examples
    --------
    >>> shape_sections(["Parameters", "----------", "x : int", "", "Shape:", "    - x: (B)"])
    ['Parameters', '----------', 'x : int', '', 'Shape', '-----', '    - x: (B)']
    """
    out: list[str] = []
    for line in lines:
        if _SHAPE_HEADER.match(line):
            out += ["Shape", "-----"]
        else:
            out.append(line)
    return out


def _unlink_non_addresses(app: Any, doctree: Any) -> None:
    """Turn docutils' e-mail links whose domain has no dot back into text.

    docutils links any ``word@word``, so "TAR@FAR" (true-accept rate at a false-accept
    rate) became ``mailto:TAR@FAR``; a real address has a dotted domain.
    """
    from docutils import nodes

    for reference in list(doctree.findall(nodes.reference)):
        uri = reference.get("refuri", "")
        if uri.startswith("mailto:") and "." not in uri.rpartition("@")[2]:
            reference.replace_self(nodes.Text(reference.astext()))


def _process_docstring(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    lines[:] = shape_sections(lines)


def setup(app: Any) -> dict[str, Any]:
    # Before intersphinx (priority 500) reads the inventories.
    app.connect("builder-inited", _generate, priority=100)
    # Before napoleon (priority 500) converts the numpy sections.
    app.connect("autodoc-process-docstring", _process_docstring, priority=400)
    app.connect("doctree-read", _unlink_non_addresses)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}


