"""GPU readiness without a GPU: every Triton kernel compiled ahead of time for sm_80 and sm_90a at the
tile configurations its launcher can choose, through ``ptxas -v``: no spills, registers and shared
memory within the SM's limits (benchmarks/aot_check.py does the work, in a process of its own: the
kernels must not be the interpreter's).

The default run compiles the subset with every flag on (the most registers) for each kernel, kind,
cache mode and operand class (~75 compiles, about a minute on 2 cores); ``-m slow`` runs the full
sweep (every flag combination that matters, fp16, small-D tiles, sm_86).  Both skip when this
Triton has no CUDA backend or no ptxas.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from fastpref.kernels import _tiles  # noqa: E402

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "aot_check.py"
LIMITS = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024, "sm_86": 99 * 1024}


def _aot(tmp_path, *args, timeout):
    """Run the check in a fresh process without the interpreter; its results (skips when it cannot run)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), "--jobs", str(min(os.cpu_count() or 1, 4)),
                           *args], env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    print(proc.stdout)
    assert out.exists(), f"aot_check wrote no results (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.returncode, json.loads(out.read_text())["results"]


def _check(rc, results):
    failed = [r for r in results if not r["ok"]]
    assert not failed, "\n".join(
        f"{r['kernel']} {r['mode']} {r['flags']} {r['operand']} {r['arch']} {r['block']}: "
        f"{r.get('error') or '; '.join(r['problems'])}" for r in failed)
    assert rc == 0
    for r in results:  # the limits as read back, not as the script judged them
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0
        assert 0 < r["regs"] <= 255 and r["regs"] * 32 * r["num_warps"] <= 65536
        assert 0 <= r["smem"] <= LIMITS[r["arch"]]


def test_every_kernel_compiles_for_sm80_and_sm90a_without_spills(tmp_path):
    rc, results = _aot(tmp_path, timeout=900)
    _check(rc, results)
    seen = {(r["kernel"], r["arch"], r["operand"]) for r in results}
    kernels = {"logprobs_fwd", "logprobs_bwd_dz", "divergence_fwd", "divergence_jsd", "divergence_bwd_dz"}
    assert seen == {(k, a, o) for k in kernels for a in ("sm_80", "sm_90a") for o in ("bf16", "fp32-tf32", "fp32-ieee")}
    # the tensor cores the operand classes ask for: 16-bit and TF32 on wgmma (Hopper) / mma (Ampere), exact fp32 on FMA
    for r in results:
        if "from_cache=1" in r["mode"]:
            continue  # reads the logits back: no GEMM
        want = "none" if r["operand"] == "fp32-ieee" else ("wgmma" if r["arch"] == "sm_90a" else "mma")
        assert r["tensor_cores"] == want, f"{r['kernel']} {r['operand']} {r['arch']}: {r['tensor_cores']}"


@pytest.mark.slow
def test_full_sweep_compiles_without_spills(tmp_path):
    _check(*_aot(tmp_path, "--full", timeout=6 * 3600))


@pytest.mark.parametrize("capability,smem", [(80, 163 * 1024), (86, 99 * 1024), (90, 227 * 1024)],
                         ids=["A100", "sm86-99KiB", "H100"])
def test_the_check_compiles_every_config_the_launchers_choose(capability, smem):
    """For any hidden size, the config a launcher picks is one ``gpu_tile_configs`` enumerates (what the
    check compiles), and its operand pipeline fits the GPU's shared memory."""
    for fam in _tiles.FAMILIES:
        for operand in _tiles.OPERANDS:
            listed = _tiles.gpu_tile_configs(fam, operand, capability, smem)
            for d in (1, 8, 16, 17, 32, 33, 64, 100, 2304, 4096, 8192):
                cfg = _tiles.gpu_tile_config(fam, operand, d, capability, smem)
                assert cfg in listed, (fam, operand, d, cfg)
                stage = (cfg.block_n + cfg.block_v) * cfg.block_d * (2 if operand == "16bit" else 4)
                assert cfg.num_stages * stage <= smem


def test_ptxas_reports_are_read_and_judged():
    """The parser on ptxas's own words (a spilling sm_90a compile of this machine's ptxas 13.0), and the
    verdict on it: a check whose parser always read 0 would pass everything."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("aot_check", SCRIPT)
    aot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(aot)
    log = ("ptxas info    : 0 bytes gmem\n"
           "ptxas info    : Compiling entry function 'kern' for 'sm_90a'\n"
           "ptxas info    : Function properties for kern\n"
           "    80 bytes stack frame, 88 bytes spill stores, 80 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 16 bytes smem, 80 bytes cumulative stack size\n")
    got = aot.parse_ptxas(log)
    assert got == dict(regs=255, spill_stores=88, spill_loads=80, stack=80, static_smem=16)
    res = aot.judge(dict(got, num_warps=8, dynamic_smem=230 * 1024, smem_limit=227 * 1024))
    assert not res["ok"] and len(res["problems"]) == 2  # spills, and shared memory over the limit
    clean = aot.judge(dict(got, spill_stores=0, spill_loads=0, num_warps=8, dynamic_smem=0, smem_limit=227 * 1024))
    assert clean["ok"]
    assert not aot.judge(dict(clean, num_warps=16))["ok"]  # 255 registers x 512 threads > 64K
