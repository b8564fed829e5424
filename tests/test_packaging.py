"""Packaging: the sdist carries what it takes to run the tests and benchmarks (MANIFEST.in, read with
setuptools' own manifest logic), the license and typing marker ship, the extras name what the test
suite needs; and, with setuptools >= 77 (the SPDX ``license`` field), a real sdist and wheel."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import load_pyproject

import fastpref

ROOT = Path(__file__).resolve().parents[1]
SDIST_DIRS = ("tests", "benchmarks", "examples", "docs", "csrc", "kernels")
SDIST_FILES = ("README.md", "BENCHMARKS.md", "CHANGELOG.md", "LICENSE", ".ci/requirements.txt", "pyproject.toml",
               "setup.py", "MANIFEST.in")
JUNK = re.compile(r"(^|/)(__pycache__|\.pytest_cache|\.benchmarks)(/|$)|\.(pyc|pyo|so)$|^examples/results/")


def _files_under(directory: str) -> set:
    out = set()
    for dirpath, _dirnames, filenames in os.walk(ROOT / directory):
        for f in filenames:
            rel = (Path(dirpath) / f).relative_to(ROOT).as_posix()
            if not JUNK.search(rel):
                out.add(rel)
    return out


def _manifest_files(monkeypatch) -> set:
    """What MANIFEST.in selects, by setuptools' FileList (the code ``sdist`` runs on the template)."""
    from setuptools.command.egg_info import FileList

    monkeypatch.chdir(ROOT)
    files = FileList()
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            files.process_template_line(line)
    return {Path(f).as_posix() for f in files.files}


def test_manifest_selects_tests_benchmarks_examples_docs_sources(monkeypatch):
    selected = _manifest_files(monkeypatch)
    for name in ("tests/conftest.py", "tests/dist_workers.py", "README.md", "BENCHMARKS.md", "CHANGELOG.md",
                 "LICENSE", ".ci/requirements.txt", "docs/design.md", "csrc/epilogue.cu", "kernels/_tiles.py"):
        assert name in selected, f"MANIFEST.in does not select {name}"
    for directory in SDIST_DIRS:
        files = _files_under(directory)
        assert files, directory
        assert not files - selected, f"MANIFEST.in misses {sorted(files - selected)}"
    junk = sorted(f for f in selected if JUNK.search(f))
    assert not junk, f"MANIFEST.in selects build or cache files: {junk}"


def test_license_typing_and_extras():
    project = load_pyproject()
    meta = project["project"]
    assert meta["license"] == "Apache-2.0" and meta["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("Copyright 2026 The fastpref authors")
    for phrase in ("Apache License", "Version 2.0, January 2004", "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND "
                   "DISTRIBUTION", "9. Accepting Warranty or Additional Liability.", "END OF TERMS AND CONDITIONS"):
        assert phrase in text, phrase
    assert any(re.fullmatch(r"setuptools>=(\d+)", r) and int(r.split(">=")[1]) >= 77
               for r in project["build-system"]["requires"]), "SPDX license strings need setuptools >= 77"

    assert (ROOT / "fastpref" / "py.typed").is_file()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["fastpref"]

    from packaging.requirements import Requirement

    def names(extra):
        return {Requirement(r).name for r in meta["optional-dependencies"][extra]}

    assert {"pytest", "pytest-benchmark", "triton", "ninja", "packaging", "numpy"} <= names("test")
    assert {"pytest-benchmark", "matplotlib", "liger-kernel", "cut-cross-entropy", "trl", "packaging"} <= names("bench")
    for extra in ("all", "dev"):
        selfref = [Requirement(r) for r in meta["optional-dependencies"][extra] if Requirement(r).name == "fastpref"]
        assert selfref and {"test", "bench", "trl"} <= selfref[0].extras, extra
    assert "ruff" in names("dev")
    # CI pins every package of the test extra (torch is pinned in .ci/run itself)
    pinned = {Requirement(line).name for line in (ROOT / ".ci/requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert names("test") <= pinned, names("test") - pinned


def _setuptools_major() -> int:
    import setuptools

    return int(setuptools.__version__.split(".")[0])


def _build(kind: str, src: Path, out: Path) -> Path:
    code = f"from setuptools import build_meta as b; print(b.build_{kind}({str(out)!r}))"
    env = {k: v for k, v in os.environ.items() if k != "FASTPREF_BUILD_CUDA"}
    done = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return out / done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(_setuptools_major() < 77, reason="building needs setuptools >= 77 (pyproject's SPDX license)")
def test_sdist_and_wheel(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "*.egg-info", "build", "dist", "__pycache__", ".pytest_cache", ".benchmarks", ".ruff_cache",
        "bench-results", ".whl", "*.so"))
    sdist = _build("sdist", src, tmp_path / "dist")
    prefix = f"fastpref-{fastpref.__version__}/"
    with tarfile.open(sdist) as tar:
        names = {n[len(prefix):] for n in tar.getnames() if n.startswith(prefix)}
        pkg_info = tar.extractfile(prefix + "PKG-INFO").read().decode()
    assert sdist.name == f"fastpref-{fastpref.__version__}.tar.gz"
    for directory in SDIST_DIRS:
        missing = sorted(f for f in _files_under(directory) if f not in names)
        assert not missing, f"sdist misses {missing}"
    for f in SDIST_FILES + ("fastpref/__init__.py", "fastpref/py.typed", "fastpref/modules.py"):
        assert f in names, f
    assert f"\nVersion: {fastpref.__version__}\n" in pkg_info
    assert "\nLicense-Expression: Apache-2.0\n" in pkg_info and "\nLicense-File: LICENSE\n" in pkg_info

    wheel = _build("wheel", src, tmp_path / "dist")
    with zipfile.ZipFile(wheel) as zf:
        wnames = set(zf.namelist())
    dist_info = f"fastpref-{fastpref.__version__}.dist-info"
    for f in ("fastpref/py.typed", "fastpref/modules.py", "fastpref/kernels/linear_logprobs.py",
              "fastpref/csrc/epilogue.cu", "fastpref/csrc/fastpref_api.cpp", f"{dist_info}/licenses/LICENSE"):
        assert f in wnames, f
    assert not [n for n in wnames if n.startswith(("tests/", "benchmarks/", "examples/"))]
