"""README.md stays true: its Python blocks run as written, in order, in a fresh interpreter (as a
reader pastes them into one session), and its two commands are the ones CI and the CLI use.

A block whose first line is ``# readme-test: skip ...`` is not run (it needs several processes, a
download or a GPU: the comment says which); ``# readme-test: requires MODULE`` runs it only when
MODULE imports.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _runnable(block: str) -> bool:
    first = block.lstrip().splitlines()[0] if block.strip() else ""
    if first.startswith("# readme-test: skip"):
        return False
    m = re.match(r"# readme-test: requires (\S+)", first)
    return m is None or importlib.util.find_spec(m.group(1)) is not None


def test_readme_has_python_blocks_and_markers_are_known():
    blocks = _blocks("python")
    assert len(blocks) >= 3
    for b in blocks:
        for marker in re.findall(r"# readme-test: (\w+)", b):
            assert marker in ("skip", "requires"), f"unknown README marker {marker!r}"


def test_readme_python_blocks_run_as_written(tmp_path):
    runnable = [b for b in _blocks("python") if _runnable(b)]
    assert runnable, "no runnable README block"
    # one script, blocks in order, each announcing itself so a failure names its block
    parts = []
    for i, b in enumerate(runnable):
        parts.append(f"print('--- README block {i}', flush=True)\n{b}")
    script = tmp_path / "readme_blocks.py"
    script.write_text("\n".join(parts))
    env = dict(os.environ)
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, textwrap.shorten(r.stdout[-2000:], 2000) + "\n" + r.stderr[-4000:]
    assert r.stdout.count("--- README block") == len(runnable)


def test_readme_two_commands_are_the_ones_ci_runs():
    bash = "\n".join(_blocks("bash"))
    assert "python -m fastpref.bench" in bash, "README lost the main command"
    assert "python -m pytest" in bash, "README lost the test command"
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^python -m pytest\b", ci, flags=re.M), ".ci/run must call README's test command"
    # the install lines CI uses are the README's: torch pinned first, then the package
    assert "torch==2.13.0" in bash and "torch==2.13.0" in ci


def test_readme_main_command_parses_its_documented_options():
    """`python -m fastpref.bench --help` works and knows every option the README mentions."""
    r = subprocess.run([sys.executable, "-m", "fastpref.bench", "--help"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    text = README.read_text()
    for opt in set(re.findall(r"`(?:python -m fastpref\.bench|fastpref-bench)[^`]*?(--[a-z][a-z-]*)", text)):
        assert opt in r.stdout, f"README mentions {opt}, which `fastpref.bench --help` does not list"


@pytest.mark.parametrize("path", sorted(set(re.findall(r"\]\(((?!https?:)[^)#]+)", README.read_text()))))
def test_readme_links_exist(path):
    assert (ROOT / path).exists(), f"README links to {path}, which is not in the repository"
