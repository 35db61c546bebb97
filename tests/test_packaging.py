"""Release checks: the sdist and wheel build, pass ``twine check``, carry complete metadata,
and the installed wheel — not the source tree — provides every public name.

``python -m build --no-isolation`` uses the hatchling of the running environment, so no
network is needed.  The wheel is installed with ``pip --no-deps --no-index`` into a fresh
virtual environment that sees the running environment's packages (torch) through a
``.pth`` line.  A ``--system-site-packages`` venv would not do here: it exposes the *base*
interpreter's site-packages, not the development venv's, and the development venv's own
``.pth`` files (among them the editable install of this very source tree) are not
processed for a directory added that way, so ``marginloss`` can only come from the wheel.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import textwrap
import venv
import zipfile
from email.message import Message
from email.parser import Parser
from pathlib import Path

import pytest

# One worker builds the artifacts once for every test here (pytest-xdist --dist loadgroup).
pytestmark = pytest.mark.xdist_group("packaging")

ROOT = Path(__file__).resolve().parent.parent
HEAD_FILES = (
    "__init__", "_common", "base", "adacos", "adaface", "arcface", "combined_margin", "cosface", "curricularface",
    "elasticface", "lgm", "lsoftmax", "magface", "normface", "sphereface", "sphereface2", "subcenter_arcface", "uniface",
    "uniformface",
)
MODULES = (
    "__init__", "_validation", "distributed", "functional", "fused", "sharding", "samplers", "schedules", "losses/__init__", "metrics", "miners",
    *(f"heads/{name}" for name in HEAD_FILES),
)


def _source_version() -> str:
    """``__version__`` as written in ``marginloss/__init__.py`` (the one place it lives)."""
    text = (ROOT / "marginloss" / "__init__.py").read_text(encoding="utf-8")
    found = re.findall(r'^__version__\s*=\s*["\']([^"\']+)["\']', text, flags=re.MULTILINE)
    assert len(found) == 1, f"expected one __version__ assignment, found {found}"
    return found[0]


def _clean_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def _run(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(args)} exited {result.returncode}\n--- stdout\n{result.stdout[-6000:]}"
        f"\n--- stderr\n{result.stderr[-6000:]}"
    )
    return result


@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)], cwd=out)
    return out


def _one(dist_dir: Path, pattern: str) -> Path:
    found = sorted(dist_dir.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {dist_dir}, got {[p.name for p in found]}"
    return found[0]


@pytest.fixture(scope="module")
def wheel(dist_dir: Path) -> Path:
    return _one(dist_dir, "marginloss-*.whl")


@pytest.fixture(scope="module")
def sdist(dist_dir: Path) -> Path:
    return _one(dist_dir, "marginloss-*.tar.gz")


@pytest.fixture(scope="module")
def metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(archive.read(name).decode("utf-8"))


def test_version_is_written_in_one_place() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'^dynamic\s*=\s*\[[^\]]*"version"', pyproject, flags=re.MULTILINE)
    assert not re.search(r"^version\s*=", pyproject, flags=re.MULTILINE)
    assert re.search(r'\[tool\.hatch\.version\]\s*\npath\s*=\s*"marginloss/__init__\.py"', pyproject)
    version = _source_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", version), version
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(rf"^#+\s*\[?{re.escape(version)}\b", changelog, flags=re.MULTILINE), (
        f"CHANGELOG.md has no section for version {version}"
    )


def test_artifacts_are_named_after_the_version(wheel: Path, sdist: Path) -> None:
    version = _source_version()
    assert wheel.name == f"marginloss-{version}-py3-none-any.whl"
    assert sdist.name == f"marginloss-{version}.tar.gz"


def test_twine_check_passes(wheel: Path, sdist: Path, dist_dir: Path) -> None:
    result = _run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)], cwd=dist_dir)
    assert result.stdout.count("PASSED") == 2, result.stdout


def test_metadata_is_complete(metadata: Message) -> None:
    assert metadata["Name"] == "marginloss"
    assert metadata["Version"] == _source_version()
    assert "ArcFace" in metadata["Summary"]
    assert metadata["License-Expression"] == "MIT"
    assert "LICENSE" in (metadata.get_all("License-File") or [])
    assert metadata["Requires-Python"] == ">=3.9"
    requires = metadata.get_all("Requires-Dist") or []
    assert any(re.match(r"torch\s*>=", req) for req in requires), requires
    # numpy: torch itself warns "Failed to initialize NumPy" at import without it, which reads
    # as if marginloss were broken.
    assert not [req for req in requires if "extra ==" not in req and not req.startswith(("torch", "numpy"))], (
        f"runtime dependencies beyond torch and numpy: {requires}"
    )
    extras = set(metadata.get_all("Provides-Extra") or [])
    assert {"docs", "examples", "dev"} <= extras
    urls = dict(url.split(", ", 1) for url in metadata.get_all("Project-URL") or [])
    assert {"Homepage", "Documentation", "Source", "Issues", "Changelog"} <= set(urls), urls
    assert all(url.startswith("https://") for url in urls.values()), urls
    classifiers = metadata.get_all("Classifier") or []
    for prefix in ("Development Status ::", "Intended Audience ::", "Programming Language :: Python :: 3",
                   "Topic ::", "Typing :: Typed"):
        assert any(c.startswith(prefix) for c in classifiers), f"no {prefix!r} classifier in {classifiers}"
    assert metadata.get_all("Keywords") or metadata["Keywords"]
    assert metadata["Description-Content-Type"] == "text/markdown"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert metadata.get_payload().strip() == readme.strip(), "long description is not README.md"


def test_wheel_holds_the_package_and_nothing_else(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    for module in MODULES:
        assert f"marginloss/{module}.py" in names, module
    assert "marginloss/py.typed" in names  # PEP 561: ship the type hints
    top_level = {name.split("/", 1)[0] for name in names}
    assert top_level == {"marginloss", f"marginloss-{_source_version()}.dist-info"}, top_level


def test_sdist_holds_sources_tests_and_release_files(sdist: Path) -> None:
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for required in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "marginloss/py.typed",
                     "tests/test_heads.py", *(f"marginloss/{m}.py" for m in MODULES)):
        assert required in names, required


def test_installed_wheel_provides_every_public_name(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, system_site_packages=False, clear=True).create(env_dir)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site_packages = Path(
        _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path)
        .stdout.strip()
    )
    # torch (and the rest of the running environment) without its .pth files, hence without
    # the editable install of this source tree.
    dev_site = [p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir()]
    assert dev_site, "torch not found on sys.path"
    (site_packages / "_outer_environment.pth").write_text(dev_site[0] + "\n")

    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
          "--no-compile", "--quiet", str(wheel)], cwd=tmp_path)

    probe = textwrap.dedent(
        """
        import importlib.metadata, json, pathlib
        import marginloss
        from marginloss import *  # noqa: F403
        missing = [name for name in marginloss.__all__ if not hasattr(marginloss, name)]
        imported = {name: type(getattr(marginloss, name)).__name__ for name in marginloss.__all__}
        import marginloss.distributed, marginloss.functional, marginloss.heads
        import marginloss.losses, marginloss.metrics, marginloss.miners
        submodule_names = {
            module.__name__: [n for n in module.__all__ if not hasattr(module, n)]
            for module in (marginloss.distributed, marginloss.functional, marginloss.fused,
                           marginloss.heads, marginloss.losses, marginloss.metrics, marginloss.miners)
        }
        print(json.dumps({
            "file": str(pathlib.Path(marginloss.__file__).resolve()),
            "version": marginloss.__version__,
            "dist_version": importlib.metadata.version("marginloss"),
            "missing": missing,
            "submodules_missing": {k: v for k, v in submodule_names.items() if v},
            "count": len(imported),
            "typed": (pathlib.Path(marginloss.__file__).parent / "py.typed").is_file(),
        }))
        """
    )
    # -I: no PYTHONPATH, no user site, no current directory on sys.path.
    result = _run([str(python), "-I", "-c", probe], cwd=tmp_path)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(report["file"]).is_relative_to(site_packages.resolve()), report["file"]
    assert report["missing"] == [] and report["submodules_missing"] == {}, report
    assert report["count"] == len(__import__("marginloss").__all__)
    assert report["version"] == report["dist_version"] == _source_version()
    assert report["typed"]


def test_the_declared_torch_floor_is_the_one_ci_tests() -> None:
    """pyproject's ``torch>=X`` is the torch of ``make test-oldest`` (run by .ci/run), and the
    install page says the same version."""
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    floor = re.search(r'dependencies = \["torch>=([\d.]+)", "numpy>=[\d.]+"\]', pyproject)
    assert floor is not None, "pyproject.toml: dependencies must be exactly torch>=X and numpy>=Y"
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    oldest = re.search(r"^TORCH_OLDEST := torch==([\d.]+)$", makefile, flags=re.MULTILINE)
    assert oldest is not None, "Makefile: no TORCH_OLDEST := torch==X.Y.Z"
    assert oldest.group(1).startswith(floor.group(1) + "."), (floor.group(1), oldest.group(1))
    assert "make test-oldest" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    quickstart = (ROOT / "docs" / "guide" / "quickstart.rst").read_text(encoding="utf-8")
    assert f"``torch`` ({floor.group(1)} or newer" in quickstart


def test_import_prints_nothing_and_dir_has_no_strays() -> None:
    """A newcomer saw torch's "Failed to initialize NumPy" (numpy missing) and a stray
    ``annotations`` in ``dir(marginloss)``: numpy is a dependency, and the package namespace
    holds its public API (and private modules) only."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import marginloss"], capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr[-2000:]
    import marginloss

    strays = [n for n in dir(marginloss) if not n.startswith("_") and n not in marginloss.__all__]
    assert strays == [], strays
