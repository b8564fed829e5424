"""``fastpref-bench`` / ``python -m fastpref.bench``: time and peak memory of fastpref against
the GEMM floor, the naive reference, torch.compile, Liger-Kernel, cut-cross-entropy, TRL and
torch's linear_cross_entropy, same inputs, same run.

    fastpref-bench                      # the sweep for the device found (CPU: a few minutes)
    fastpref-bench --quick              # tiny shapes (CI)
    fastpref-bench --workloads logprobs,dpo --providers naive,fastpref-torch,liger --out results/
    fastpref-bench --distributed        # a split LM head over 1, 2, 4 ranks (fastpref.bench.distributed)

Writes ``results.json``, ``results.md`` and one PNG per sweep into ``--out``.  The ``floor``
provider (the plain GEMMs of the workload, ``fastpref.bench.workloads.FLOOR_GEMMS``) is always
timed first, like any other provider; every time is also reported as a multiple of it (``×floor``).
A provider whose package is missing is reported in one line and skipped.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import sys
import time
from typing import Dict, List, Optional

import torch

import fastpref

from . import report, runner, workloads
from .cases import WORKLOAD_TITLES, WORKLOADS, parse_shapes, sweeps_for, unique_cases


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _csv(value: Optional[str], known, what: str) -> Optional[List[str]]:
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in known]
    if bad:
        raise SystemExit(f"--{what}: unknown {bad}; choose from {', '.join(known)}")
    return items


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fastpref-bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="tiny sweep (CI); runs in-process unless --isolate")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--out", default="bench-results", help="output directory (default: bench-results/)")
    p.add_argument("--workloads", help=f"comma list of {', '.join(WORKLOADS)} (default: all)")
    p.add_argument(
        "--providers",
        help=f"comma list of {', '.join(workloads.PROVIDERS)} (default: all; floor is always added)",
    )
    p.add_argument("--repeats", type=int, help="timed calls per case, median reported (default: CPU 3, GPU 10)")
    p.add_argument("--warmup", type=int, help="untimed calls first (default: CPU 1, GPU 3)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own; 1 with --quick)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per (case, provider) process")
    iso = p.add_mutually_exclusive_group()
    iso.add_argument(
        "--isolate",
        dest="isolate",
        action="store_true",
        default=None,
        help="each (case, provider) in a fresh process (default, except with --quick)",
    )
    iso.add_argument("--in-process", dest="isolate", action="store_false", help="run everything in this process")
    p.add_argument("--shapes", help="comma list of NxDxV (N rows, hidden D, vocabulary V) instead of the "
                   "device's sweep, e.g. 1024x1024x65536,512x2048x32000 (CPU fp32, GPU bf16)")
    p.add_argument("--list", action="store_true", help="print the planned cases and exit")
    p.add_argument("--distributed", action="store_true",
                   help="instead: a split LM head over 1, 2, 4 ranks (memory, bytes communicated, time per rank; "
                        "fastpref.bench.distributed, which takes more options)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.distributed:
        from . import distributed

        device = ["--device", args.device] if args.device != "auto" else []
        return distributed.main(["--out", args.out] + (["--quick"] if args.quick else []) + device)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device: CUDA was asked for but torch.cuda.is_available() is False")
    wl = _csv(args.workloads, WORKLOADS, "workloads")
    providers = _csv(args.providers, workloads.PROVIDERS, "providers") or list(workloads.PROVIDERS)
    # The floor first: every other time of a case is reported as a multiple of it.
    providers = [report.FLOOR] + [p for p in dict.fromkeys(providers) if p != report.FLOOR]
    isolate = (not args.quick) if args.isolate is None else args.isolate
    gpu = device.type == "cuda"
    repeats = args.repeats or (10 if gpu else 3)  # --quick too: a few ms per call, and ×floor needs a median
    warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)

    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    try:
        shapes = parse_shapes(args.shapes) if args.shapes else None
    except ValueError as e:
        raise SystemExit(str(e)) from None
    sweeps = sweeps_for(device.type, quick=args.quick, workloads=wl, shapes=shapes)
    cases = unique_cases(sweeps)
    plan = [(c, p) for c in cases for p in providers]
    if args.list:
        for c, p in plan:
            print(f"{c.workload:<13} {c.shape:<42} {p}")
        return 0

    os.makedirs(args.out, exist_ok=True)
    wl_info = {
        w: {
            "title": WORKLOAD_TITLES[w],
            "skipped": workloads.workload_skip_reason(w),
            "fastpref_impl": workloads.fastpref_impl(w),
        }
        for w in dict.fromkeys(s.workload for s in sweeps)
    }
    for w, info in wl_info.items():
        if info["skipped"]:
            print(f"workload {w}: skipped — {info['skipped']}", flush=True)
    mode = "fresh process per case" if isolate else "in-process"
    print(
        f"fastpref-bench: {device_name(device)}; torch {torch.__version__}; {len(cases)} cases x "
        f"{len(providers)} providers; {mode}; repeats {repeats}, warm-up {warmup}; out {args.out}",
        flush=True,
    )

    # A provider whose package is not installed: one line now, nothing per case.
    missing = {p: r for p in providers if (r := workloads.missing_package_reason(p)) is not None}
    for p, reason in missing.items():
        print(f"{p}: skipped — {reason}", flush=True)

    load_before = _loadavg()
    t_start = time.perf_counter()
    results: List[Dict] = []
    width = len(str(len(plan)))
    said: set = set()  # (provider, reason) of skips already printed; ("note", provider) of import notes
    i = 0
    for case in cases:
        wreason = workloads.workload_skip_reason(case.workload)
        if wreason is not None:  # the whole workload: one line per case
            results += [runner.skipped(case, p, device, wreason) for p in providers]
            i += len(providers)
            print(
                f"[{i:>{width}}/{len(plan)}] {case.workload:<12} {case.shape:<40} all providers skipped: {wreason}",
                flush=True,
            )
            continue
        floor_ms = None
        for prov in providers:
            i += 1
            if prov in missing:
                results.append(runner.skipped(case, prov, device, missing[prov]))
                continue
            reason = workloads.provider_skip_reason(case.workload, prov, device)
            if reason is not None:
                rec = runner.skipped(case, prov, device, reason)
            elif isolate:
                rec = runner.run_isolated(
                    case, prov, device, repeats=repeats, warmup=warmup, timeout=args.timeout, threads=threads
                )
            else:
                rec = runner.run_case(case, prov, device, repeats=repeats, warmup=warmup)
            results.append(rec)
            if prov == report.FLOOR and rec["status"] == "ok":
                floor_ms = rec["time_ms"]
            note = rec.get("import_note") or workloads.IMPORT_NOTES.get(prov)
            if note and ("note", prov) not in said:
                said.add(("note", prov))
                print(f"{prov}: import-time output suppressed: {_short(note)}", flush=True)
            if rec["status"] == "skipped":  # the same reason is printed once, the markdown lists every case
                if (prov, rec.get("reason")) in said:
                    continue
                said.add((prov, rec.get("reason")))
            print(_progress_line(i, len(plan), width, case, prov, rec, floor_ms), flush=True)

    report.annotate(results)
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["fastpref-bench"] + (sys.argv[1:] if argv is None else list(argv))),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "fastpref": fastpref.__version__,
        "liger_kernel": _version("liger-kernel") or _version("liger_kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy"),
        "triton": _version("triton"),
        "floor_gemms": dict(workloads.FLOOR_GEMMS),
        "sweep": "quick" if args.quick else ("gpu" if gpu else "cpu"),
        "isolated": isolate,
        "repeats": repeats,
        "warmup": warmup,
        "memory_method": (
            "torch.cuda.max_memory_allocated increment over the inputs"
            if gpu
            else "peak RSS (ru_maxrss) increment over the inputs"
            + (", fresh process per case" if isolate else ", in-process")
            + ", peak reset after warm-up"
        ),
        "wall_s": round(time.perf_counter() - t_start, 1),
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
    }
    json_path = os.path.join(args.out, "results.json")
    report.write_json(json_path, meta, wl_info, sweeps, providers, results)
    plots = _plots(args.out, sweeps, providers, results, meta)
    md_path = os.path.join(args.out, "results.md")
    report.write_markdown(md_path, meta, wl_info, sweeps, providers, results, plots)
    print(f"wrote {json_path}, {md_path} and {len(plots)} plots in {meta['wall_s']} s", flush=True)
    return 0


def _plots(out, sweeps, providers, results, meta) -> Dict[str, str]:
    """The PNGs, or one line saying why there are none (matplotlib is in the ``bench`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plots skipped — matplotlib not installed (pip install 'fastpref[bench]')", flush=True)
        return {}
    return report.write_plots(out, sweeps, providers, results, meta)


def _short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _loadavg() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _progress_line(i, n, width, case, prov, rec, floor_ms=None) -> str:
    head = f"[{i:>{width}}/{n}] {case.workload:<12} {case.shape:<40} {prov:<15}"
    if rec["status"] == "ok":
        line = f"{head} {rec['time_ms']:>10.1f} ms {rec['peak_mib']:>9.1f} MiB"
        if prov == report.FLOOR:
            return line + f"  ({rec.get('gemms', '?')} GEMMs; memory = gradients)"
        if floor_ms:
            line += f" {rec['time_ms'] / floor_ms:>7.2f}×floor"
        return line
    return f"{head} {rec['status']}: {rec.get('reason', '')}"


if __name__ == "__main__":
    sys.exit(main())
