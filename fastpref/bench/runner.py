"""Run one (case, provider): in this process (:func:`run_case`) or in a fresh one
(:func:`run_isolated`, what the CLI does, so each peak-RSS measurement starts clean).

Every outcome is a record: ``status`` is ``"ok"``, ``"OOM"``, ``"skipped"``, ``"timeout"``
or ``"error"``, with a ``reason`` for all but ``"ok"``.  Nothing is dropped.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from typing import Dict, Optional

import torch

from . import measure, workloads
from .cases import Case

MARKER = "FASTPREF_BENCH_RESULT "


def _base(case: Case, provider: str, device: torch.device) -> Dict:
    return {
        "key": case.key,
        "workload": case.workload,
        "provider": provider,
        "device": str(device),
        "case": case.to_dict(),
    }


def skipped(case: Case, provider: str, device: torch.device, reason: str) -> Dict:
    return {**_base(case, provider, device), "status": "skipped", "reason": reason}


def prepare(case: Case, provider: str, device: torch.device):
    """Inputs, step and trainable tensors of (case, provider); raises ``workloads.Skip``."""
    fn = workloads.loss_fn(case.workload, provider, device)
    inputs = workloads.make_provider_inputs(case, provider, device)
    params = workloads.trainable(inputs)
    step = measure.make_step(fn, workloads.args_of(case, inputs), params, device)
    return inputs, params, step


def run_case(case: Case, provider: str, device: torch.device, *, repeats: int = 3, warmup: int = 1) -> Dict:
    """Warm up, measure peak memory on one call, time ``repeats`` calls (the memory call included)."""
    rec = _base(case, provider, device)
    if device.type == "cpu":
        measure.configure_malloc()
    try:
        inputs, params, step = prepare(case, provider, device)
    except workloads.Skip as exc:
        return {**rec, "status": "skipped", "reason": str(exc)}
    except Exception as exc:  # input allocation can OOM too
        return _failure(rec, exc)
    rec["input_mib"] = sum(t.numel() * t.element_size() for t in inputs.values()) / measure.MiB
    rec["grad_mib"] = sum(p.numel() * p.element_size() for p in params) / measure.MiB
    if provider.startswith("fastpref-"):
        rec["impl"] = workloads.fastpref_impl(case.workload)
    try:
        can_reset = device.type == "cuda" or measure.reset_cpu_peak()
        first: Optional[Dict] = None
        if not can_reset:  # peak cannot be reset: the first call is the measured one (compilation included)
            first = measure.measure_call(step, device)
        t0 = time.perf_counter()
        loss = None
        for _ in range(max(warmup, 1) if first is None else warmup):
            loss = step()
        rec["warmup_s"] = time.perf_counter() - t0
        rec["loss"] = float((first or {}).get("loss", loss))
        rec["grad_norms"] = measure.grad_norms(params)
        for p in params:
            p.grad = None
        del loss
        gc.collect()
        mem = first or measure.measure_call(step, device)
        secs = ([] if first else [mem["seconds"]]) + measure.time_calls(step, max(repeats - (0 if first else 1), 0))
    except Exception as exc:
        return _failure(rec, exc)
    rec.update(
        status="ok",
        times_ms=[1e3 * s for s in secs],
        time_ms=measure.median_ms(secs),
        peak_mib=mem["peak_bytes"] / measure.MiB,
        mem_method=mem["mem_method"],
    )
    if provider == "floor":
        # The floor's memory is the gradient floor: d hidden and d weight, which every provider returns.
        # What the call itself added (those gradients, plus any GEMM workspace) is kept for reference.
        rec.update(
            gemms=workloads.FLOOR_GEMMS[case.workload],
            measured_peak_mib=rec["peak_mib"],
            peak_mib=rec["grad_mib"],
            mem_method="gradient floor: bytes of d hidden + d weight (not measured)",
        )
    if workloads.IMPORT_NOTES.get(provider):
        rec["import_note"] = workloads.IMPORT_NOTES[provider]
    rec["tflops"] = case.flops / (rec["time_ms"] * 1e-3) / 1e12
    return rec


def _failure(rec: Dict, exc: BaseException) -> Dict:
    if measure.is_oom(exc):
        return {**rec, "status": "OOM", "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return {**rec, "status": "error", "reason": tb[:500]}


def run_isolated(
    case: Case,
    provider: str,
    device: torch.device,
    *,
    repeats: int = 3,
    warmup: int = 1,
    timeout: float = 600.0,
    threads: Optional[int] = None,
) -> Dict:
    """:func:`run_case` in a fresh ``python -m fastpref.bench.worker`` process."""
    payload = json.dumps(
        {
            "case": case.to_dict(),
            "provider": provider,
            "device": str(device),
            "repeats": repeats,
            "warmup": warmup,
            "threads": threads,
        }
    )
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "fastpref.bench.worker", payload],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=dict(os.environ),
        )
    except subprocess.TimeoutExpired:
        return {
            **_base(case, provider, device),
            "status": "timeout",
            "reason": f"did not finish in {timeout:.0f} s",
            "wall_s": time.perf_counter() - t0,
        }
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith(MARKER):
            rec = json.loads(line[len(MARKER) :])
            rec["wall_s"] = wall
            return rec
    rc = proc.returncode
    if rc in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return {
            **_base(case, provider, device),
            "status": "OOM",
            "wall_s": wall,
            "reason": "worker killed by SIGKILL (the out-of-memory killer, most likely)",
        }
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {
        **_base(case, provider, device),
        "status": "error",
        "wall_s": wall,
        "reason": f"worker exited with {rc}: {tail[:400]}",
    }
