"""benchmarks/gpu_check.py without a GPU: its ``--dry-run`` (CPU, tiny shape) runs the providers' wiring, the
comparison with the fp64 oracle, the report and the error handling that the one-call GPU check relies on.
Its times mean nothing; its errors do: a mis-wired gradient (a sign, a scale, the wrong upstream gradient)
shows as a relative error near 1."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
# trl, cce, Liger and torch.compile run in the manual dry run (BENCHMARKS.md): their imports and compilations
# would cost this test tens of seconds.
PROVIDERS = "floor3,floor4,naive,fastpref-torch,fastpref-triton,torch-lce,flash-attn-ce,fault-raise,fault-exit,fault-hang"
ITEM_TIMEOUT_S = 15  # the hang's cost; an ordinary item here takes < 5 s


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, TRITON_INTERPRET="1")  # fastpref-triton runs in the interpreter on CPU
    cmd = [sys.executable, str(SCRIPT), "--dry-run", "--shapes", "16x8x50", "--providers", PROVIDERS,
           "--item-timeout", str(ITEM_TIMEOUT_S), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    doc = json.loads((out / "gpu_check.json").read_text())
    return proc, doc, (out / "gpu_check.md").read_text()


def _by_item(doc):
    return {(r["task"], r["provider"]): r for r in doc["results"]}


def test_dry_run_exit_status_and_files(dry_run):
    proc, doc, md = dry_run
    # the faults are not fastpref rows: reported, not failing the run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {"device", "torch", "versions", "backends", "date"} <= set(doc["meta"])
    # every planned item is accounted for, once, in the JSON and in the markdown table
    plan = _module().make_plan(_module()._parse(["--dry-run", "--shapes", "16x8x50", "--providers", PROVIDERS]))
    assert [(r["task"], r["provider"]) for r in doc["results"]] == [(p["task"], p["provider"]) for p in plan]
    for r in doc["results"]:
        assert f"| {r['task']} | {r['provider']} |" in md
    assert "### N=16, D=8, V=50" in md


def test_dry_run_providers_match_the_oracle(dry_run):
    _, doc, _ = dry_run
    items = _by_item(doc)
    must_run = [("logprobs", p) for p in ("floor3", "floor4", "naive", "fastpref-torch", "fastpref-triton",
                                          "torch-lce")]
    must_run += [("dpo", p) for p in ("naive", "fastpref-torch", "fastpref-triton")]  # after the crash and hang
    for key in must_run:
        assert items[key]["status"] == "ok", (key, items[key])
    checked = 0
    for key, r in items.items():
        if r["status"] != "ok":
            continue
        assert r["ms"] > 0 and len(r["times_ms"]) == 2, r
        if key[1].startswith("floor"):
            assert "err_dw" not in r
            continue
        for k in ("err_out", "err_dh", "err_dw"):
            assert 0 <= r[k] < 1e-5, (key, k, r[k])  # float32 on a tiny shape: ~1e-7
        checked += 1
    assert checked == 7


def test_dry_run_error_handling(dry_run):
    proc, doc, md = dry_run
    items = _by_item(doc)
    assert items[("logprobs", "fault-raise")]["status"] == "error"
    assert "fault-raise" in items[("logprobs", "fault-raise")]["reason"]
    assert items[("logprobs", "fault-exit")]["status"] == "crashed"
    assert "exit code 7" in items[("logprobs", "fault-exit")]["reason"]
    assert items[("logprobs", "fault-hang")]["status"] == "timeout"
    assert "--item-timeout" in items[("logprobs", "fault-hang")]["reason"]
    # flash-attn: not installed here, or installed and CUDA-only: either way a reason, not a failure
    fa = items[("logprobs", "flash-attn-ce")]
    assert fa["status"] == "skipped" and fa["reason"]
    assert "| logprobs | fault-exit | | | | | | | | | crashed:" in md
    assert "fault-raise: a provider that raises" in proc.stderr  # its traceback is printed


def test_flagging_and_failures():
    """A fastpref row whose error exceeds twice the naive row's (+1e-5) fails the run; other rows never do."""
    mod = _module()
    args = SimpleNamespace(dtype="bfloat16", iters=5, warmup=2, device="cuda", seed=0, budget_s=None,
                           shapes="8x4x16", item_timeout=1.0)
    plan = [{"id": i, "shape": [8, 4, 16], "task": "logprobs", "provider": p}
            for i, p in enumerate(("floor3", "naive", "fastpref-triton", "fastpref-cuda", "liger-flce"))]
    drv = mod.Driver(args, plan, out_dir=None)
    ok = {"status": "ok", "ms": 2.0, "times_ms": [2.0], "peak_mib": 1.0}
    drv.results = {
        0: {**plan[0], **ok},
        1: {**plan[1], **ok, "err_out": 1e-3, "err_dh": 2e-3, "err_dw": 4e-3},
        2: {**plan[2], **ok, "err_out": 1e-4, "err_dh": 4.0e-3, "err_dw": 9e-3},  # d_weight above 2 * 4e-3 + 1e-5
        3: {**plan[3], **ok, "err_out": 2e-3, "err_dh": 4.0e-3, "err_dw": 8e-3},  # at the bound: fine
        4: {**plan[4], **ok, "err_out": 1.0, "err_dh": 1.0, "err_dw": 1.0},  # a peer: reported, never failing
    }
    assert drv.flagged(drv.results[2]) == ["dw"]
    assert drv.flagged(drv.results[3]) == []
    assert drv.flagged(drv.results[4]) == []
    assert [r["provider"] for r in drv.failures()] == ["fastpref-triton"]
    md = drv.markdown()
    assert "| logprobs | fastpref-triton | 2.00 | 1.00 |" in md and "9.0e-03 ! | FLAGGED |" in md
    drv.results[3] = {**plan[3], "status": "error", "reason": "RuntimeError: boom"}
    assert [r["provider"] for r in drv.failures()] == ["fastpref-triton", "fastpref-cuda"]
    # an oracle that failed leaves a fastpref row unchecked: that fails the run too
    drv.results[3] = {**plan[3], **ok, "check_error": "OutOfMemoryError: fp64 oracle"}
    assert [r["provider"] for r in drv.failures()] == ["fastpref-triton", "fastpref-cuda"]
    assert "| unchecked: OutOfMemoryError: fp64 oracle |" in drv.markdown()


def test_plan_rejects_bad_arguments():
    mod = _module()
    with pytest.raises(SystemExit, match="dry-run only"):
        mod.make_plan(mod._parse(["--providers", "fault-exit"]))
    with pytest.raises(SystemExit, match="unknown"):
        mod.make_plan(mod._parse(["--providers", "nope"]))
    with pytest.raises(SystemExit, match="multiple of 8"):
        mod.make_plan(mod._parse(["--shapes", "12x4x16"]))
    default = mod.make_plan(mod._parse([]))
    assert {tuple(p["shape"]) for p in default} == {(8192, 4096, 131072), (8192, 4096, 151936), (8192, 2304, 256000)}
    assert "compiled" not in {p["provider"] for p in default}
    assert {"floor3", "floor4", "liger-flce", "cce", "trl", "torch-lce", "flash-attn-ce", "liger-dpo"} <= {
        p["provider"] for p in default}
