"""The benchmark CLI end to end on the tiny sweep: files written and well formed (no timings judged)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STATUSES = {"ok", "OOM", "skipped", "timeout", "error"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # set by conftest for kernel tests
    proc = subprocess.run(
        [sys.executable, "-m", "fastpref.bench", "--quick", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_progress_lines(quick_run):
    _, stdout = quick_run
    lines = [ln for ln in stdout.splitlines() if re.match(r"\[\s*\d+/\d+\]", ln)]
    assert lines, stdout
    assert "wrote" in stdout


def test_results_json(quick_run):
    out, _ = quick_run
    doc = json.loads((out / "results.json").read_text())
    assert {"meta", "workloads", "providers", "sweeps", "results"} <= set(doc)
    assert {"date", "torch", "device", "device_name", "repeats", "memory_method"} <= set(doc["meta"])
    assert doc["sweeps"] and doc["results"]
    keys = {r["key"] for r in doc["results"]}
    for s in doc["sweeps"]:
        assert {"name", "workload", "axis", "cases"} <= set(s)
        assert s["axis"] in ("T", "V")
        assert set(s["cases"]) <= keys
    for r in doc["results"]:
        assert {"key", "workload", "provider", "status", "case"} <= set(r)
        assert r["status"] in STATUSES
        if r["status"] == "ok":
            assert r["time_ms"] > 0 and r["peak_mib"] >= 0 and r["times_ms"]
        else:
            assert r["reason"]
    # every (case, provider) pair is accounted for: nothing silently dropped
    assert len(doc["results"]) == len(keys) * len(doc["providers"])
    ok = {(r["workload"], r["provider"]) for r in doc["results"] if r["status"] == "ok"}
    assert ("logprobs", "naive") in ok and ("logprobs", "fastpref-torch") in ok
    # the fused path computes the same loss as the naive reference
    for r in doc["results"]:
        if r["status"] == "ok" and r.get("loss_rel_diff_vs_naive") is not None:
            assert r["loss_rel_diff_vs_naive"] < 1e-3, r


def _tables(md: str):
    """Blocks of consecutive lines starting with '|'."""
    tables, cur = [], []
    for line in md.splitlines():
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            tables.append(cur)
            cur = []
    if cur:
        tables.append(cur)
    return tables


def test_results_markdown(quick_run):
    out, _ = quick_run
    md = (out / "results.md").read_text()
    tables = _tables(md)
    assert tables, md
    for t in tables:
        assert len(t) >= 3, t  # header, separator, at least one row
        ncol = t[0].count("|")
        assert all(row.count("|") == ncol for row in t), t
        assert re.fullmatch(r"\|(\s*:?-{3,}:?\s*\|)+", t[1]), t[1]
        assert "naive ms" in t[0]
    for png in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / png).exists(), png


def test_plots(quick_run):
    out, _ = quick_run
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert any(p.startswith("logprobs-T") for p in pngs) and any(p.startswith("logprobs-V") for p in pngs), pngs
    for p in pngs:
        with open(out / p, "rb") as f:
            assert f.read(8) == PNG_SIGNATURE, p
