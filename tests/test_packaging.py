"""The sdist carries what its own tests need, and nothing unintended; the wheel is the package.

Both are built from this checkout with ``python -m build --no-isolation`` (build and hatchling
come with the ``dev`` extra). Installing them into fresh environments (the wheel with each extra
on its own, the unpacked sdist with ``[dev]`` running its tests) takes minutes and a package
index, so it is not part of this suite; what goes into each is.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT = 120  # seconds

# What the sdist's tests import or read, relative to the sdist's root.
SDIST_MUST_HAVE = [
    "pyproject.toml",
    "README.md",
    "CHANGELOG.md",
    "LICENSE",
    "asgi_session_sync/__init__.py",
    "asgi_session_sync/static/session-sync.js",
    "asgi_session_sync/static/session-sync.d.ts",
    "tests/conftest.py",
    "tests/js/session-sync.test.mjs",
    "tests/js/package-lock.json",
    "tests/e2e/conftest.py",
    "tests/test_doc_snippets.py",
    "examples/__init__.py",
    "examples/fastapi_app/app.py",
    "examples/litestar_app/app.py",
    "benchmarks/__main__.py",  # tests/test_benchmarks_smoke.py imports it
    "docs/getting-started.md",
]
EXTRAS = {"nats", "sqlalchemy", "postgres", "otel", "examples", "dev"}


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--sdist", "--wheel", "-o", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=BUILD_TIMEOUT,
    )
    return out


def sdist_names(dist: Path) -> list[str]:
    [sdist] = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        # Each member is under "<name>-<version>/".
        return [
            member.name.split("/", 1)[1] for member in archive.getmembers() if "/" in member.name
        ]


def wheel_names(dist: Path) -> list[str]:
    [wheel] = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def test_sdist_has_what_its_tests_need(dist: Path) -> None:
    names = set(sdist_names(dist))
    assert [name for name in SDIST_MUST_HAVE if name not in names] == []


def test_sdist_has_no_unintended_files(dist: Path) -> None:
    names = sdist_names(dist)
    top_level = {name.split("/", 1)[0] for name in names}
    assert top_level <= {
        "asgi_session_sync",
        "tests",
        "examples",
        "benchmarks",
        "docs",
        "README.md",
        "CHANGELOG.md",
        "LICENSE",
        "pyproject.toml",
        "PKG-INFO",
        ".gitignore",  # hatchling ships it, so a build from the sdist ignores the same files
    }
    unwanted = [
        name
        for name in names
        if "__pycache__" in name
        or "node_modules" in name
        or name.endswith((".pyc", ".db", ".sqlite3"))
        or (name.startswith(".") and name != ".gitignore")
    ]
    assert unwanted == []


def test_sdist_readme_is_the_project_readme(dist: Path) -> None:
    [sdist] = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as archive:
        [member] = [
            m
            for m in archive.getmembers()
            if m.name.endswith("/README.md") and m.name.count("/") == 1
        ]
        readme = archive.extractfile(member)
        assert readme is not None
        assert readme.read().decode() == (ROOT / "README.md").read_text(encoding="utf-8")


def test_wheel_is_the_package_with_its_license_and_extras(dist: Path) -> None:
    names = wheel_names(dist)
    assert "asgi_session_sync/static/session-sync.js" in names
    assert "asgi_session_sync/static/session-sync.d.ts" in names
    assert "asgi_session_sync/py.typed" in names
    assert "asgi_session_sync/otel.py" in names
    assert {name.split("/", 1)[0] for name in names if "/" in name} == {
        "asgi_session_sync",
        next(name.split("/", 1)[0] for name in names if ".dist-info/" in name),
    }
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)
    [wheel] = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        [metadata_name] = [name for name in names if name.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
    assert metadata["License-Expression"] == "MIT"
    assert set(metadata.get_all("Provides-Extra") or []) == EXTRAS
