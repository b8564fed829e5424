"""Ahead-of-time compile check of the Triton kernels for GPUs, on a machine without one.

Every kernel of ``fastpref.kernels`` is compiled with ``triton.compile`` for sm_80 and sm_90a at the
tile configurations its launcher can choose there (``kernels/_tiles.gpu_tile_configs``: the stage
count follows each GPU's shared memory, ``BLOCK_D`` the hidden size), for every operand class
(bf16 / fp16 tensor cores, fp32 on TF32 tensor cores, fp32 exact "ieee") and the compile-time flags
that change the code (bias, softcap, each optional statistic, the divergence kind, the logits cache).
Triton's own ``ptxas -v`` report of each compile (``TRITON_DUMP_PTXAS_LOG``) gives registers, spills
and static shared memory; Triton's metadata gives the dynamic shared memory.  A configuration passes
when it compiles, spills nothing, and its registers (<= 255 per thread, <= 64K per block) and shared
memory (sm_80: 163 KiB, sm_90a: 227 KiB per block, opt-in) fit the SM.

    python benchmarks/aot_check.py                   # default subset (CI, ~1-2 min on 2 cores)
    python benchmarks/aot_check.py --full            # every flag combination, D class, fp16, sm_86
    python benchmarks/aot_check.py --out benchmarks/results/aot-DATE.md --json aot.json
    python benchmarks/aot_check.py --ptxas /usr/local/bin/ptxas   # also that ptxas's view of the PTX

Default subset: each kernel (and divergence kind, and cache mode) with all its flags on — the most
registers — per operand class (bf16 for 16-bit) at the realistic ``BLOCK_D`` (D >= 64).  ``--full``
adds all flags off, each flag alone and all-but-one at those configs, and all on / all off for fp16,
the small-D configs and sm_86 (99 KiB: two stages).  Ints that are multiples of
16 at real sizes (N, V, D, chunk widths) and the pointers get Triton's divisibility hint, as the JIT
gives them at launch.

Exit status: 0 all pass; 1 a configuration fails; 3 nothing checked (no CUDA backend in this Triton,
or no ptxas).  The markdown table (``--out``) is what BENCHMARKS.md quotes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

# arch -> (compute capability, shared memory per block opt-in of the GPU the launcher sees, bytes)
ARCHS = {
    "sm_80": (80, 163 * 1024),  # A100
    "sm_90a": (90, 227 * 1024),  # H100 / H200
    "sm_86": (86, 99 * 1024),  # A10 / RTX 30xx / L4-class (sm_89): two pipeline stages (--full only)
}
DEFAULT_ARCHS = ("sm_80", "sm_90a")
MAX_REGS_PER_THREAD = 255
REGS_PER_SM = 65536

# kernel -> (module, function, launcher family, boolean features, modes)
KERNELS = {
    "logprobs_fwd": ("fastpref.kernels.linear_logprobs", "_logprobs_fwd_kernel", "logprobs_fwd",
                     ("bias", "softcap", "entropy", "sq", "zsum", "before", "store_cache"), {}),
    "logprobs_bwd_dz": ("fastpref.kernels.linear_logprobs", "_logprobs_bwd_dz_kernel", "logprobs_bwd",
                        ("bias", "softcap", "entropy", "need_bias"), {"from_cache": (False, True)}),
    "divergence_fwd": ("fastpref.kernels.linear_divergence", "_divergence_fwd_kernel", "divergence_fwd",
                       ("bias", "softcap", "entropy", "store_cache"), {"kind": (0, 1, 2)}),
    "divergence_jsd": ("fastpref.kernels.linear_divergence", "_divergence_jsd_kernel", "divergence_fwd",
                       ("bias", "softcap"), {"from_cache": (False, True)}),
    "divergence_bwd_dz": ("fastpref.kernels.linear_divergence", "_divergence_bwd_dz_kernel", "divergence_bwd",
                          ("bias", "softcap", "need_bias"), {"kind": (0, 1, 2), "from_cache": (False, True)}),
}
OPERANDS = {"bf16": ("16bit", "bf16"), "fp16": ("16bit", "fp16"), "fp32-tf32": ("tf32", "fp32"),
            "fp32-ieee": ("ieee", "fp32")}
DEFAULT_OPERANDS = ("bf16", "fp32-tf32", "fp32-ieee")

_FLOAT_ARGS = {"inv_temp", "cap", "s_inv_temp", "s_cap", "t_inv_temp", "t_cap", "log_beta", "log_1m_beta",
               "one_m_beta"}
_INPUT_PTRS = {"h_ptr", "w_ptr", "b_ptr", "hs_ptr", "ws_ptr", "bs_ptr", "ht_ptr", "wt_ptr", "bt_ptr", "dz_ptr"}
_DIVISIBLE_INTS = {"N", "V", "D", "DS", "DT", "V0", "VC", "stride_dzn", "stride_dbn"}


def _flag_sets(features: tuple, level: int) -> list[tuple[str, frozenset]]:
    """(name, features on).  Level 0: all on (the most registers); 1: also all off; 2: also each
    feature alone and all but each."""
    out = [("all", frozenset(features))]
    if level >= 1:
        out.append(("none", frozenset()))
    if level >= 2:
        out += [(f, frozenset([f])) for f in features]
        out += [(f"all-{f}", frozenset(features) - {f}) for f in features]
    seen, unique = set(), []
    for name, on in out:
        if on not in seen:
            seen.add(on)
            unique.append((name, on))
    return unique


def _constexprs(kernel: str, on: frozenset, mode: dict, operand: str, cfg) -> dict:
    from fastpref.kernels._tiles import head_flags_for

    head = head_flags_for("bias" in on, "softcap" in on, operand)
    c = dict(BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d)
    if kernel == "logprobs_fwd":
        c.update(HEAD=head, WITH_ENTROPY="entropy" in on, WITH_SQ="sq" in on, WITH_ZSUM="zsum" in on,
                 WITH_BEFORE="before" in on, STORE_CACHE="store_cache" in on)
    elif kernel == "logprobs_bwd_dz":
        c.update(HEAD=head, WITH_ENTROPY="entropy" in on, NEED_BIAS="need_bias" in on,
                 FROM_CACHE=mode["from_cache"], GROUP_N=cfg.group_n)
    elif kernel == "divergence_fwd":
        c.update(KIND=mode["kind"], S_HEAD=head, T_HEAD=head, WITH_ENTROPY="entropy" in on,
                 STORE_CACHE="store_cache" in on)
    elif kernel == "divergence_jsd":
        c.update(S_HEAD=head, T_HEAD=head, FROM_CACHE=mode["from_cache"])
    else:
        c.update(KIND=mode["kind"], S_HEAD=head, T_HEAD=head, NEED_BIAS="need_bias" in on,
                 FROM_CACHE=mode["from_cache"], GROUP_N=cfg.group_n)
    return c


def jobs(full: bool = False, archs=None, operands=None, kernels=None) -> list[dict]:
    """Every (kernel, flags, operand, arch, tile config) to compile."""
    from fastpref.kernels._tiles import gpu_tile_configs

    archs = archs or (tuple(ARCHS) if full else DEFAULT_ARCHS)
    operands = operands or (tuple(OPERANDS) if full else DEFAULT_OPERANDS)
    out = []
    for kernel in kernels or KERNELS:
        module, fn, fam, features, modes = KERNELS[kernel]
        for arch, op_name in itertools.product(archs, operands):
            cap, smem = ARCHS[arch]
            operand, dtype = OPERANDS[op_name]
            configs = gpu_tile_configs(fam, operand, cap, smem)
            for i, cfg in enumerate(configs if full else configs[:1]):
                # every flag combination that matters at the realistic config of the main GPUs and
                # dtypes; all on / all off at the others
                level = 0 if not full else (2 if i == 0 and op_name != "fp16" and arch != "sm_86" else 1)
                for values in itertools.product(*modes.values()):
                    mode = dict(zip(modes, values))
                    # reading the logits from the cache runs no GEMM: tf32 and ieee compile the same code
                    if mode.get("from_cache") and op_name == "fp32-tf32":
                        continue
                    for flag_name, on in _flag_sets(features, level):
                        out.append(dict(
                            kernel=kernel, module=module, fn=fn, arch=arch, capability=cap, smem_limit=smem,
                            operand=op_name, dtype=dtype,
                            mode=",".join(f"{k}={int(v)}" for k, v in mode.items()), flags=flag_name,
                            features=sorted(on), constexprs=_constexprs(kernel, on, mode, operand, cfg),
                            block=f"{cfg.block_n}x{cfg.block_v}x{cfg.block_d}", num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages, maxnreg=cfg.maxnreg,
                        ))
    return out


# --------------------------------------------------------------------------- one compile (worker process)

_PTXAS_RE = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill": re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "smem": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas(log: str) -> dict:
    """Registers, spill stores / loads, stack frame and static shared memory from ``ptxas -v``."""
    def first(key, default=0):
        m = _PTXAS_RE[key].search(log)
        return m.groups() if m and key == "spill" else (int(m.group(1)) if m else default)

    spill = first("spill", ("0", "0"))
    return dict(regs=first("regs", None), spill_stores=int(spill[0]), spill_loads=int(spill[1]),
                stack=first("stack"), static_smem=first("smem"))


def _signature(fn, constexprs: dict, dtype: str) -> tuple[dict, dict]:
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ("*" + dtype) if name in _INPUT_PTRS else ("*i64" if name == "labels_ptr" else "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_ARGS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name in _DIVISIBLE_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_one(job: dict, ptxas: str | None = None) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job["module"]), job["fn"])
    sig, attrs = _signature(fn, job["constexprs"], job["dtype"])
    res = dict(job)
    res.pop("constexprs")
    t0 = time.perf_counter()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=job["constexprs"], attrs=attrs),
                               target=GPUTarget("cuda", job["capability"], 32),
                               options=dict(num_warps=job["num_warps"], num_stages=job["num_stages"],
                                            **({"maxnreg": job["maxnreg"]} if job.get("maxnreg") else {})))
    except Exception as exc:  # a compile failure is a result, not a crash of the whole check
        last = (str(exc).strip().splitlines() or [""])[-1]
        res.update(ok=False, error=f"{type(exc).__name__}: {last[:300]}", problems=["compile error"],
                   seconds=time.perf_counter() - t0)
        return res
    res["seconds"] = time.perf_counter() - t0
    res.update(parse_ptxas(buf.getvalue()))
    ptx = k.asm["ptx"]
    res["dynamic_smem"] = int(k.metadata.shared)
    res["tensor_cores"] = ("wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "none")
    if ptxas:
        arch = job["arch"]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(ptx)
        try:
            out = subprocess.run([ptxas, "-v", "-lineinfo", f"--gpu-name={arch}", f.name, "-o", os.devnull],
                                 capture_output=True, text=True)
        finally:
            os.unlink(f.name)
        res["other_ptxas"] = parse_ptxas(out.stderr) if out.returncode == 0 else {"error": out.stderr[-300:]}
    return judge(res)


def judge(res: dict) -> dict:
    """Limits: compiled, no spill, registers and shared memory within the SM's."""
    problems = []
    if res.get("regs") is None:
        problems.append("no ptxas report")
    else:
        if res["spill_stores"] or res["spill_loads"]:
            problems.append(f"spills {res['spill_stores']}/{res['spill_loads']} B")
        if res["regs"] > MAX_REGS_PER_THREAD or res["regs"] * 32 * res["num_warps"] > REGS_PER_SM:
            problems.append(f"{res['regs']} registers x {32 * res['num_warps']} threads")
    smem = res.get("dynamic_smem", 0) + res.get("static_smem", 0)
    res["smem"] = smem
    if smem > res["smem_limit"]:
        problems.append(f"shared memory {smem / 1024:.0f} KiB > {res['smem_limit'] / 1024:.0f} KiB")
    other = res.get("other_ptxas")
    if other and (other.get("error") or other.get("spill_stores") or other.get("spill_loads")):
        problems.append(f"--ptxas: {other.get('error') or 'spills'}")
    res["ok"] = not problems
    res["problems"] = problems
    return res


# --------------------------------------------------------------------------- driver


def _triton_ptxas() -> str | None:
    """The ptxas Triton compiles with (TRITON_PTXAS_PATH, else the one in its wheel), if it exists."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(90).path
    except Exception:
        return None
    return path if path and os.path.exists(path) else None


def unavailable() -> str | None:
    """Why nothing can be checked here, or None."""
    try:
        import triton
        from triton.backends import backends
    except Exception as exc:
        return f"triton cannot be imported ({exc})"
    if "nvidia" not in backends:
        return f"this Triton ({triton.__version__}) has no CUDA backend"
    if _triton_ptxas() is None:
        return "Triton finds no ptxas (TRITON_PTXAS_PATH or its wheel's)"
    return None


def _ptxas_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return "?"
    m = re.search(r"release ([\d.]+), (V[\d.]+)", out)
    return m.group(1) if m else "?"


def table(results: list[dict]) -> str:
    """Markdown: one row per compile (with a column for ``--ptxas``'s registers / spills when it ran)."""
    other = any("other_ptxas" in r for r in results)
    head = ("| kernel | mode | flags | operands | arch | BLOCK N×V×D | warps | stages | regs | spills st/ld B "
            "| smem KiB | tensor cores |" + (" --ptxas regs, spills B |" if other else "") + " ok |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        warps = str(r["num_warps"]) + (f" (maxnreg {r['maxnreg']})" if r.get("maxnreg") else "")
        cells = [r["kernel"], r["mode"] or "-", r["flags"], r["operand"], r["arch"], r["block"], warps,
                 str(r["num_stages"])]
        if r.get("error"):
            cells += [""] * (4 + other) + [f"compile error: {r['error']}"]
        else:
            cells += [str(r["regs"]), f"{r['spill_stores']}/{r['spill_loads']}", f"{r['smem'] / 1024:.0f}",
                      r["tensor_cores"]]
            if other:
                o = r.get("other_ptxas") or {}
                cells.append(o.get("error", "")[:60] or f"{o.get('regs')}, {o.get('spill_stores')}/{o.get('spill_loads')}")
            cells.append("yes" if r["ok"] else "**no**: " + "; ".join(r["problems"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args) -> int:
    reason = unavailable()
    if reason:
        print(f"aot_check: skipped: {reason}")
        return 3
    import triton

    todo = jobs(full=args.full, archs=args.archs, operands=args.operands, kernels=args.kernels)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastpref-aot-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # cold compiles, and Triton's ptxas report for every one of them
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(compile_one, todo, itertools.repeat(args.ptxas), chunksize=1))
    wall = time.perf_counter() - t0
    bundled = _triton_ptxas()
    failed = [r for r in results if not r["ok"]]
    header = (
        f"Ahead-of-time compile check ({'full' if args.full else 'default subset'}), "
        f"{datetime.date.today().isoformat()}: Triton {triton.__version__}, its ptxas {_ptxas_version(bundled)}"
        + (f"; also {args.ptxas} ({_ptxas_version(args.ptxas)})" if args.ptxas else "")
        + f"; {platform.machine()} host, {len(results)} compiles in {wall:.0f} s with {args.jobs} processes; "
        f"{len(results) - len(failed)} pass, {len(failed)} fail."
    )
    md = header + "\n\n" + table(results) + "\n"
    print(md)
    for r in failed:
        print(f"FAIL {r['kernel']} {r['mode']} {r['flags']} {r['operand']} {r['arch']} {r['block']}: "
              f"{r.get('error') or '; '.join(r['problems'])}")
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=header, wall_s=wall, results=results), f, indent=1, default=str)
    return 1 if failed else 0


def main(argv=None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # compile for real: before triton (or fastpref.kernels) is imported
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--full", action="store_true", help="every flag combination, D class, fp16 and sm_86")
    p.add_argument("--archs", type=lambda s: tuple(s.split(",")), default=None, help=f"among {list(ARCHS)}")
    p.add_argument("--operands", type=lambda s: tuple(s.split(",")), default=None, help=f"among {list(OPERANDS)}")
    p.add_argument("--kernels", type=lambda s: tuple(s.split(",")), default=None, help=f"among {list(KERNELS)}")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: all cores)")
    p.add_argument("--ptxas", default=None, help="also run this ptxas -v on each PTX (e.g. /usr/local/bin/ptxas)")
    p.add_argument("--out", default=None, help="write the markdown table here")
    p.add_argument("--json", default=None, help="write every result here")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
