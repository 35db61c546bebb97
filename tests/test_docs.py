"""The documentation: it builds with warnings as errors, its code runs, it covers the API.

The Sphinx builds run in a subprocess into ``tmp_path``, in nitpicky mode with warnings as
errors and without a network (intersphinx reads inventories the local extension writes).
The doctest build executes every ``.. doctest::`` / ``.. testcode::`` block of the guide; the
``>>>`` examples of the docstrings shown in the API pages run under pytest's
``--doctest-modules`` in their own modules, and the README's quickstart runs here.  The
local extension ``docs/_ext`` and the figure script are tested directly.
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

pytest.importorskip("sphinx", reason="the docs tests need the docs extras (pip install -e '.[docs]')")

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# Every module whose public names must each have an entry in the API reference.
DOCUMENTED_MODULES = ("functional", "metrics", "miners", "fused", "distributed", "sharding")
EXECUTABLE_DIRECTIVES = ("doctest", "testcode", "testoutput", "testsetup", "testcleanup")
FIGURES = (
    "decision_boundaries.png", "decision_boundaries_adaptive.png", "target_logits.png", "target_logits_adaptive.png",
)


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def docs_ext() -> ModuleType:
    return _load("marginloss_docs_under_test", DOCS / "_ext" / "marginloss_docs.py")


def _sphinx(builder: str, out: Path, doctrees: Path, source: Path = DOCS) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PYTHONHASHSEED"] = "0"
    env["OMP_NUM_THREADS"] = "1"  # tiny examples; a thread pool on busy cores only waits
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-n", "-W", "--keep-going", "-q", "-b", builder,
         "-d", str(doctrees), str(source), str(out)],
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
    for figure in FIGURES:
        assert (html / "_images" / figure).is_file(), figure
    choosing = (html / "guide" / "choosing.html").read_text(encoding="utf-8")
    for figure in FIGURES:
        assert figure in choosing, figure
    assert marginloss.__version__ in (html / "index.html").read_text(encoding="utf-8")

    # Math renders offline: MathJax is a local file, never a CDN address.
    heads = (html / "guide" / "heads.html").read_text(encoding="utf-8")
    script = re.search(r'<script[^>]+src="([^"]*tex-chtml\.js)[^"]*"', heads)
    assert script is not None and "://" not in script.group(1), "MathJax is not served locally"
    assert (html / "_static" / "mathjax" / "tex-chtml.js").is_file()
    assert (html / "_static" / "copybutton.js").is_file()
    # The result files are tables, not a literal block of Markdown.
    benchmarks = (html / "guide" / "benchmarks.html").read_text(encoding="utf-8")
    assert benchmarks.count("<table") >= 4 and "| method |" not in benchmarks
    # Every paper on the References page links to arXiv or its DOI.
    references = (html / "references.html").read_text(encoding="utf-8")
    for key in ("1801.07698", "1801.09414", "1704.08063", "1612.02295", "1704.06369",
                "10.1007/978-3-319-46478-7_31", "1503.03832", "1703.07737"):
        assert key in references, key
    # torch types link to the PyTorch documentation.
    assert "https://docs.pytorch.org/docs/stable/tensors.html#torch.Tensor" in (html / "api" / "heads.html").read_text(encoding="utf-8")
    for page in html.rglob("*.html"):
        assert "mailto:" not in page.read_text(encoding="utf-8"), f"{page.name}: an address became a mailto link"


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
    assert namespace.html_theme == "furo"
    assert namespace.nitpicky is True
    # The copy button copies what a user types: prompts and output stay behind.
    prompt = re.compile(namespace.copybutton_prompt_text)
    for line, typed in ((">>> head(x, y)", "head(x, y)"), ("... y)", "y)"), ("$ make demo", "make demo")):
        assert prompt.match(line) and line[prompt.match(line).end():] == typed, line
    assert namespace.copybutton_only_copy_prompt_lines is True
    assert namespace.copybutton_line_continuation_character == "\\"  # multi-line console commands


def test_the_build_needs_no_network(docs_ext: ModuleType) -> None:
    """Intersphinx reads local inventories (written by the extension), MathJax is local."""
    namespace = _load("docs_conf_network", DOCS / "conf.py")
    for name, (_, inventory) in namespace.intersphinx_mapping.items():
        assert inventory is not None and "://" not in inventory, name
        assert Path(inventory).parent == docs_ext.GENERATED, inventory
        assert Path(inventory).stem in docs_ext.EXTERNAL_OBJECTS, inventory
    assert "sphinx-mathjax-offline" in namespace.extensions


def test_every_guide_page_is_in_the_toctree() -> None:
    index = (DOCS / "index.rst").read_text(encoding="utf-8")
    for page in sorted((DOCS / "guide").glob("*.rst")):
        assert f"guide/{page.stem}" in index, page.name
    api_index = (DOCS / "api" / "index.rst").read_text(encoding="utf-8")
    for page in sorted((DOCS / "api").glob("*.rst")):
        if page.stem != "index":
            assert f"   {page.stem}\n" in api_index, page.name


# ---------------------------------------------------------------- build-time steps


def test_inventories_resolve_the_external_names(docs_ext: ModuleType, tmp_path: Path) -> None:
    from sphinx.util.inventory import InventoryFile

    data = docs_ext.inventory_bytes("torch", docs_ext.EXTERNAL_OBJECTS["torch"])
    (tmp_path / "torch.inv").write_bytes(data)
    with open(tmp_path / "torch.inv", "rb") as stream:
        inventory = InventoryFile.load(stream, "https://docs.pytorch.org/docs/stable", lambda *parts: "/".join(parts))
    entries = inventory.data if hasattr(inventory, "data") else inventory
    classes = entries["py:class"]
    tensor = classes["torch.Tensor"]
    address = tensor.uri if hasattr(tensor, "uri") else tensor[2]
    assert address == "https://docs.pytorch.org/docs/stable/tensors.html#torch.Tensor"
    assert "torch.nn.functional.cross_entropy" in entries["py:function"]
    python = docs_ext.inventory_bytes("python", docs_ext.EXTERNAL_OBJECTS["python"])
    assert python.startswith(b"# Sphinx inventory version 2\n# Project: python\n")


def test_benchmark_page_includes_every_result_file_as_markdown(docs_ext: ModuleType, tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    for name in ("cpu.md", "cpu-quick.md", "distributed_memory.md", "distributed_memory_quick.md", "cpu.png"):
        (results / name).write_text("x")
    rst = docs_ext.benchmark_include(results, prefix="/_generated/benchmarks/")
    includes = re.findall(r"^\.\. include:: (\S+)\n   :parser: myst_parser\.sphinx_$", rst, flags=re.MULTILINE)
    assert [Path(path).name for path in includes] == ["cpu.md", "distributed_memory.md"]  # quick runs superseded
    assert ".. figure:: /_generated/benchmarks/cpu.png" in rst
    assert docs_ext.benchmark_include(tmp_path / "missing") == ""


_MINI_CONF = 'extensions = ["myst_parser"]\n'


def _mini_project(tmp_path: Path, docs_ext: ModuleType, markdown: str) -> Path:
    """A one-page Sphinx project whose page includes ``markdown`` as a results file."""
    source, results = tmp_path / "src", tmp_path / "results"
    results.mkdir()
    (results / "cpu.md").write_text(markdown, encoding="utf-8")
    source.mkdir()
    (source / "conf.py").write_text(_MINI_CONF)
    include = docs_ext.benchmark_include(results, prefix="/_generated/", source_dir=source)
    (source / "index.rst").write_text("Results\n=======\n\n" + include)
    return source


def test_a_results_file_with_stars_and_tables_builds_into_tables(docs_ext: ModuleType, tmp_path: Path) -> None:
    """The provenance line that broke the old hand-written converter (a ``*``) is plain Markdown."""
    markdown = ("# cpu\n\n`heads.py`, commit abc (marginloss/*.py sha256 0ed9), 2 * 3 cores.\n\n"
                "| C | time_ms |\n|---:|---:|\n| 1k | 3.0 |\n")
    source = _mini_project(tmp_path, docs_ext, markdown)
    result = _sphinx("html", tmp_path / "html", tmp_path / "doctrees", source)
    assert result.returncode == 0, _explain(result)
    page = (tmp_path / "html" / "index.html").read_text(encoding="utf-8")
    assert "<table" in page and "marginloss/*.py" in page


def test_a_results_file_that_does_not_parse_fails_the_build(docs_ext: ModuleType, tmp_path: Path) -> None:
    source = _mini_project(tmp_path, docs_ext, "# cpu\n\n```{no-such-directive}\nx\n```\n")
    result = _sphinx("html", tmp_path / "html", tmp_path / "doctrees", source)
    assert result.returncode != 0, "a broken results file must fail a -W build"
    assert "no-such-directive" in result.stderr, result.stderr[-2000:]


def test_shape_sections_become_numpy_sections(docs_ext: ModuleType) -> None:
    lines = ["Raises", "------", "ValueError", "    If bad.", "", "Shape:", "    - x: (B, D)"]
    assert docs_ext.shape_sections(lines)[5:7] == ["Shape", "-----"]
    assert docs_ext.shape_sections(["Shape: (B, D) tensor"]) == ["Shape: (B, D) tensor"]


def test_figure_script_draws_every_figure(tmp_path: Path, docs_ext: ModuleType) -> None:
    assert docs_ext.FIGURES == FIGURES  # the build draws (and checks the age of) every figure
    script = _load("decision_boundaries_under_test", DOCS / "scripts" / "decision_boundaries.py")
    assert script.main(["--out-dir", str(tmp_path), "--resolution", "48", "--dpi", "30"]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(FIGURES)
    for name in FIGURES:
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), name


def test_adaptive_figure_draws_the_papers_targets() -> None:
    """The newer heads' curves, against their formulas written out here (not the code's)."""
    import math

    import torch

    script = _load("decision_boundaries_adaptive", DOCS / "scripts" / "decision_boundaries.py")
    theta = torch.tensor([0.2, 0.6, 1.0, 1.4, 1.8, 2.2], dtype=torch.float64)
    cos = torch.cos(theta)
    curves = script.adaptive_target_curves(theta)
    by_key: dict[str, list[torch.Tensor]] = {}
    for key, _, _, target in curves:
        by_key.setdefault(key, []).append(target)

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.allclose(a, b, atol=1e-9)

    # ArcFace = CurricularFace's target, m = 0.5 (all angles below pi - m).
    assert close(by_key["arcface"][0], torch.cos(theta + 0.5))
    assert close(by_key["elasticface"][0], torch.cos(theta + 0.5))  # the mean margin
    # AdaFace m = 0.4 at z = -1, 0, +1: cos(theta - m z) - (m z + m), the angle clipped at 1e-3.
    assert script.ADAFACE_QUALITIES == (-1.0, 0.0, 1.0)
    for z, target in zip(script.ADAFACE_QUALITIES, by_key["adaface"]):
        angle = (theta - 0.4 * z).clamp(1e-3, math.pi - 1e-3)
        assert close(target, torch.cos(angle) - (0.4 * z + 0.4)), z
    # MagFace: m(a) linear from 0.45 at a = 10 to 0.8 at a = 110; the easy margin keeps cos <= 0.
    assert script.MAGFACE_MAGNITUDES == (10.0, 60.0, 110.0)
    for a, target in zip(script.MAGFACE_MAGNITUDES, by_key["magface"]):
        m = 0.45 + (0.8 - 0.45) * (a - 10.0) / 100.0
        assert close(target, torch.where(cos > 0, torch.cos(theta + m), cos)), a
    assert close(by_key["uniface"][0], cos - 0.4)
    # SphereFace2-C, t = 3: g(c) - m with g(c) = 2((c + 1)/2)^t - 1.
    assert close(by_key["sphereface2"][0], 2 * ((cos + 1) / 2) ** 3 - 1 - 0.4)
    assert close(by_key["softmax"][0], cos)

    # Right panel: CurricularFace at t = 0, 0.5, 1 for theta_y = pi/4, m = 0.5.
    others = [(key, target) for key, _, _, target in script.non_target_curves(theta)]
    curricular = [target for key, target in others if key == "arcface"]
    assert script.CURRICULAR_T == (0.0, 0.5, 1.0) and len(curricular) == 3
    hard = theta < math.pi / 4 + 0.5
    for t, target in zip(script.CURRICULAR_T, curricular):
        assert close(target, torch.where(hard, cos * (t + cos), cos)), t
    sphereface2 = [target for key, target in others if key == "sphereface2"]
    assert close(sphereface2[0], 2 * ((cos + 1) / 2) ** 3 - 1 + 0.4)


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


def test_adaptive_figure_regions_match_the_papers_margins() -> None:
    import torch

    script = _load("decision_boundaries_adaptive_regions", DOCS / "scripts" / "decision_boundaries.py")
    (_, _, ada_low), (_, _, ada_high), (_, _, mag_low), (_, _, mag_high) = script.adaptive_boundary_heads()
    theta_1 = torch.full((3,), 1.0, dtype=torch.float64)

    def regions(transform: object, margin: float) -> list[int]:
        theta_2 = torch.tensor([1.0 + margin - 0.01, 1.0 + margin + 0.01, 1.0 - margin - 0.01], dtype=torch.float64)
        return script.decision_regions(transform, torch.cos(theta_1), torch.cos(theta_2)).tolist()

    # AdaFace at z = -1: ArcFace's angular margin m = 0.4; MagFace: ArcFace's m(a), 0.45 at a = 10 and
    # 0.8 at a = 110 (the sample at theta = 1 < pi/2, where the easy margin still applies).
    assert regions(ada_low, 0.4) == [0, 1, -1]
    assert regions(mag_low, 0.45) == [0, 1, -1]
    assert regions(mag_high, 0.8) == [0, 1, -1]
    # AdaFace at z = +1: cos(theta - m) - 2m must beat the other cosine.
    cos_1 = torch.tensor([0.9], dtype=torch.float64)
    target = torch.cos(torch.arccos(cos_1) - 0.4) - 0.8
    for delta, expected in ((-0.01, 1), (0.01, 0)):
        assert script.decision_regions(ada_high, cos_1, target + delta).tolist() == [expected]


def _readme_python() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```$", readme, flags=re.DOTALL | re.MULTILINE)
    assert len(blocks) == 1, f"expected the one quickstart block in README.md, found {len(blocks)}"
    return blocks[0]


def test_readme_quickstart_learns_a_small_problem() -> None:
    """The README's recipe runs as printed and reaches well above chance (0.1) on 10 classes."""
    result = subprocess.run([sys.executable, "-c", _readme_python()], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    printed = re.search(r"loss ([\d.]+), train accuracy ([\d.]+)", result.stdout)
    assert printed is not None, result.stdout
    assert float(printed.group(2)) >= 0.9, result.stdout


def test_readme_quickstart_without_the_normalisation_layer_stays_at_chance() -> None:
    """What the README says happens without BatchNorm1d on the embedding is what happens."""
    code = _readme_python()
    layer = "    nn.BatchNorm1d(embedding_dim),  # normalise the embedding: without it, the head stalls\n"
    assert layer in code
    result = subprocess.run([sys.executable, "-c", code.replace(layer, "")], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    printed = re.search(r"train accuracy ([\d.]+)", result.stdout)
    assert printed is not None and float(printed.group(1)) < 0.3, result.stdout


def test_word_at_word_is_not_an_email_link(docs_ext: ModuleType) -> None:
    from docutils import nodes
    from docutils.core import publish_doctree

    doctree = publish_doctree("TAR@FAR at 1e-3; write to someone@example.org.")
    docs_ext._unlink_non_addresses(None, doctree)
    links = [node["refuri"] for node in doctree.findall(nodes.reference)]
    assert links == ["mailto:someone@example.org"], links
    assert "TAR@FAR" in doctree.astext()


def test_pending_nitpick_entries_are_still_needed() -> None:
    """docs/nitpick-pending.txt only lists references whose source still contains them."""
    sources = "\n".join(path.read_text(encoding="utf-8")
                        for pattern in ("marginloss/**/*.py", "docs/**/*.rst")
                        for path in ROOT.glob(pattern) if "_build" not in path.parts)
    pending = [line.split(None, 1) for line in (DOCS / "nitpick-pending.txt").read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.startswith("#")]
    assert all(len(entry) == 2 and entry[0].startswith("py:") for entry in pending), pending
    stale = [f"{role} {target}" for role, target in pending if target.strip("`") not in sources]
    assert not stale, f"fixed at their source, delete from docs/nitpick-pending.txt: {stale}"
