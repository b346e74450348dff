"""The wheel ships the whole layout: every package found by walking the source tree, the generated stubs and the
status page's static files, built from what deploy/Dockerfile copies (CI never builds the image).

The build runs ``pip wheel --no-deps --no-build-isolation`` (setuptools from this environment: nothing is
downloaded) in a temporary copy, so no ``build/`` directory of the checkout can add stale modules to the wheel.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support.kit import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

STATIC = REPO / "server" / "edges" / "http" / "static"
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "node_modules")
IMPORT_EVERYTHING = """
import importlib, importlib.resources, pkgutil, client, server
assert server.__file__.startswith({target!r}), server.__file__
for package in (server, client):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        importlib.import_module(module.name)
assert (importlib.resources.files("server.edges.http") / "static" / "index.html").is_file()
"""


def dockerfile_copies(dockerfile: Path) -> list[tuple[str, str]]:
    """``(source, destination)`` of each ``COPY`` before the ``pip install`` that builds the package."""
    copies = []
    for line in dockerfile.read_text(encoding="utf-8").replace("\\\n", " ").splitlines():  # joins continued lines
        words = shlex.split(line, comments=True)
        if words[:1] == ["RUN"] and "pip" in words and "install" in words:
            return copies
        if words[:1] == ["COPY"]:
            *sources, destination = [w for w in words[1:] if not w.startswith("--")]
            copies += [(source, destination) for source in sources]
    raise AssertionError(f"{dockerfile} has no RUN pip install")


def build_context(app: Path) -> Path:
    """Lay out ``app`` as the Dockerfile's ``WORKDIR /app`` is when it runs ``pip install .``."""
    for source, destination in dockerfile_copies(REPO / "deploy" / "Dockerfile"):
        assert not Path(destination).is_absolute(), f"COPY {source} {destination}: outside WORKDIR before install"
        origin, target = REPO / source, app / destination
        if origin.is_dir():  # as docker does: the directory's contents go into the destination
            shutil.copytree(origin, target, ignore=SKIP, dirs_exist_ok=True)
        elif destination.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, target / origin.name)
        else:
            shutil.copy2(origin, target)
    return app


def packages(root: Path, top: str) -> list[Path]:
    """Every directory under ``root/top`` that is a Python package, relative to ``root``."""
    return sorted(init.parent.relative_to(root) for init in (root / top).rglob("__init__.py")
                  if "node_modules" not in init.parts)


def shipped_sources(root: Path, top: str) -> set[str]:
    """The wheel paths of every module (and stub) of every package under ``root/top``."""
    return {str(package / module.name) for package in packages(root, top)
            for module in (root / package).iterdir() if module.suffix in (".py", ".pyi")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    app = build_context(work / "app")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(work / "dist"), str(app)], capture_output=True, text=True, timeout=240,
                           cwd=work)
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = (work / "dist").glob("classifyd-*.whl")
    return path


@pytest.fixture(scope="module")
def names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_the_source_tree_has_the_layers_the_walk_must_find() -> None:
    """Guards the walk below: it sees the layer folders, so a wheel missing one cannot pass unnoticed."""
    found = {str(p) for p in packages(REPO, "server")}
    assert {"server/core", "server/batching", "server/edges/http", "server/models/loader", "server/cli"} <= found
    assert {"classifier/v1", "inference"} <= {str(p) for p in packages(REPO / "protos", "classifier")
                                              + packages(REPO / "protos", "inference")}


@pytest.mark.parametrize("top", ["server", "client"])
def test_every_module_of_every_package_is_in_the_wheel(names: set[str], top: str) -> None:
    expected = shipped_sources(REPO, top)
    assert expected, top
    assert not expected - names, sorted(expected - names)


@pytest.mark.parametrize("top", ["classifier", "inference"])
def test_every_generated_stub_is_in_the_wheel(names: set[str], top: str) -> None:
    expected = shipped_sources(REPO / "protos", top)
    assert {f"{top}/__init__.py"} < expected
    assert not expected - names, sorted(expected - names)


def test_every_static_file_of_the_status_page_is_in_the_wheel(names: set[str]) -> None:
    expected = {str(path.relative_to(REPO)) for path in STATIC.rglob("*") if path.is_file()}
    assert expected
    assert not expected - names, sorted(expected - names)


def test_the_installed_wheel_imports_every_module_without_the_checkout(wheel: Path, tmp_path: Path) -> None:
    """Installed on its own (dependencies from this environment), every module imports from the wheel:
    nothing reaches for tests/, tools/ or a file the wheel lacks."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=240)
    script = IMPORT_EVERYTHING.format(target=str(target))
    env = {**os.environ, "PYTHONPATH": str(target)}
    imported = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                              cwd=tmp_path, env=env)
    assert imported.returncode == 0, imported.stderr
