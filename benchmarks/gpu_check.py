"""GPU check and timing table for the fused ``linear_logprobs`` forward+backward.

    python benchmarks/gpu_check.py                        # Llama-3 shape, bf16, triton backend
    python benchmarks/gpu_check.py --backends triton,cuda # add the CUDA backend when available
    python benchmarks/gpu_check.py --small                # tiny odd-shaped run (for compute-sanitizer)

Providers, all measured in the same run on the same inputs (fwd + bwd, gradients for hidden and
weight, arbitrary upstream gradient):
  * ``3-GEMM floor``: ``hidden @ W.T``, ``dz @ W``, ``dz.T @ hidden`` in the input dtype
    (cuBLAS) - 6NDV FLOPs, what a materialising implementation would at least cost.
  * ``fastpref <backend>`` for each requested backend that reports itself available.
  * ``naive reference``: ``fastpref.reference.linear_logprobs(precision="native")`` + autograd.
  * ``torch.compile(reference)``.
Time is the median of ``--iters`` CUDA-event timings after ``--warmup`` calls; peak memory is
``torch.cuda.max_memory_allocated`` minus what was allocated before the call (inputs excluded,
gradients included).  The markdown table is printed last.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--small", action="store_true",
                   help="tiny odd-shaped correctness run of every Triton kernel (for compute-sanitizer); no timing")
    p.add_argument("--backends", default="triton",
                   help="comma-separated fastpref backends to time (triton, cuda, torch); default: triton")
    p.add_argument("--shape", default="16384x4096x128256", help="NxDxV (default: 16384x4096x128256, Llama-3 8B)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--no-naive", action="store_true", help="skip the naive and compiled references")
    return p.parse_args()


def _small_run() -> int:
    """Every kernel path once at odd sizes, compared against the torch backend (fp32 statistics)."""
    import torch

    import fastpref

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    failures = 0
    for dtype in (torch.bfloat16, torch.float32):
        n, d, dt, vocab = 301, 200, 136, 5003
        h = torch.randn(n, d, generator=gen, device=dev).to(dtype)
        w = (torch.randn(vocab, d, generator=gen, device=dev) * 0.15).to(dtype)
        b = torch.randn(vocab, generator=gen, device=dev).to(dtype)
        ht = torch.randn(n, dt, generator=gen, device=dev).to(dtype)
        wt = (torch.randn(vocab, dt, generator=gen, device=dev) * 0.15).to(dtype)
        labels = torch.randint(0, vocab, (n,), generator=gen, device=dev)
        labels[::5] = -100
        g = torch.randn(n, generator=gen, device=dev)
        old_ws = fastpref.get_workspace_bytes()
        for ws in (old_ws, 2**20):  # one dz chunk, then several
            fastpref.set_workspace_bytes(ws)
            runs = []
            for backend in ("triton", "torch"):
                hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
                lp, ent = fastpref.linear_logprobs(hh, ww, labels, bb, softcap=15.0, temperature=0.9,
                                                   return_entropy=True, backend=backend)
                out = [lp, ent]
                loss = (lp * g).sum() + ent.sum()
                for kind in ("forward_kl", "reverse_kl", "jsd"):
                    div = fastpref.linear_divergence(hh, ww, ht, wt, labels, student_bias=bb, teacher_bias=b,
                                                     kind=kind, beta=0.3, backend=backend)
                    out.append(div)
                    loss = loss + (div * g).sum()
                loss.backward()
                runs.append(out + [hh.grad, ww.grad, bb.grad])
            names = ["logp", "entropy", "fkl", "rkl", "jsd", "d_hidden", "d_weight", "d_bias"]
            tol = 1e-3 if dtype == torch.float32 else 5e-2
            for name, a, r in zip(names, *runs):
                err = (a.float() - r.float()).abs().max().item()
                scale = 1.0 + r.float().abs().max().item()
                ok = math.isfinite(err) and err <= tol * scale
                failures += not ok
                print(f"small {str(dtype):<15} ws={ws:>10} {name:<9} |triton - torch| = {err:.2e} "
                      f"{'ok' if ok else 'MISMATCH'}")
        fastpref.set_workspace_bytes(old_ws)
    torch.cuda.synchronize()
    print("small run:", "PASS" if failures == 0 else f"{failures} mismatches")
    return 1 if failures else 0


def _measure(fn, warmup: int, iters: int):
    """(median ms, peak extra MiB) of ``fn()``; ``fn`` must leave nothing allocated it does not return."""
    import torch

    for _ in range(warmup):
        out = fn()
        del out
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    del out
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        del out
    return statistics.median(times), peak


def _bench(args) -> int:
    import torch

    import fastpref
    from fastpref import reference

    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    n, d, vocab = (int(x) for x in args.shape.lower().split("x"))
    gen = torch.Generator(device=dev).manual_seed(0)
    h0 = torch.randn(n, d, generator=gen, device=dev).to(dtype)
    w0 = (torch.randn(vocab, d, generator=gen, device=dev) / math.sqrt(d)).to(dtype)
    labels = torch.randint(0, vocab, (n,), generator=gen, device=dev)
    g = torch.randn(n, generator=gen, device=dev)
    flops = 6.0 * n * d * vocab  # the 3-GEMM count; fused backends do 8NDV (one recompute)
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}  N={n} D={d} V={vocab} {dtype}")

    rows = []

    def add(name, fn):
        try:
            ms, mib = _measure(fn, args.warmup, args.iters)
            rows.append((name, ms, mib))
            print(f"{name:<28} {ms:9.2f} ms  {mib:9.0f} MiB")
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows.append((name, float("nan"), float("nan")))
            print(f"{name:<28} out of memory")

    def floor():
        z = h0 @ w0.T            # [N, V] logits
        dz = z                   # stands in for the softmax gradient (same shape / dtype)
        dh = dz @ w0
        dw = dz.T @ h0
        return dh, dw

    add("3-GEMM floor (cuBLAS)", floor)

    def fused(backend):
        def run():
            h, w = h0.detach().requires_grad_(), w0.detach().requires_grad_()
            lp = fastpref.linear_logprobs(h, w, labels, backend=backend)
            (lp * g).sum().backward()
            return h.grad, w.grad
        return run

    avail = fastpref.available_backends(dev)
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if backend not in avail:
            print(f"fastpref {backend}: unknown backend (choices: {sorted(avail)})")
            continue
        if avail[backend] is not None:
            print(f"fastpref {backend}: unavailable ({avail[backend]})")
            continue
        add(f"fastpref {backend}", fused(backend))

    if not args.no_naive:
        def ref_fn(h, w, lab):
            return reference.linear_logprobs(h, w, lab, precision="native")

        def naive(fn):
            def run():
                h, w = h0.detach().requires_grad_(), w0.detach().requires_grad_()
                (fn(h, w, labels) * g).sum().backward()
                return h.grad, w.grad
            return run

        add("naive reference", naive(ref_fn))
        add("torch.compile(reference)", naive(torch.compile(ref_fn)))

    floor_ms = rows[0][1]
    print()
    print("| provider | fwd+bwd ms | x 3-GEMM floor | TFLOP/s at 6NDV | peak extra MiB |")
    print("|---|---:|---:|---:|---:|")
    for name, ms, mib in rows:
        if math.isnan(ms):
            print(f"| {name} | OOM | | | |")
            continue
        print(f"| {name} | {ms:.2f} | {ms / floor_ms:.2f} | {flops / ms / 1e9:.0f} | {mib:.0f} |")
    return 0


def main() -> int:
    args = _parse()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to do", file=sys.stderr)
        return 2
    if args.small:
        return _small_run()
    return _bench(args)


if __name__ == "__main__":
    sys.exit(main())
