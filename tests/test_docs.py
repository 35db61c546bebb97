"""The documentation: it builds with warnings as errors, its code runs, it covers the API.

The Sphinx builds run in a subprocess into ``tmp_path`` (no network: no intersphinx).  The
doctest build executes every ``.. doctest::`` / ``.. testcode::`` block of the guide; the
``>>>`` examples of the docstrings shown in the API pages run under pytest's
``--doctest-modules`` in their own modules.  The local extension ``docs/_ext`` and the
figure script are tested directly.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import marginloss

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# Every module whose public names must each have an entry in the API reference.
DOCUMENTED_MODULES = ("functional", "metrics", "miners", "fused", "distributed", "sharding")
EXECUTABLE_DIRECTIVES = ("doctest", "testcode", "testoutput", "testsetup", "testcleanup")


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def docs_ext() -> ModuleType:
    return _load("marginloss_docs_under_test", DOCS / "_ext" / "marginloss_docs.py")


def _sphinx(builder: str, out: Path, doctrees: Path) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONHASHSEED"] = "0"
    env["OMP_NUM_THREADS"] = "1"  # tiny examples; a thread pool on busy cores only waits
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder,
         "-d", str(doctrees), str(DOCS), str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-8000:]}\n--- stderr\n{result.stderr[-8000:]}"


# ---------------------------------------------------------------- builds


def test_doctest_build_runs_the_guide_and_documents_every_public_name(tmp_path: Path) -> None:
    result = _sphinx("doctest", tmp_path / "doctest", tmp_path / "doctrees")
    assert result.returncode == 0, _explain(result)
    report = (tmp_path / "doctest" / "output.txt").read_text()
    assert "0 failures in tests" in report, report[-4000:]
    ran = sum(int(n) for n in re.findall(r"^\s*(\d+) tests$", report, flags=re.MULTILINE))
    assert ran >= 50, f"only {ran} doctests ran:\n{report[-4000:]}"

    # The environment the build pickled lists every object the API pages document.
    with open(tmp_path / "doctrees" / "environment.pickle", "rb") as file:
        env = pickle.load(file)
    documented = set(env.domaindata["py"]["objects"]) | set(env.domaindata["py"]["modules"])
    expected = {f"marginloss.{name}" for name in marginloss.__all__}
    for module in DOCUMENTED_MODULES:
        names = importlib.import_module(f"marginloss.{module}").__all__
        expected |= {f"marginloss.{module}.{name}" for name in names}
    missing = sorted(expected - documented)
    assert not missing, f"public names without an API entry: {missing}"


@pytest.mark.slow
def test_html_build_has_no_warnings(tmp_path: Path) -> None:
    result = _sphinx("html", tmp_path / "html", tmp_path / "doctrees")
    assert result.returncode == 0, _explain(result)
    html = tmp_path / "html"
    for page in ("index", "guide/choosing", "guide/benchmarks", "api/heads", "changelog"):
        assert (html / f"{page}.html").is_file(), page
    for figure in ("decision_boundaries.png", "target_logits.png"):
        assert (html / "_images" / figure).is_file(), figure
    choosing = (html / "guide" / "choosing.html").read_text(encoding="utf-8")
    assert "decision_boundaries.png" in choosing
    assert marginloss.__version__ in (html / "index.html").read_text(encoding="utf-8")


# ---------------------------------------------------------------- sources


def _guide_sources() -> list[Path]:
    return [DOCS / "index.rst", *sorted((DOCS / "guide").glob("*.rst"))]


@pytest.mark.parametrize("path", _guide_sources(), ids=lambda path: path.stem)
def test_guide_code_is_executed(path: Path) -> None:
    """Python in the guide sits in doctest/testcode blocks, so the doctest build runs it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    inside: int | None = None  # indentation of the executable directive we are in
    for number, line in enumerate(lines, start=1):
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if inside is not None and stripped and indent <= inside:
            inside = None
        directive = re.match(r"\.\. (\S+)::\s*(\S*)", stripped)
        if directive:
            if directive.group(1) in EXECUTABLE_DIRECTIVES:
                inside = indent
                continue
            language = directive.group(2).lower()
            assert not (directive.group(1) in ("code-block", "code", "sourcecode")
                        and language in ("python", "py", "pycon", "python3")), (
                f"{path.name}:{number}: Python in a {directive.group(1)} block is never run; "
                "use .. testcode:: or .. doctest::"
            )
        if inside is None and stripped.startswith(">>>"):
            raise AssertionError(
                f"{path.name}:{number}: '>>>' outside a .. doctest:: block is never run"
            )


def test_conf_reads_the_version_from_the_package() -> None:
    namespace = _load("docs_conf_under_test", DOCS / "conf.py")
    assert namespace.release == marginloss.__version__
    assert "sphinx.ext.doctest" in namespace.extensions
    assert "sphinx.ext.intersphinx" not in namespace.extensions  # the build needs no network
    assert namespace.html_theme == "furo"


def test_every_guide_page_is_in_the_toctree() -> None:
    index = (DOCS / "index.rst").read_text(encoding="utf-8")
    for page in sorted((DOCS / "guide").glob("*.rst")):
        assert f"guide/{page.stem}" in index, page.name
    api_index = (DOCS / "api" / "index.rst").read_text(encoding="utf-8")
    for page in sorted((DOCS / "api").glob("*.rst")):
        if page.stem != "index":
            assert f"   {page.stem}\n" in api_index, page.name


# ---------------------------------------------------------------- build-time steps


def test_markdown_to_rst_converts_what_changelogs_and_results_use(docs_ext: ModuleType) -> None:
    markdown = (
        "# Changelog\n\n"
        "## 0.2.0 (unreleased)\n\n"
        "- Added `SubCenterArcFace` and [docs](https://example.org/docs).\n"
        "- Fixed the *fallback* of **ArcFace**\n"
        "  for m > 0.5.\n"
        "  - nested detail\n\n"
        "### Results\n\n"
        "| method | time_ms | peak_mib |\n"
        "|:--|--:|--:|\n"
        "| `plain` | 12.5 | 100 |\n"
        "| fused |  | 4 |\n\n"
        "```bash\nmake bench\n```\n\n"
        "![plot](cpu.png)\n"
    )
    rst = docs_ext.markdown_to_rst(markdown, image_prefix="/_generated/benchmarks/")
    assert docs_ext.rst_problems(rst) == []
    assert "Changelog\n=========" in rst
    assert "0.2.0 (unreleased)\n------------------" in rst
    assert "Results\n~~~~~~~" in rst
    assert "``SubCenterArcFace``" in rst and "`docs <https://example.org/docs>`__" in rst
    assert ".. list-table::" in rst and "   * - ``plain``" in rst and "     - 12.5" in rst
    assert ".. code:: bash" in rst and "   make bench" in rst
    assert ".. image:: /_generated/benchmarks/cpu.png" in rst


def test_markdown_headings_are_renumbered_from_the_top_level(docs_ext: ModuleType) -> None:
    rst = docs_ext.markdown_to_rst("### Deep\n\ntext\n\n#### Deeper\n", top_level=1)
    assert rst.startswith("Deep\n----\n")
    assert "Deeper\n~~~~~~" in rst


def test_markdown_that_does_not_convert_is_shown_verbatim(docs_ext: ModuleType) -> None:
    broken = "| a | b |\n|---|---|\n| `unclosed | x |\n\n*dangling emphasis\n"
    assert docs_ext.rst_problems(docs_ext.markdown_to_rst(broken))  # docutils objects
    rst = docs_ext.convert_or_literal(broken)
    assert docs_ext.rst_problems(rst) == []
    assert rst.startswith("::") and "   *dangling emphasis" in rst


def test_benchmark_page_without_results_says_how_to_make_them(docs_ext: ModuleType, tmp_path: Path) -> None:
    rst, images = docs_ext.benchmark_include(tmp_path / "missing")
    assert (rst, images) == ("", [])


def test_benchmark_page_includes_tables_and_unreferenced_plots(docs_ext: ModuleType, tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "cpu.md").write_text("| C | time_ms |\n|---|---|\n| 1k | 3.0 |\n")
    (results / "cpu-quick.md").write_text("| C | time_ms |\n|---|---|\n| 1k | 9.9 |\n")
    (results / "cpu.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (results / "distributed_memory.md").write_text("# Per rank\n\nfull run\n")
    (results / "distributed_memory_quick.md").write_text("# Per rank\n\nquick run\n")
    rst, images = docs_ext.benchmark_include(results, prefix="/_generated/benchmarks/")
    assert docs_ext.rst_problems(rst) == []
    assert "benchmarks/results/cpu.md" in rst and "3.0" in rst
    assert "9.9" not in rst and "quick run" not in rst  # superseded by the full runs
    assert "full run" in rst
    assert ".. figure:: /_generated/benchmarks/cpu.png" in rst
    assert [image.name for image in images] == ["cpu.png"]


def test_benchmark_report_with_a_missing_image_is_shown_verbatim(docs_ext: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "gpu.md").write_text("# GPU\n\n![plot](../elsewhere.png)\n")
    rst, images = docs_ext.benchmark_include(tmp_path)
    assert docs_ext.rst_problems(rst) == [] and images == []
    assert "::" in rst and ".. image::" not in rst


def test_shape_sections_become_numpy_sections(docs_ext: ModuleType) -> None:
    lines = ["Raises", "------", "ValueError", "    If bad.", "", "Shape:", "    - x: (B, D)"]
    assert docs_ext.shape_sections(lines)[5:7] == ["Shape", "-----"]
    assert docs_ext.shape_sections(["Shape: (B, D) tensor"]) == ["Shape: (B, D) tensor"]


def test_figure_script_draws_both_figures(tmp_path: Path) -> None:
    script = _load("decision_boundaries_under_test", DOCS / "scripts" / "decision_boundaries.py")
    assert script.main(["--out-dir", str(tmp_path), "--resolution", "48", "--dpi", "30"]) == 0
    for name in ("decision_boundaries.png", "target_logits.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), name


def test_figure_regions_match_the_heads_geometry() -> None:
    import math

    import torch

    script = _load("decision_boundaries_regions", DOCS / "scripts" / "decision_boundaries.py")
    heads = {key: transform for key, _, transform in script.boundary_heads(0.5, 0.35, 4)}
    theta_1 = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    theta_2 = torch.tensor([1.0 + 0.49, 1.0 + 0.51, 1.0 - 0.51], dtype=torch.float64)
    regions = script.decision_regions(heads["arcface"], torch.cos(theta_1), torch.cos(theta_2))
    # ArcFace: class 1 needs theta_2 > theta_1 + m; class 2 needs theta_1 > theta_2 + m.
    assert regions.tolist() == [0, 1, -1]
    softmax = script.decision_regions(heads["softmax"], torch.tensor([0.5]), torch.tensor([0.4]))
    assert softmax.tolist() == [1]
    assert math.isclose(float(heads["cosface"](torch.tensor(0.5, dtype=torch.float64))), 0.15)
