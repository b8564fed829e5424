"""Small end-to-end run of every CUDA-backend kernel path, for compute-sanitizer (gpu_check_cuda.sh).

Builds (or loads) the extension, then runs forward + backward with ``backend="cuda"`` on small odd
shapes and compares every output and gradient with the fp64 oracle (|out - truth| <= 2 |naive -
truth| + floor; ``is_top1`` exactly, away from near-ties):

* ``linear_logprobs`` with every extra output (entropy, log_sum_sq_probs, mean_logits, is_top1),
  bias, temperature, softcap and logit_scale;
* ``linear_divergence`` (three kinds) with the student entropy and per-head logit scales;
* the registered ops ``torch.ops.fastpref.*`` on two vocabulary slices (``vocab_start``), merged as
  the vocabulary-parallel layer merges them (a sharded JSD takes its second call with the merged lse);

in fp32 / bf16, fp32 tiles and native bf16 tiles (FASTPREF_CUDA_LOGITS=native, dz in place), logits
kept for the backward and recomputed, a whole-vocabulary tile and split ones (256 KiB workspace).
Exits 1 on any mismatch, 2 when no GPU is present.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace

import torch

import fastpref as fp
from fastpref import reference as ref
from fastpref.backends import contract as C
from fastpref.backends import cuda_build
from fastpref.backends import registered_ops as R

EXTRAS = C.EXTRA_OUTPUTS
DEVICE = "cuda"  # tests/test_cuda_backend.py runs these cases on CPU with a Python model of the kernels
failures: list[str] = []


def check(name, out, naive, truth, dtype):
    truth, out, naive = truth.double().cpu(), out.double().cpu(), naive.double().cpu()
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


def check_top1(name, got, truth, z64, labels):
    keep = labels != -100
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    zl = z64.gather(1, safe[:, None])[:, 0]
    near = keep & ((zl - z64.scatter(1, safe[:, None], float("-inf")).amax(1)).abs() < 1e-3)
    ok = torch.equal(got.cpu()[~near], truth[~near])
    print(f"  {'ok ' if ok else 'BAD'} {name}: {int(truth.sum())} top-1 rows")
    if not ok:
        failures.append(name)


def head(n, d, v, dtype, bias, g):
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * (3.0 / d**0.5)
    b = torch.randn(v, generator=g, dtype=torch.float64) * 0.5 if bias else None
    return [None if t is None else t.to(dtype) for t in (h, w, b)]


def labels_for(h, w, b, n, v, g, **kw):
    labels = torch.randint(0, v, (n,), generator=g)
    z = ref.materialize_logits(h, w, b, **kw)
    labels = torch.where(torch.rand(n, generator=g) < 0.4, z.argmax(1), labels)  # some rows are top-1
    labels[torch.rand(n, generator=g) < 0.2] = -100
    return labels, z


def dev_leaves(ts):
    return [None if t is None else t.detach().to(DEVICE).requires_grad_() for t in ts]


def cpu_leaves(ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def logprobs_case(tag, n, d, v, dtype, g):
    kw = dict(temperature=0.8, softcap=10.0, logit_scale=1.3)
    h, w, b = head(n, d, v, dtype, True, g)
    labels, z64 = labels_for(h, w, b, n, v, g, **kw)
    g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)

    x = dev_leaves((h, w, b))
    out = fp.linear_logprobs(x[0], x[1], labels.to(DEVICE), x[2], outputs=EXTRAS, backend="cuda", **kw)
    ((out.logp * g_lp.to(DEVICE)).sum() + (out.entropy * g_ent.to(DEVICE)).sum()).backward()
    got = {name: getattr(out, name).detach() for name in ("logp", *EXTRAS)}
    got_grads = [t.grad for t in x]

    def oracle(precision):
        y = cpu_leaves((h, w, b))
        o = ref.linear_logprobs(y[0], y[1], labels, y[2], outputs=EXTRAS, precision=precision, **kw)
        ((o["logp"].double() * g_lp).sum() + (o["entropy"].double() * g_ent).sum()).backward()
        return o, [t.grad for t in y]

    truth, truth_grads = oracle("fp64")
    naive, naive_grads = oracle("native")
    for name in ("logp", "entropy", "log_sum_sq_probs", "mean_logits"):
        check(f"{tag} {name}", got[name], naive[name].detach(), truth[name].detach(), torch.float32)
    check_top1(f"{tag} is_top1", got["is_top1"], truth["is_top1"], z64, labels)
    for name, a, nv, t in zip(("d_hidden", "d_weight", "d_bias"), got_grads, naive_grads, truth_grads):
        check(f"{tag} {name}", a, nv, t, dtype)


def sharded_logprobs_case(tag, n, d, v, dtype, g, shards=2):
    """The registered ops on vocabulary slices, merged; backward per slice with the merged lse / entropy."""
    h, w, b = head(n, d, v, dtype, True, g)
    labels, z64 = labels_for(h, w, b, n, v, g, temperature=1.1)
    opts = C.LogprobsOptions(transform=C.Transform(1.1), entropy=True, log_sum_sq_probs=True, mean_logits=True,
                             is_top1=True, vocab_size=v, cache=True)
    hc, wc, bc, lc = h.to(DEVICE), w.to(DEVICE), b.to(DEVICE), labels.to(DEVICE)
    step = -(-v // shards)
    bounds = [(v0, min(v0 + step, v)) for v0 in range(0, v, step)]
    parts, caches = [], []
    for v0, v1 in bounds:
        stats, cache = R.logprobs_fwd(hc, wc[v0:v1], lc, bc[v0:v1], replace(opts, vocab_start=v0), "cuda")
        parts.append(stats)
        caches.append(cache)
    rows = C.finish_logprobs(C.merge_logprobs(torch.stack(parts)), lc, opts)
    g_lp = torch.randn(n, generator=g)
    gm, _ = C.mask_logprobs_grads(g_lp.to(DEVICE), None, lc, opts)
    d_h, d_w = 0, []
    for (v0, v1), cache in zip(bounds, caches):
        dh, dw, _ = R.logprobs_bwd(gm, None, hc, wc[v0:v1], lc, bc[v0:v1], rows.lse, None, cache,
                                   replace(opts, vocab_start=v0), "cuda", (True, True, False))
        d_h = d_h + dh.float()
        d_w.append(dw)

    def oracle(precision):
        y = cpu_leaves((h, w))
        o = ref.linear_logprobs(y[0], y[1], labels, b, temperature=1.1, outputs=EXTRAS, precision=precision)
        (o["logp"].double() * g_lp).sum().backward()
        return o, [t.grad for t in y]

    truth, truth_grads = oracle("fp64")
    naive, naive_grads = oracle("native")
    for name in ("logp", "entropy", "log_sum_sq_probs", "mean_logits"):
        check(f"{tag} sharded {name}", getattr(rows, name), naive[name].detach(), truth[name].detach(), torch.float32)
    check_top1(f"{tag} sharded is_top1", rows.is_top1, truth["is_top1"], z64, labels)
    check(f"{tag} sharded d_hidden", d_h.to(dtype), naive_grads[0], truth_grads[0], dtype)
    check(f"{tag} sharded d_weight", torch.cat(d_w), naive_grads[1], truth_grads[1], dtype)


def divergence_case(tag, n, ds, dt, v, dtype, kind, g):
    hs, ws, bs = head(n, ds, v, dtype, True, g)
    ht, wt, bt = head(n, dt, v, dtype, False, g)
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = -100
    grad = torch.randn(n, generator=g)
    kw = dict(kind=kind, beta=0.3, temperature=1.3, student_softcap=7.0, student_logit_scale=1.2,
              teacher_logit_scale=0.9)

    x = dev_leaves((hs, ws, bs))
    div, ent = fp.linear_divergence(x[0], x[1], ht.to(DEVICE), wt.to(DEVICE), labels.to(DEVICE), student_bias=x[2],
                                    return_entropy=True, backend="cuda", **kw)
    (div * grad.to(DEVICE)).sum().backward()
    got = [div.detach(), ent] + [t.grad for t in x]

    def oracle(precision):
        y = cpu_leaves((hs, ws, bs))
        dv, en = ref.linear_divergence(y[0], y[1], ht, wt, labels, student_bias=y[2], return_entropy=True,
                                       precision=precision, **kw)
        (dv.double() * grad).sum().backward()
        return [dv.detach(), en] + [t.grad for t in y]

    truth, naive = oracle("fp64"), oracle("native")
    for name, a, nv, t in zip((kind, "entropy", "d_hidden", "d_weight", "d_bias"), got, naive, truth):
        check(f"{tag} {kind} {name}", a, nv, t, dtype if name.startswith("d_") else torch.float32)


def sharded_divergence_case(tag, n, d, v, dtype, kind, g, shards=2):
    hs, ws, _ = head(n, d, v, dtype, False, g)
    ht, wt, _ = head(n, d, v, dtype, False, g)
    opts = C.DivergenceOptions(kind=C.KIND_NAMES[kind], beta=0.3, entropy=True, vocab_size=v, cache=True)
    hsc, wsc, htc, wtc = hs.to(DEVICE), ws.to(DEVICE), ht.to(DEVICE), wt.to(DEVICE)
    step = -(-v // shards)
    bounds = [(v0, min(v0 + step, v)) for v0 in range(0, v, step)]
    outs = [R.divergence_fwd(hsc, wsc[a:b], None, htc, wtc[a:b], None, None, replace(opts, vocab_start=a), "cuda")
            for a, b in bounds]
    stats = C.merge_divergence(torch.stack([o[0] for o in outs]), opts.kind)
    if opts.kind == C.Kind.JSD:
        lse = C.divergence_lse(stats)
        kl = [R.divergence_fwd(hsc, wsc[a:b], None, htc, wtc[a:b], None, lse, replace(opts, vocab_start=a), "cuda")[0]
              for a, b in bounds]
        stats[[C.DV_KLT, C.DV_KLS]] = sum(k[[C.DV_KLT, C.DV_KLS]] for k in kl)
    rows = C.finish_divergence(stats, None, opts)
    grad = torch.randn(n, generator=g)
    d_w = [R.divergence_bwd(grad.to(DEVICE), hsc, wsc[a:b], None, htc, wtc[a:b], None, rows.saved, o[1],
                            replace(opts, vocab_start=a), "cuda", (False, True, False))[1]
           for (a, b), o in zip(bounds, outs)]

    def oracle(precision):
        y = cpu_leaves((ws,))
        dv, en = ref.linear_divergence(hs, y[0], ht, wt, kind=kind, beta=0.3, return_entropy=True,
                                       precision=precision)
        (dv.double() * grad).sum().backward()
        return dv.detach(), en, y[0].grad

    truth, naive = oracle("fp64"), oracle("native")
    for name, a, nv, t in zip((kind, "entropy", "d_weight"), (rows.div, rows.entropy, torch.cat(d_w)), naive, truth):
        check(f"{tag} sharded {kind} {name}", a, nv, t, dtype if name == "d_weight" else torch.float32)


def main() -> int:
    if not torch.cuda.is_available():
        print("cuda_small_case: no CUDA GPU")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the naive reference's fp32 GEMMs do not use TF32 either
    t0 = time.perf_counter()
    cuda_build.load()
    print(f"extension ready in {time.perf_counter() - t0:.1f}s")
    g = torch.Generator().manual_seed(0)
    default_ws = fp.get_workspace_bytes()
    # (tiles, keep logits, workspace, input dtypes): every kernel instantiation the host code launches (fp32 tiles
    # with fp32 / bf16 dz, native bf16 tiles with dz in place), the cache (fp32 whatever the tiles), and a 256 KiB
    # workspace that splits rows and vocabulary into several tiles; kept small for the sanitizer runs.
    configs = [("fp32", True, default_ws, (torch.float32, torch.bfloat16)),
               ("fp32", False, 2**18, (torch.float32, torch.bfloat16)),
               ("native", False, 2**18, (torch.bfloat16,))]
    for logits_mode, keep, ws_bytes, dtypes in configs:
        os.environ["FASTPREF_CUDA_LOGITS"] = logits_mode
        fp.set_keep_logits(keep)
        fp.set_workspace_bytes(ws_bytes)
        for dtype in dtypes:
            tag = (f"[{logits_mode} {'keep' if keep else 'recompute'} {'whole-V' if ws_bytes == default_ws else 'split-V'}"
                   f" {str(dtype)[6:]}]")
            logprobs_case(tag, 37, 40, 3001, dtype, g)
            logprobs_case(tag + " V123", 9, 24, 123, dtype, g)
            sharded_logprobs_case(tag, 21, 24, 1001, dtype, g)
            for kind in ("forward_kl", "reverse_kl", "jsd"):
                divergence_case(tag, 29, 24, 16, 2049, dtype, kind, g)
            sharded_divergence_case(tag, 19, 16, 777, dtype, "jsd", g)  # the second call with the merged lse
    fp.set_workspace_bytes(default_ws)
    fp.set_keep_logits(True)
    os.environ.pop("FASTPREF_CUDA_LOGITS", None)
    torch.cuda.synchronize()
    print(f"cuda_small_case: {'FAIL ' + str(failures) if failures else 'PASS'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
