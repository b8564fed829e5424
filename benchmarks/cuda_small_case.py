"""Small end-to-end run of every CUDA-backend kernel path, for compute-sanitizer (gpu_check_cuda.sh).

Builds (or loads) the extension, then runs forward + backward of linear_logprobs and
linear_divergence (three kinds) with ``backend="cuda"`` on small odd shapes: fp32 / bf16,
fp32 tiles and native bf16 tiles (FASTPREF_CUDA_LOGITS=native, dz in place), ignored rows,
bias, temperature, softcap, a whole-vocabulary tile and a split one (64 KiB workspace), and
compares each output and gradient with the fp64 oracle (|out - truth| <= 2 |naive - truth| +
floor).  Exits 1 on any mismatch, 2 when no GPU is present.
"""

from __future__ import annotations

import os
import sys
import time

import torch

import fastpref as fp
from fastpref import reference as ref
from fastpref.backends import cuda_ops

failures: list[str] = []


def check(name, out, naive, truth, dtype):
    truth, out, naive = truth.double(), out.double(), naive.double()
    err = (out - truth).abs().max().item() if truth.numel() else 0.0
    err_naive = (naive - truth).abs().max().item() if truth.numel() else 0.0
    scale = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    floor = 8 * torch.finfo(torch.float32).eps * scale
    if dtype in (torch.bfloat16, torch.float16):
        floor += torch.finfo(dtype).eps * scale  # one ulp of a low-precision output
    ok = bool(torch.isfinite(out).all()) and err <= 2 * err_naive + floor
    print(f"  {'ok ' if ok else 'BAD'} {name}: err={err:.2e} naive={err_naive:.2e}")
    if not ok:
        failures.append(name)


def head(n, d, v, dtype, bias, g):
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * (3.0 / d**0.5)
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.5 if bias else None
    return [None if t is None else t.to(dtype).cuda() for t in (h, w, b)]


def leaves(ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def logprobs_case(tag, n, d, v, dtype, temp, cap, g):
    h, w, b = head(n, d, v, dtype, True, g)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = -100
    labels = labels.cuda()
    g_lp, g_ent = torch.randn(n, generator=g).cuda(), torch.randn(n, generator=g).cuda()

    def run(fn, **kw):
        x = leaves((h, w, b))
        lp, ent = fn(x[0], x[1], labels, x[2], temperature=temp, softcap=cap, return_entropy=True, **kw)
        ((lp.double() * g_lp).sum() + (ent.double() * g_ent).sum()).backward()
        return [lp.detach(), ent.detach()] + [t.grad for t in x]

    got = run(fp.linear_logprobs, backend="cuda")
    truth = run(ref.linear_logprobs, precision="fp64")
    naive = run(ref.linear_logprobs, precision="native")
    for name, a, nv, t in zip(("logp", "entropy", "d_hidden", "d_weight", "d_bias"), got, naive, truth):
        check(f"{tag} {name}", a, nv, t, dtype if name.startswith("d_") else torch.float32)


def divergence_case(tag, n, ds, dt, v, dtype, kind, temp, g):
    hs, ws, bs = head(n, ds, v, dtype, True, g)
    ht, wt, bt = head(n, dt, v, dtype, False, g)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = -100
    labels = labels.cuda()
    grad = torch.randn(n, generator=g).cuda()

    def run(fn, **kw):
        x = leaves((hs, ws, bs))
        div = fn(x[0], x[1], ht, wt, labels, student_bias=x[2], kind=kind, beta=0.3, temperature=temp,
                 student_softcap=7.0, **kw)
        (div.double() * grad).sum().backward()
        return [div.detach()] + [t.grad for t in x]

    got = run(fp.linear_divergence, backend="cuda")
    truth = run(ref.linear_divergence, precision="fp64")
    naive = run(ref.linear_divergence, precision="native")
    for name, a, nv, t in zip((kind, "d_hidden", "d_weight", "d_bias"), got, naive, truth):
        check(f"{tag} {kind} {name}", a, nv, t, dtype if name.startswith("d_") else torch.float32)


def main() -> int:
    if not torch.cuda.is_available():
        print("cuda_small_case: no CUDA GPU")
        return 2
    t0 = time.perf_counter()
    cuda_ops.load()
    print(f"extension ready in {time.perf_counter() - t0:.1f}s")
    g = torch.Generator().manual_seed(0)
    default_ws = fp.get_workspace_bytes()
    for logits_mode in ("fp32", "native"):
        os.environ["FASTPREF_CUDA_LOGITS"] = logits_mode
        for ws_bytes, ws_tag in ((default_ws, "whole-V"), (2**16, "split-V")):
            fp.set_workspace_bytes(ws_bytes)
            for dtype in (torch.float32, torch.bfloat16):
                tag = f"[{logits_mode} {ws_tag} {str(dtype)[6:]}]"
                logprobs_case(tag, 37, 40, 3001, dtype, 0.8, 10.0, g)
                logprobs_case(tag + " V123", 9, 24, 123, dtype, 1.0, None, g)
                for kind in ("forward_kl", "reverse_kl", "jsd"):
                    divergence_case(tag, 29, 24, 16, 2049, dtype, kind, 1.3, g)
    fp.set_workspace_bytes(default_ws)
    os.environ.pop("FASTPREF_CUDA_LOGITS", None)
    torch.cuda.synchronize()
    print(f"cuda_small_case: {'FAIL ' + str(failures) if failures else 'PASS'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
