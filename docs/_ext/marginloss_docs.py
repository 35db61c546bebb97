"""Build-time steps of the marginloss documentation (a local Sphinx extension).

On ``builder-inited`` it writes into ``docs/_generated/`` (ignored by git):

* ``changelog.rst.inc`` — ``CHANGELOG.md`` converted to reStructuredText, so the changelog
  has one source and the docs need no Markdown parser;
* ``benchmarks.rst.inc`` — every ``benchmarks/results/*.md`` converted the same way, with
  the result plots copied next to it, or a note on how to produce them when there are none;
* ``decision_boundaries.png`` and ``target_logits.png`` — drawn by
  ``docs/scripts/decision_boundaries.py`` from :mod:`marginloss.functional` itself, redrawn
  only when the script or the functional module is newer than the figures.

The Markdown converter handles what those files use (headings, paragraphs, bullet and
numbered lists, pipe tables, fenced code, inline code, links, images, emphasis).  Its
output is parsed with docutils before it is used; should anything not convert cleanly, the
file is shown verbatim instead, so a new result format never breaks a ``-W`` build.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent.parent
ROOT = DOCS.parent
GENERATED = DOCS / "_generated"
RESULTS = ROOT / "benchmarks" / "results"
FIGURE_SCRIPT = DOCS / "scripts" / "decision_boundaries.py"
FIGURES = ("decision_boundaries.png", "target_logits.png")

_HEADING_CHARS = "=-~^\"'"
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^(\s*)([-*+])\s+(.*)$")
_NUMBERED = re.compile(r"^(\s*)(\d+)[.)]\s+(.*)$")
_FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)\s*$")
_TABLE_SEPARATOR = re.compile(r"^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$")
_IMAGE_LINE = re.compile(r"^\s*!\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)\s*$")


# ---------------------------------------------------------------- Markdown -> reST


def _inline(text: str, image_prefix: str = "") -> str:
    """Convert Markdown inline markup of one line to reST."""
    pieces = re.split(r"(`+[^`]+?`+)", text)
    out = []
    for index, piece in enumerate(pieces):
        if index % 2 == 1:  # a code span
            code = piece.strip("`").strip()
            if not code:
                out.append(piece)
                continue
            # reST markup must be set off from words: "x``a``" and "``a``s" need "\ ".
            before = "\\ " if index > 0 and re.search(r"\w$", pieces[index - 1]) else ""
            after = "\\ " if index + 1 < len(pieces) and re.match(r"\w", pieces[index + 1]) else ""
            out.append(f"{before}``{code}``{after}")
            continue
        piece = re.sub(
            r"!\[([^\]]*)\]\(([^)\s]+)\)",
            lambda m: f"{m.group(1) or 'figure'} ({image_prefix}{m.group(2)})",
            piece,
        )
        piece = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r"`\1 <\2>`__", piece)
        piece = re.sub(r"(?<![\w*])_([^_\s][^_]*?)_(?![\w*])", r"*\1*", piece)
        piece = re.sub(r"(\*\*[^*\s][^*]*\*\*|`__)(?=\w)", r"\1\\ ", piece)
        out.append(piece)
    return "".join(out)


def _split_row(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    cells = re.split(r"(?<!\\)\|", line)
    return [cell.strip().replace("\\|", "|") for cell in cells]


def _table(rows: list[list[str]], image_prefix: str) -> list[str]:
    width = max(len(row) for row in rows)
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for row in rows:
        row = row + [""] * (width - len(row))
        for index, cell in enumerate(row):
            marker = "   * - " if index == 0 else "     - "
            text = _inline(cell, image_prefix) if cell else "\\"
            lines.append(marker + text)
    lines.append("")
    return lines


def markdown_to_rst(markdown: str, *, top_level: int = 0, image_prefix: str = "") -> str:
    """Convert the Markdown of a changelog or a results file to reStructuredText.

    Parameters
    ----------
    markdown : str
        The Markdown text.
    top_level : int, default 0
        The reST section level of the file's highest Markdown heading (0 = ``=``, 1 = ``-``,
        ...).  The heading levels present are renumbered consecutively from there, so a
        file that starts at ``###`` still nests correctly under the including page.
    image_prefix : str, default ""
        Prepended to relative image paths (e.g. ``/_generated/benchmarks/``).

    Examples
    --------
    >>> print(markdown_to_rst("# Log\\n\\n## 0.1\\n\\n- Added `ArcFace`.\\n"))
    Log
    ===
    <BLANKLINE>
    0.1
    ---
    <BLANKLINE>
    - Added ``ArcFace``.
    <BLANKLINE>
    """
    lines = markdown.replace("\r\n", "\n").split("\n")
    levels = sorted({len(m.group(1)) for m in map(_HEADING.match, lines) if m})
    level_of = {level: top_level + rank for rank, level in enumerate(levels)}
    out: list[str] = []
    index = 0
    in_list = False

    def blank() -> None:
        if out and out[-1] != "":
            out.append("")

    while index < len(lines):
        line = lines[index]
        fence = _FENCE.match(line)
        if fence:
            blank()
            language = fence.group(2)
            out.append(f".. code:: {language}" if language else "::")
            out.append("")
            index += 1
            while index < len(lines) and not _FENCE.match(lines[index]):
                out.append("   " + lines[index] if lines[index].strip() else "")
                index += 1
            index += 1
            out.append("")
            in_list = False
            continue
        heading = _HEADING.match(line)
        if heading:
            blank()
            title = _inline(heading.group(2))
            char = _HEADING_CHARS[min(level_of[len(heading.group(1))], len(_HEADING_CHARS) - 1)]
            out += [title, char * max(len(title), 3), ""]
            index += 1
            in_list = False
            continue
        if (
            "|" in line
            and index + 1 < len(lines)
            and "|" in lines[index + 1]
            and _TABLE_SEPARATOR.match(lines[index + 1])
        ):
            blank()
            rows = [_split_row(line)]
            index += 2
            while index < len(lines) and lines[index].strip().startswith("|"):
                rows.append(_split_row(lines[index]))
                index += 1
            out += _table(rows, image_prefix)
            in_list = False
            continue
        image = _IMAGE_LINE.match(line)
        if image:
            blank()
            target = image.group(2)
            if not re.match(r"^[a-z]+://|^/", target):
                target = image_prefix + target
            out += [f".. image:: {target}", f"   :alt: {image.group(1) or 'figure'}", ""]
            index += 1
            in_list = False
            continue
        item = _BULLET.match(line) or _NUMBERED.match(line)
        if item and not re.match(r"^\s*([-*_])(\s*\1){2,}\s*$", line):
            if not in_list:
                blank()
            indent = "  " * (len(item.group(1).expandtabs(4)) // 2)
            marker = "-" if _BULLET.match(line) else "#."
            if indent and out and out[-1] != "":
                out.append("")
            out.append(f"{indent}{marker} {_inline(item.group(3), image_prefix)}")
            in_list = True
            index += 1
            continue
        if not line.strip():
            blank()
            in_list = False
            index += 1
            continue
        if re.match(r"^\s*([-*_])(\s*\1){2,}\s*$", line):  # a Markdown rule
            blank()
            index += 1
            continue
        if in_list:  # continuation line of a list item
            previous = out[-1]
            hang = len(previous) - len(previous.lstrip()) + (3 if previous.lstrip().startswith("#.") else 2)
            out.append(" " * hang + _inline(line.strip(), image_prefix))
        else:
            out.append(_inline(line.strip(), image_prefix))
        index += 1
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def rst_problems(rst: str) -> list[str]:
    """Warnings and errors docutils reports on ``rst`` (empty when it parses cleanly)."""
    from docutils.core import publish_doctree

    stream = io.StringIO()
    publish_doctree(
        rst,
        settings_overrides={
            "report_level": 2,
            "halt_level": 5,
            "warning_stream": stream,
            "file_insertion_enabled": False,
            "raw_enabled": False,
        },
    )
    return [line for line in stream.getvalue().splitlines() if line.strip()]


def _literal(text: str, title: str | None = None) -> str:
    head = [title, "~" * len(title), ""] if title else []
    body = ["::", ""] + ["   " + line if line.strip() else "" for line in text.splitlines()]
    return "\n".join(head + body) + "\n"


def convert_or_literal(markdown: str, *, top_level: int = 0, image_prefix: str = "") -> str:
    """:func:`markdown_to_rst`, or the Markdown as a literal block if that does not parse."""
    rst = markdown_to_rst(markdown, top_level=top_level, image_prefix=image_prefix)
    return rst if not rst_problems(rst) else _literal(markdown)


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


def write_changelog() -> None:
    source = ROOT / "CHANGELOG.md"
    text = source.read_text(encoding="utf-8") if source.exists() else "# Changelog\n"
    _write_if_changed(GENERATED / "changelog.rst.inc", convert_or_literal(text).encode())


def _prefer_full_runs(paths: list[Path]) -> list[Path]:
    """Drop a ``--quick`` run's ``<name>-quick.<ext>`` / ``<name>_quick.<ext>`` where the full
    run's ``<name>.<ext>`` exists."""
    names = {path.name for path in paths}

    def superseded(path: Path) -> bool:
        full = re.sub(r"[-_]quick$", "", path.stem)
        return full != path.stem and f"{full}{path.suffix}" in names

    return [path for path in paths if not superseded(path)]


def benchmark_include(results: Path = RESULTS, prefix: str = "/_generated/benchmarks/") -> tuple[str, list[Path]]:
    """The reST for the benchmark page and the images it needs, from ``results``.

    Every ``*.md`` becomes a section of tables under the page's "Results" section; every
    ``*.png`` that no Markdown file shows is added as a figure.  A ``--quick`` run's files
    (``cpu-quick.md``, ``distributed_memory_quick.md``) are left out where a full run's exist.
    """
    reports = _prefer_full_runs(sorted(results.glob("*.md"))) if results.is_dir() else []
    images = _prefer_full_runs(sorted(results.glob("*.png"))) if results.is_dir() else []
    if not reports and not images:
        return "", []
    parts: list[str] = []
    shown: set[str] = set()
    for report in reports:
        markdown = report.read_text(encoding="utf-8")
        references = re.findall(r"!\[[^\]]*\]\(([^)\s]+)", markdown)
        shown.update(references)
        if any(not (results / name).is_file() for name in references if "://" not in name):
            # An image that is not in the results folder would be a broken reference.
            parts.append(_literal(markdown, f"``benchmarks/results/{report.name}``"))
            continue
        # Level 2 (~) is a subsection of the page's "Results"; a file that does not start
        # with a heading gets its name as one, and its own headings go a level deeper.
        titled = re.match(r"^#{1,6}\s", markdown.lstrip()) is not None
        body = convert_or_literal(markdown, top_level=2 if titled else 3, image_prefix=prefix)
        if not titled:
            title = f"``benchmarks/results/{report.name}``"
            body = f"{title}\n{'~' * len(title)}\n\n{body}"
        parts.append(body)
    for image in images:
        if image.name not in shown:
            parts.append(
                f".. figure:: {prefix}{image.name}\n   :alt: {image.stem}\n   :width: 100%\n\n"
                f"   ``benchmarks/results/{image.name}``\n"
            )
    return "\n".join(parts), images


def write_benchmarks() -> None:
    rst, images = benchmark_include()
    target = GENERATED / "benchmarks"
    target.mkdir(exist_ok=True)
    for image in images:
        _write_if_changed(target / image.name, image.read_bytes())
    keep = {image.name for image in images}
    for stale in target.glob("*.png"):
        if stale.name not in keep:
            stale.unlink()
    if not rst:
        rst = (
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
    inputs = [FIGURE_SCRIPT, ROOT / "marginloss" / "functional.py"]
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
    write_changelog()
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


def _process_docstring(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    lines[:] = shape_sections(lines)


def setup(app: Any) -> dict[str, Any]:
    app.connect("builder-inited", _generate)
    # Before napoleon (priority 500) converts the numpy sections.
    app.connect("autodoc-process-docstring", _process_docstring, priority=400)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}


