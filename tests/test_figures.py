"""Every figure the README, the examples' READMEs and the docs quote agrees with its results file.

``docs/scripts/figures.py`` renders the marked blocks from ``benchmarks/results/cpu.json``,
``examples/face/results/demo.json`` and ``examples/mnist_arcface/results/results.json``;
``make figures`` writes them.  A hand-edited number, or a results file updated without
``make figures``, fails here.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def figures() -> ModuleType:
    spec = importlib.util.spec_from_file_location("figures_under_test", ROOT / "docs" / "scripts" / "figures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_documented_figures_match_their_results_files(figures: ModuleType) -> None:
    stale = figures.stale()
    assert not stale, f"figures disagree with the results files in {[str(p.relative_to(ROOT)) for p in stale]}: run `make figures`"


def test_every_block_is_quoted_and_every_quote_has_a_results_file(figures: ModuleType) -> None:
    quoted = {name for path in figures.DOCUMENTS for name in figures.blocks_in(path.read_text(encoding="utf-8"))}
    assert quoted == set(figures.BLOCKS), (quoted, set(figures.BLOCKS))
    for name, (results, _, _) in figures.BLOCKS.items():
        assert results.is_file(), f"{name}: {results} is missing"
        json.loads(results.read_text(encoding="utf-8"))


def test_a_changed_result_changes_the_documented_text(figures: ModuleType) -> None:
    """The check can fail: one accuracy edited in the results makes the README stale."""
    results = json.loads(figures.DEMO_RESULTS.read_text(encoding="utf-8"))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert figures.render(readme, ".md", {}) == readme
    edited = copy.deepcopy(results)
    for run in edited["runs"]:
        run["verification_dev_acc"] = 0.123
    rendered = figures.render(readme, ".md", {"demo": edited})
    assert rendered != readme and "0.123" in rendered


def test_wall_times_are_ranges_with_the_load(figures: ModuleType) -> None:
    runs = [
        {"settings": {"smoke": False, "seed": 0}, "wall_s": 93.0, "load_1min": [1.5, 2.25],
         "classification_dev_acc": 0.98, "classification_chance": 0.0125, "verification_dev_acc": 0.925,
         "verification_chance": 0.125, "machine": {"cpu": "CPU X", "logical_cores": 2, "torch": "2.14.1"},
         "date": "2026-12-01T00:00:00"},
    ]
    runs.append({**runs[0], "wall_s": 157.0, "load_1min": [3.0, 2.0]})
    text = figures.demo_markdown({"runs": runs})
    assert "93 to 157 s" in text and "load average 1.5 to 3.0" in text and "CPU X, 2 logical cores" in text
    assert "dev accuracy 0.925 (chance, always" in text  # equal values are not shown as a range
    assert "the same in every run" in text
    with pytest.raises(ValueError, match="no full run"):
        figures.demo_facts({"runs": [{**runs[0], "settings": {"smoke": True, "seed": 0}}]})


def test_an_unknown_block_name_is_an_error(figures: ModuleType) -> None:
    with pytest.raises(ValueError, match="unknown figures block 'nonsense'"):
        figures.render("<!-- figures:nonsense -->\n<!-- /figures:nonsense -->", ".md", {})
