"""The wheel that `pip install .` builds (the images of deploy/docker install it): it holds
every file of the packages, data files included, and the product runs from it alone.

Built for real by pip with build isolation (setuptools from the package index), from a copy
of the packages, so the checkout stays clean."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGES = PYPROJECT["tool"]["setuptools"]["packages"]
TOP_LEVEL = sorted({package.split(".")[0] for package in PACKAGES})

# Run from the unpacked wheel, outside the checkout: every run-time data file is read.
SMOKE = """
import json, sys
from pathlib import Path
import consent.erasure, consent.policy, profiles.segments, profiles.traits, schemas.registry
root = Path(sys.argv[1]).resolve()
for module in (consent.erasure, consent.policy, profiles.segments, profiles.traits, schemas.registry):
    assert root in Path(module.__file__).resolve().parents, module.__file__
catalog = profiles.traits.load_traits()
policy = consent.policy.load_policy()
segments = profiles.segments.load_segments(catalog, set(policy.purposes))
registry = schemas.registry.SchemaRegistry()
request = json.loads(consent.erasure.REQUEST_SCHEMA.read_text())
console = (Path(profiles.traits.__file__).parent / "console" / "index.html").read_text()
print(json.dumps({"traits": len(catalog.computed), "segments": len(segments),
                  "contracts": len(registry.kinds()), "request": request["title"],
                  "console": len(console)}))
"""


def _source_files() -> set[str]:
    """Every file of the packages, as the wheel names it (no caches, no compiled files)."""
    files = set()
    for top in TOP_LEVEL:
        for path in (ROOT / top).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.add(path.relative_to(ROOT).as_posix())
    return files


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for top in TOP_LEVEL:
        shutil.copytree(ROOT / top, source / top, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (built,) = out.glob("tessera-*.whl")
    return built


def test_the_wheel_holds_every_file_of_the_packages(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        shipped = {name for name in archive.namelist() if ".dist-info/" not in name}
    expected = _source_files()
    assert any(not name.endswith(".py") for name in expected)  # data files are among them
    assert expected - shipped == set(), "left out of the wheel"
    assert shipped - expected == set(), "in the wheel but not in the packages"


def test_the_product_runs_from_the_wheel_alone(wheel: Path, tmp_path: Path):
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
    # The unpacked wheel comes first on the path; the checkout is not the working folder.
    env = {**os.environ, "PYTHONPATH": str(unpacked)}
    result = subprocess.run(
        [sys.executable, "-c", SMOKE, str(unpacked)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert loaded["traits"] > 0 and loaded["segments"] > 0 and loaded["contracts"] > 0
    assert loaded["request"] and loaded["console"] > 0
