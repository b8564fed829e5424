"""GPU comparison of fused LM-head losses, forward + backward, against the cuBLAS GEMM floor.

    python benchmarks/gpu_check.py                     # the three default shapes, bf16, every provider
    python benchmarks/gpu_check.py --out DIR           # results: DIR/gpu_check.{md,json} (default: $OUT or bench-results/)
    python benchmarks/gpu_check.py --shapes 8192x4096x131072 --providers floor3,fastpref-triton,liger-flce
    python benchmarks/gpu_check.py --dry-run           # CPU, tiny shapes: the wiring, the tables, the error handling
    python benchmarks/gpu_check.py --small             # tiny odd-shaped Triton run (for compute-sanitizer); no timing

Run on the GPU machine by ``benchmarks/gpu_check.sh`` (BENCHMARKS.md, "How to run the GPU check").

Tasks and providers, all on the same seeded inputs in one run (hidden ~ N(0, 1), head ~ N(0, 1/D),
never zeros; ``NxDxV`` = tokens x hidden x vocabulary):

* ``logprobs``: per-token log-probabilities of the labels, backward with a random per-token upstream
  gradient (gradients for hidden and weight):
  ``floor3`` / ``floor4``: the three GEMMs of a materialising implementation (``h @ W.T``, ``dz @ W``,
  ``dz.T @ h``) and four (one recompute of the logits, what a fused backward costs), cuBLAS in the input
  dtype; every time is also reported as a multiple of both.  ``naive`` / ``compiled``: fastpref's
  reference with ``precision="native"`` (materialised logits), eager / ``torch.compile``d.
  ``fastpref-{triton,cuda,torch}``: ``fastpref.linear_logprobs(backend=...)``.
  ``liger-flce``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss(reduction="none")`` (per-token
  gradient; the backward recomputes), ``liger-flce-sum``: the same with ``reduction="sum"`` (gradients
  computed in the forward, a scalar upstream gradient).  ``cce``: cut-cross-entropy's
  ``linear_cross_entropy(reduction="none")`` (its Triton ``impl="cce"`` with the library's default
  gradient filtering; ``torch_compile`` on CPU).  ``trl``: TRL 1.16's ``ChunkedLogProbFunction``
  (32768-column chunks, TRL's default).  ``torch-lce``: ``torch.nn.functional.linear_cross_entropy`` with
  ``LinearCrossEntropyOptions()`` (chunked), where this torch has it.  ``flash-attn-ce``: flash-attn's
  Triton cross-entropy (``flash_attn/ops/triton/cross_entropy.py``, loaded by file path) over
  materialised bf16 logits, ``inplace_backward=True``.
* ``dpo``: sigmoid DPO (beta 0.1, mean over pairs of summed log-probs), 4 pairs of ``N/8``-token
  sequences whose first quarter is prompt (ignored), policy + a frozen reference head given as hidden
  states and weight: ``naive``, ``compiled``, ``fastpref-*`` (``fastpref.dpo_loss``) and ``liger-dpo``
  (``LigerFusedLinearDPOLoss``, library defaults: ``compiled=True``, one pair per chunk).

Correctness: every provider's first call is compared with the fp64 oracle (``fastpref.reference`` in
float64, in row chunks) on the same inputs: ``err`` columns are ``||x - truth|| / ||truth||`` of the
per-token log-probs (or the scalar loss), d hidden and d weight.  A fastpref row is flagged when an
error exceeds twice the ``naive`` row's plus 1e-5 (the accuracy rule of docs/design.md §6, in norms; 2e-2 when the naive row did not run).
Time: median of ``--iters`` CUDA-event timings after ``--warmup`` calls (compilation, autotuning and
correctness in the first).  Memory: ``torch.cuda.max_memory_allocated`` during one call minus what was
allocated before it (inputs excluded, gradients included).

Robustness: the items run in a worker process; an item that raises is recorded with its error, one that
kills the process (a sticky CUDA error, a crash) or exceeds ``--item-timeout`` is recorded so and a fresh
worker goes on with the rest; ``--budget-s`` bounds the whole run.  Results are rewritten after every item.
Exit status: 1 if a fastpref row failed or was flagged, else 0 (other providers' failures are reported only).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

EVENT = "@gpu_check "  # prefix of the worker's machine-readable stdout lines
DEFAULT_SHAPES = "8192x4096x131072,8192x4096x151936,8192x2304x256000"
DRY_SHAPES = "64x32x500,48x24x777"
DPO_SEQUENCES = 8  # 4 pairs: chosen then rejected
DPO_BETA = 0.1
IGNORE_INDEX = -100
TRL_CHUNK_SIZE = 32768  # trl/trainer/utils.py: _CHUNKED_LOGPROB_CHUNK_SIZE in TRL 1.16
PROVIDERS = {
    "logprobs": ("floor3", "floor4", "naive", "compiled", "fastpref-triton", "fastpref-cuda", "fastpref-torch",
                 "liger-flce", "liger-flce-sum", "cce", "trl", "torch-lce", "flash-attn-ce"),
    "dpo": ("naive", "compiled", "fastpref-triton", "fastpref-cuda", "fastpref-torch", "liger-dpo"),
}
DEFAULT_OFF = ("compiled",)  # torch.compile per shape costs more device time than it tells
FAULTS = ("fault-raise", "fault-exit", "fault-hang")  # --dry-run only: exercise the error handling
OPTIONAL_PACKAGES = {"liger_kernel", "cut_cross_entropy", "trl", "flash_attn"}  # missing -> "skipped"
PACKAGES = ("torch", "triton", "fastpref", "liger-kernel", "cut-cross-entropy", "trl", "flash-attn", "transformers",
            "numpy")


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--small", action="store_true",
                   help="tiny odd-shaped correctness run of every Triton kernel (for compute-sanitizer); no timing")
    p.add_argument("--dry-run", action="store_true",
                   help=f"CPU, float32, tiny shapes ({DRY_SHAPES}), Triton under its interpreter: checks the wiring of "
                        "every provider, the report and the error handling; times mean nothing")
    p.add_argument("--shapes", default=None, help=f"comma-separated NxDxV (default: {DEFAULT_SHAPES})")
    p.add_argument("--tasks", default="logprobs,dpo", help="comma-separated, of: logprobs, dpo")
    p.add_argument("--providers", default=None,
                   help=f"comma-separated provider names (default: all but {','.join(DEFAULT_OFF)}); 'all' for every one")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="input dtype (default: bfloat16; float32 with --dry-run)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls, the first also checked (default 2)")
    p.add_argument("--iters", type=int, default=None, help="timed calls (default 5; 2 with --dry-run)")
    p.add_argument("--item-timeout", type=float, default=None,
                   help="seconds one (shape, task, provider) may take before its worker is killed (default 180)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for the whole run; items not started by then are recorded as skipped (default: none)")
    p.add_argument("--out", default=None, help="folder for gpu_check.md / gpu_check.json (default: $OUT, else bench-results/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: a plan file to run
    args = p.parse_args(argv)
    dry = args.dry_run
    args.shapes = args.shapes or (DRY_SHAPES if dry else DEFAULT_SHAPES)
    args.dtype = args.dtype or ("float32" if dry else "bfloat16")
    args.device = args.device or ("cpu" if dry else "cuda")
    args.warmup = 1 if args.warmup is None and dry else (2 if args.warmup is None else args.warmup)
    args.iters = args.iters if args.iters is not None else (2 if dry else 5)
    args.item_timeout = args.item_timeout if args.item_timeout is not None else 180.0
    if args.warmup < 1 or args.iters < 1:
        p.error("--warmup and --iters must be >= 1 (the first call is the checked one)")
    return args


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



# --------------------------------------------------------------------------- plan


def _shape(text: str) -> tuple:
    try:
        n, d, v = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: expected NxDxV, got {text!r}") from None
    if min(n, d, v) < 1 or n % DPO_SEQUENCES:
        raise SystemExit(f"--shapes: {text!r}: sizes must be positive and N a multiple of {DPO_SEQUENCES} (DPO layout)")
    return n, d, v


def make_plan(args) -> list:
    """Every (shape, task, provider) to run, in order, with an id."""
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for t in tasks:
        if t not in PROVIDERS:
            raise SystemExit(f"--tasks: unknown {t!r} (choices: {', '.join(PROVIDERS)})")
    known = {p for ps in PROVIDERS.values() for p in ps} | set(FAULTS)
    if args.providers in (None, "all"):
        wanted = None
    else:
        wanted = [p.strip() for p in args.providers.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in known]
        if unknown:
            raise SystemExit(f"--providers: unknown {unknown} (choices: {', '.join(sorted(known))})")
        if any(p in FAULTS for p in wanted) and not args.dry_run:
            raise SystemExit(f"--providers: {', '.join(FAULTS)} exist for --dry-run only")
    plan = []
    for shape in (_shape(s) for s in args.shapes.split(",") if s.strip()):
        for task in tasks:
            names = list(PROVIDERS[task]) + (list(FAULTS) if task == "logprobs" else [])
            if wanted is None:
                names = [p for p in names if p not in FAULTS and (args.providers == "all" or p not in DEFAULT_OFF)]
            else:
                names = [p for p in names if p in wanted]
            for provider in names:
                plan.append({"id": len(plan), "shape": list(shape), "task": task, "provider": provider})
    return plan


# --------------------------------------------------------------------------- worker: inputs and the fp64 oracle


class Skip(Exception):
    """A provider that cannot run here; the message says why."""


class Case:
    """One shape's seeded inputs, and the fp64 truths computed on first use."""

    def __init__(self, shape, dtype, device, seed):
        import torch

        self.n, self.d, self.v = shape
        self.dtype, self.device = dtype, device
        gen = torch.Generator(device=device).manual_seed(seed)
        self._gen = gen

        def rnd(*size, scale=1.0):
            return (torch.randn(*size, generator=gen, device=device) * scale).to(dtype)

        n, d, v = shape
        self.h = rnd(n, d)
        self.w = rnd(v, d, scale=d**-0.5)
        self.labels = torch.randint(0, v, (n,), generator=gen, device=device)
        self.g = torch.randn(n, generator=gen, device=device)  # per-token upstream gradient (fp32)
        self.s = 0.5 + torch.rand((), generator=gen, device=device).item()  # scalar upstream gradient
        t = n // DPO_SEQUENCES
        self.labels_dpo = torch.randint(0, v, (DPO_SEQUENCES, t), generator=gen, device=device)
        self.labels_dpo[:, : t // 4] = IGNORE_INDEX
        self._ref_head = None
        self._truth = {}

    @property
    def ref_head(self):
        """The DPO reference model: perturbed hidden states and head (frozen)."""
        if self._ref_head is None:
            import torch

            n, d, v = self.n, self.d, self.v
            noise_h = torch.randn(n, d, generator=self._gen, device=self.device) * 0.1
            noise_w = torch.randn(v, d, generator=self._gen, device=self.device) * (0.1 * d**-0.5)
            self._ref_head = ((self.h.float() + noise_h).to(self.dtype), (self.w.float() + noise_w).to(self.dtype))
        return self._ref_head

    def leaves(self):
        return self.h.detach().requires_grad_(), self.w.detach().requires_grad_()

    def seq(self, x):
        """``(N, ...) -> (DPO_SEQUENCES, N / DPO_SEQUENCES, ...)``."""
        return x.reshape(DPO_SEQUENCES, self.n // DPO_SEQUENCES, *x.shape[1:])

    def truth(self, task):
        if task not in self._truth:
            try:
                self._truth[task] = self._logprobs_truth() if task == "logprobs" else self._dpo_truth()
            except Exception as exc:
                self._truth[task] = exc  # remembered: the next providers do not retry an oracle that failed
                raise
        if isinstance(self._truth[task], Exception):
            raise RuntimeError(f"the fp64 oracle failed earlier for this shape: {self._truth[task]}")
        return self._truth[task]

    def _rows(self):
        """Rows per oracle chunk: about 2 GiB of float64 logits."""
        return max(1, (2 << 30) // (8 * self.v))

    def _oracle(self, h, w, labels, weights):
        """fp64 per-row log-probs, and for each per-row weight vector ``c`` the gradients of ``sum(c * logp)``
        w.r.t. ``h`` and ``w`` (fastpref.reference in float64, exact row by row, so computed in row chunks)."""
        import torch

        from fastpref import reference

        n = h.shape[0]
        w64 = w.double().requires_grad_(bool(weights))
        logp = torch.empty(n, dtype=torch.float64, device=h.device)
        dh = [torch.empty(h.shape, dtype=torch.float64, device=h.device) for _ in weights]
        dw = [torch.zeros(w.shape, dtype=torch.float64, device=h.device) for _ in weights]
        rows = self._rows()
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            hc = h[r0:r1].double().requires_grad_(bool(weights))
            with torch.set_grad_enabled(bool(weights)):
                lp = reference.linear_logprobs(hc, w64, labels[r0:r1], ignore_index=IGNORE_INDEX, precision="fp64")
            logp[r0:r1] = lp.detach()
            for k, c in enumerate(weights):
                gh, gw = torch.autograd.grad(lp, (hc, w64), grad_outputs=c[r0:r1].double(),
                                             retain_graph=k + 1 < len(weights))
                dh[k][r0:r1] = gh
                dw[k] += gw
            del lp, hc
        return logp, dh, dw

    def _logprobs_truth(self):
        ones = self.g.new_ones(self.n)
        logp, dh, dw = self._oracle(self.h, self.w, self.labels, [self.g, ones])
        return {"logp": logp, "dh": dh[0], "dw": dw[0], "dh_ones": dh[1], "dw_ones": dw[1]}

    def _dpo_truth(self):
        import torch
        import torch.nn.functional as F

        labels = self.labels_dpo.reshape(-1)
        ref_h, ref_w = self.ref_head
        ref_tok, _, _ = self._oracle(ref_h, ref_w, labels, [])
        pol_tok, _, _ = self._oracle(self.h, self.w, labels, [])
        tok = self.seq(pol_tok).clone().requires_grad_()
        ref_seq = self.seq(ref_tok).sum(-1)
        p = DPO_SEQUENCES // 2
        rho = tok.sum(-1) - ref_seq
        loss = -F.logsigmoid(DPO_BETA * (rho[:p] - rho[p:])).mean()
        (coef,) = torch.autograd.grad(loss, tok)  # d loss / d token log-prob: the per-row weights
        _, dh, dw = self._oracle(self.h, self.w, labels, [coef.reshape(-1)])
        return {"loss": loss.detach(), "dh": dh[0], "dw": dw[0]}


def _rel(x, ref) -> float:
    """``||x - ref|| / ||ref||`` in float64 (by row blocks: no float64 copy of a whole weight gradient)."""
    import torch

    x = x.detach()
    if tuple(x.shape) != tuple(ref.shape):
        return float("nan")
    if not bool(torch.isfinite(x).all()):
        return float("inf")
    if x.dim() == 0:
        num, den = abs(x.double().item() - ref.double().item()), abs(ref.double().item())
    else:
        num = math.sqrt(sum((a.double() - b).norm().item() ** 2 for a, b in zip(x.split(4096), ref.split(4096))))
        den = ref.norm().item()
    return num / den if den > 0 else num


def check(case, task, res) -> dict:
    """Relative errors of one provider's first call against the fp64 oracle."""
    kind = res["kind"]
    if kind == "floor":
        return {}
    truth = case.truth(task)
    if kind == "tokens":  # per-token log-probs, upstream gradient g
        return {"err_out": _rel(res["out"].float(), truth["logp"]), "err_dh": _rel(res["dh"], truth["dh"]),
                "err_dw": _rel(res["dw"], truth["dw"])}
    if kind == "sum_nll":  # sum of negative log-probs, scalar upstream gradient s
        return {"err_out": _rel(res["out"].float().reshape(()), -truth["logp"].sum()),
                "err_dh": _rel(res["dh"], -case.s * truth["dh_ones"]),
                "err_dw": _rel(res["dw"], -case.s * truth["dw_ones"])}
    if kind == "dpo":  # scalar DPO loss, scalar upstream gradient s
        return {"err_out": _rel(res["out"].float().reshape(()), truth["loss"]),
                "err_dh": _rel(res["dh"], case.s * truth["dh"]), "err_dw": _rel(res["dw"], case.s * truth["dw"])}
    raise ValueError(kind)


# --------------------------------------------------------------------------- worker: providers
# Each factory returns step(): one forward + backward on fresh leaves, returning
# {"kind", "out", "dh", "dw"}; "kind" says which oracle quantity "out" and the gradients match.


def _load_flash_attn_ce():
    """flash-attn's Triton cross-entropy, loaded by file path: the package's __init__ imports its CUDA
    extension, which a pure-Python build of flash-attn does not have."""
    spec = importlib.util.find_spec("flash_attn")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise Skip("flash-attn is not installed (benchmarks/fetch_gpu_wheels.sh builds a pure-Python wheel)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "ops", "triton", "cross_entropy.py")
    if not os.path.isfile(path):
        raise Skip(f"flash-attn has no {path}")
    mspec = importlib.util.spec_from_file_location("_flash_attn_triton_cross_entropy", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod.cross_entropy_loss


def _naive_token_logps(h, w, labels):
    from fastpref import reference

    return reference.linear_logprobs(h, w, labels, ignore_index=IGNORE_INDEX, precision="native")


def _naive_dpo(h, w, labels, ref_h, ref_w):
    import torch
    import torch.nn.functional as F

    from fastpref import reference

    logps = reference.sequence_logprobs(h, w, labels, ignore_index=IGNORE_INDEX, precision="native")
    with torch.no_grad():
        ref_logps = reference.sequence_logprobs(ref_h, ref_w, labels, ignore_index=IGNORE_INDEX, precision="native")
    p = logps.shape[0] // 2
    rho = logps - ref_logps
    return -F.logsigmoid(DPO_BETA * (rho[:p] - rho[p:])).mean()


def _fastpref_backend(name, device):
    import fastpref

    backend = name[len("fastpref-"):]
    reason = fastpref.available_backends(device).get(backend, f"unknown backend {backend!r}")
    if reason is not None:
        raise Skip(reason)
    return backend


def logprobs_step(provider, case):
    import torch

    dev, labels, g, s = case.device, case.labels, case.g, case.s

    def tokens(fn):  # fn(h, w) -> per-token log-probs
        def step():
            h, w = case.leaves()
            logp = fn(h, w)
            logp.backward(g.to(logp.dtype))
            return {"kind": "tokens", "out": logp.detach(), "dh": h.grad, "dw": w.grad}
        return step

    if provider in ("floor3", "floor4"):
        recompute = provider == "floor4"

        def step():
            h, w = case.h, case.w
            dz = h @ w.T  # the logits; they stand in for their gradient (same shape and dtype)
            if recompute:
                dz = h @ w.T
            return {"kind": "floor", "dh": dz @ w, "dw": dz.T @ h}
        return step
    if provider == "naive":
        return tokens(lambda h, w: _naive_token_logps(h, w, labels))
    if provider == "compiled":
        fn = torch.compile(_naive_token_logps)
        return tokens(lambda h, w: fn(h, w, labels))
    if provider.startswith("fastpref-"):
        import fastpref

        backend = _fastpref_backend(provider, dev)
        return tokens(lambda h, w: fastpref.linear_logprobs(h, w, labels, backend=backend))
    if provider in ("liger-flce", "liger-flce-sum"):
        if dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise Skip("Liger-Kernel's fused linear cross-entropy is a Triton kernel: CUDA (or TRITON_INTERPRET=1)")
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        if provider == "liger-flce":
            lce = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="none")
            return tokens(lambda h, w: -lce(w, h, labels).float())
        lce = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")

        def step():
            h, w = case.leaves()
            loss = lce(w, h, labels)
            loss.backward(torch.full_like(loss, s))
            return {"kind": "sum_nll", "out": loss.detach(), "dh": h.grad, "dw": w.grad}
        return step
    if provider == "cce":
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if dev.type == "cuda" else "torch_compile"
        return tokens(lambda h, w: -linear_cross_entropy(h, w, labels, ignore_index=IGNORE_INDEX, reduction="none",
                                                         impl=impl).float())
    if provider == "trl":
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        # (hidden, weight, bias, targets, temperature, chunk_size, softcap, logit_scale, outputs)
        return tokens(lambda h, w: ChunkedLogProbFunction.apply(h, w, None, labels, 1.0, TRL_CHUNK_SIZE, None, 1.0,
                                                                ())[0])
    if provider == "torch-lce":
        import torch.nn.functional as F

        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            raise Skip(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy "
                       "with LinearCrossEntropyOptions (a newer torch has it)")
        opts = torch.nn.LinearCrossEntropyOptions()
        return tokens(lambda h, w: -F.linear_cross_entropy(h, w, labels, reduction="none", ignore_index=IGNORE_INDEX,
                                                           options=opts).float())
    if provider == "flash-attn-ce":
        ce = _load_flash_attn_ce()
        if dev.type != "cuda":
            raise Skip("flash-attn's Triton cross-entropy runs on CUDA tensors only (loaded fine)")
        return tokens(lambda h, w: -ce(h @ w.T, labels, inplace_backward=True)[0].float())
    if provider == "fault-raise":
        def step():
            raise RuntimeError("fault-raise: a provider that raises (--dry-run self-test)")
        return step
    if provider == "fault-exit":
        def step():
            print("fault-exit: killing the worker (--dry-run self-test)", flush=True)
            os._exit(7)
        return step
    if provider == "fault-hang":
        def step():
            time.sleep(3600)
        return step
    raise ValueError(f"logprobs: unknown provider {provider!r}")


def dpo_step(provider, case):
    import torch

    labels = case.labels_dpo
    ref_h, ref_w = case.seq(case.ref_head[0]), case.ref_head[1]

    def scalar(fn):  # fn(h, w) with h (sequences, T, D) -> scalar loss
        def step():
            h, w = case.leaves()
            loss = fn(case.seq(h), w)
            loss.backward(torch.full_like(loss, case.s))
            return {"kind": "dpo", "out": loss.detach(), "dh": h.grad, "dw": w.grad}
        return step

    if provider == "naive":
        return scalar(lambda h, w: _naive_dpo(h, w, labels, ref_h, ref_w))
    if provider == "compiled":
        fn = torch.compile(_naive_dpo)
        return scalar(lambda h, w: fn(h, w, labels, ref_h, ref_w))
    if provider.startswith("fastpref-"):
        import fastpref

        backend = _fastpref_backend(provider, case.device)
        return scalar(lambda h, w: fastpref.dpo_loss(h, w, labels, ref_hidden=ref_h, ref_weight=ref_w, beta=DPO_BETA,
                                                     ignore_index=IGNORE_INDEX, backend=backend))
    if provider == "liger-dpo":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        dpo = LigerFusedLinearDPOLoss(ignore_index=IGNORE_INDEX, beta=DPO_BETA, use_ref_model=True, loss_type="sigmoid")

        def fn(h, w):
            out = dpo(w, h, labels, ref_input=ref_h, ref_weight=ref_w)
            return out[0] if isinstance(out, tuple) else out
        return scalar(fn)
    raise ValueError(f"dpo: unknown provider {provider!r}")


# --------------------------------------------------------------------------- worker: measuring


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step, case, task, warmup, iters) -> dict:
    """Check the first call, warm up, then peak memory of one call and the median of ``iters`` timed calls."""
    import torch

    dev = case.device
    cuda = dev.type == "cuda"
    t0 = time.perf_counter()
    res = step()
    _sync(dev)
    first_s = time.perf_counter() - t0
    out = {"first_call_s": round(first_s, 3)}
    try:
        out.update(check(case, task, res))
    except Exception as exc:  # the oracle failed (e.g. out of memory): the timing still counts
        traceback.print_exc()
        out["check_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    del res
    for _ in range(warmup - 1):
        step()
    _sync(dev)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        res = step()
        torch.cuda.synchronize(dev)
        out["peak_mib"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
        del res
    else:
        out["peak_mib"] = None  # the CPU has no allocator statistics worth quoting here
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            res = step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            res = step()
            times.append((time.perf_counter() - t) * 1e3)
        del res
    out["ms"] = statistics.median(times)
    out["times_ms"] = [round(t, 4) for t in times]
    return out


def _emit(obj):
    sys.stdout.write(EVENT + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _meta(device) -> dict:
    import torch

    import fastpref

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "versions": _versions(), "fastpref_file": fastpref.__file__,
            "backends": fastpref.available_backends(device),
            "cutlass_dsl": importlib.util.find_spec("cutlass") is not None,
            "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta.update(device=torch.cuda.get_device_name(device), sm=f"{props.major}.{props.minor}",
                    sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    else:
        meta["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return meta


def _context_alive(device) -> bool:
    """False when the CUDA context is unusable (a sticky error): the worker must be replaced."""
    try:
        _sync(device)
        return True
    except Exception:
        return False


def _failure(exc) -> dict:
    import torch

    if isinstance(exc, Skip):
        return {"status": "skipped", "reason": str(exc)}
    if isinstance(exc, ModuleNotFoundError) and (exc.name or "").split(".")[0] in OPTIONAL_PACKAGES:
        return {"status": "skipped", "reason": f"not installed: {exc} (benchmarks/fetch_gpu_wheels.sh carries it)"}
    traceback.print_exc()
    oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
    return {"status": "OOM" if oom else "error", "reason": f"{type(exc).__name__}: {str(exc)[:500]}"}


def run_worker(plan_path: str) -> int:
    with open(plan_path) as f:
        doc = json.load(f)
    import torch

    settings, items = doc["settings"], doc["items"]
    device = torch.device(settings["device"])
    dtype = getattr(torch, settings["dtype"])
    _emit({"type": "meta", "meta": _meta(device)})
    case = None
    for item in items:
        _emit({"type": "start", "id": item["id"]})
        shape, task, provider = tuple(item["shape"]), item["task"], item["provider"]
        print(f"--- {'x'.join(map(str, shape))} {task} {provider}", flush=True)
        res = {"type": "result", "id": item["id"]}
        try:
            if case is None or (case.n, case.d, case.v) != shape:
                case = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                case = Case(shape, dtype, device, settings["seed"])
            for other in [t for t in case._truth if t != task]:
                del case._truth[other]  # the tasks of a shape run one after the other: free the last one's truth
            factory = logprobs_step if task == "logprobs" else dpo_step
            step = factory(provider, case)
            res.update(measure(step, case, task, settings["warmup"], settings["iters"]))
            res["status"] = "ok"
        except Exception as exc:  # report and go on: one provider's failure is not the run's
            res.update(_failure(exc))
        finally:
            step = None
            gc.collect()
            if device.type == "cuda" and _context_alive(device):
                torch.cuda.empty_cache()
        _emit(res)
        if not _context_alive(device):
            print("gpu_check worker: the CUDA context is broken after this item; a fresh worker takes over",
                  flush=True)
            return 3
    return 0


# --------------------------------------------------------------------------- driver


def _tflops(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


class Driver:
    """Runs the plan in worker processes; records every item; restarts a worker that dies or hangs."""

    def __init__(self, args, plan, out_dir):
        self.args, self.plan, self.out_dir = args, plan, out_dir
        self.results = {}
        self.meta = {}
        self.t0 = time.monotonic()
        self.deadline = self.t0 + args.budget_s if args.budget_s else None
        self.settings = {k: getattr(args, k) for k in ("device", "dtype", "warmup", "iters", "seed")}
        self.proc = None  # the running worker
        self.last_exit = None

    def _record(self, item_id, **fields):
        item = self.plan[item_id]
        r = {**item, **fields}
        self.results[item_id] = r
        self._line(r)
        self.write()

    def _line(self, r):
        shape = "x".join(map(str, r["shape"]))
        if r["status"] == "ok":
            errs = " ".join(f"{k[4:]}={r[k]:.1e}" for k in ("err_out", "err_dh", "err_dw") if k in r)
            mem = "" if r.get("peak_mib") is None else f" {r['peak_mib']:9.0f} MiB"
            print(f"[{len(self.results)}/{len(self.plan)}] {shape} {r['task']:<8} {r['provider']:<16} "
                  f"{r['ms']:10.2f} ms{mem}  {errs}", flush=True)
        else:
            print(f"[{len(self.results)}/{len(self.plan)}] {shape} {r['task']:<8} {r['provider']:<16} "
                  f"{r['status']}: {r.get('reason', '')}", flush=True)

    def run(self) -> None:
        pending = [it["id"] for it in self.plan]
        while pending:
            if self.deadline and time.monotonic() > self.deadline:
                for i in pending:
                    self._record(i, status="skipped", reason=f"time budget of {self.args.budget_s:.0f} s used up")
                return
            self._run_worker(pending)
            left = [i for i in pending if i not in self.results]
            if len(left) == len(pending):  # a worker that records nothing: another would not either
                for i in left:
                    self._record(i, status="error", reason=f"a worker process ended (exit code {self.last_exit}) or "
                                 "hung without running anything (see the log above)")
                return
            pending = left

    def _run_worker(self, ids) -> None:
        """One worker process over ``ids`` until it finishes, dies, hangs, or the budget runs out."""
        fd, plan_path = tempfile.mkstemp(prefix="gpu_check_plan_", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"settings": self.settings, "items": [self.plan[i] for i in ids]}, f)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", plan_path]
        # Its own process group (killed with its children, e.g. compile workers), in this session (so whatever
        # ends this session's processes ends it too).
        self.proc = proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, preexec_fn=os.setpgrp)
        lines: queue.Queue = queue.Queue()

        def pump():
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        current, since = None, time.monotonic()  # the item in progress; the last event's time
        limit = self.args.item_timeout
        try:
            while True:
                try:
                    line = lines.get(timeout=0.5)
                except queue.Empty:
                    line = ""
                if line is not None and line.startswith(EVENT):
                    ev = json.loads(line[len(EVENT):])
                    since = time.monotonic()
                    if ev["type"] == "meta":
                        self.meta = ev["meta"]
                    elif ev["type"] == "start":
                        current = ev["id"]
                    elif ev["type"] == "result":
                        self._record(ev["id"], **{k: v for k, v in ev.items() if k not in ("type", "id")})
                        current = None
                elif line:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                if line is None:  # the worker closed its output: it has ended or is ending
                    code = self.last_exit = proc.wait()
                    if current is not None:
                        self._record(current, status="crashed",
                                     reason=f"the worker process died (exit code {code}) during this item")
                    return
                now = time.monotonic()
                over_budget = self.deadline is not None and now > self.deadline
                if now - since > limit or over_budget:
                    self._kill(proc)
                    if current is not None:
                        why = (f"killed when the time budget of {self.args.budget_s:.0f} s ran out" if over_budget
                               else f"no result after {limit:.0f} s (--item-timeout); worker killed")
                        self._record(current, status="timeout", reason=why)
                    else:
                        print(f"gpu_check: the worker was silent for {now - since:.0f} s between items; killed",
                              flush=True)
                    return
        finally:
            if proc.poll() is None:
                self._kill(proc)
            self.proc = None
            os.unlink(plan_path)

    @staticmethod
    def _kill(proc):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()

    # ------------------------------------------------------------------ report

    def flagged(self, r) -> list:
        """The errors of a fastpref row above the accuracy rule: 2 x the naive row's + 1e-5."""
        if not r["provider"].startswith("fastpref-") or r["status"] != "ok":
            return []
        naive = next((x for x in self.results.values() if x["shape"] == r["shape"] and x["task"] == r["task"]
                      and x["provider"] == "naive" and x["status"] == "ok"), None)
        bad = []
        for k in ("err_out", "err_dh", "err_dw"):
            if k not in r:
                continue
            bound = 2 * naive[k] + 1e-5 if naive and k in naive else 2e-2
            if not (r[k] <= bound):
                bad.append(k[4:])
        return bad

    def failures(self) -> list:
        return [r for r in self.results.values() if r["provider"].startswith("fastpref-")
                and (r["status"] not in ("ok", "skipped") or self.flagged(r) or "check_error" in r)]

    def markdown(self) -> str:
        m = self.meta
        v = m.get("versions", {})
        lines = [f"## GPU check: {m.get('device', '?')}, {m.get('date', '?')}", ""]
        lines.append(f"torch {m.get('torch')} (CUDA {m.get('cuda')}), triton {v.get('triton')}, Python {m.get('python')}; "
                     f"fastpref {v.get('fastpref')}, liger-kernel {v.get('liger-kernel')}, cut-cross-entropy "
                     f"{v.get('cut-cross-entropy')}, trl {v.get('trl')}, flash-attn {v.get('flash-attn')}, "
                     f"transformers {v.get('transformers')}. {self.args.dtype} inputs; median of {self.args.iters} "
                     f"calls after {self.args.warmup} warm-up(s). Liger's CuTe DSL path: "
                     f"{'available' if m.get('cutlass_dsl') else 'not installed (its Triton path ran)'}.")
        bk = m.get("backends") or {}
        lines += ["", "fastpref backends: " + ", ".join(f"{k}: {'ok' if r is None else r}" for k, r in bk.items()), ""]
        lines += ["Times are forward + backward; `xF3` / `xF4`: multiples of the 3- / 4-GEMM cuBLAS floor "
                  "measured in the same run; TFLOP/s at the useful 6NDV (logprobs) / 8NDV (DPO: policy + "
                  "reference forward); peak: extra memory during one call, gradients included; err: "
                  "||x - fp64 oracle|| / ||oracle|| of the per-token log-probs or loss, d hidden, d weight "
                  "(! : a fastpref row above twice the naive row's error).", ""]
        shapes = []
        for it in self.plan:
            if it["shape"] not in shapes:
                shapes.append(it["shape"])
        for shape in shapes:
            n, d, vv = shape
            floors = {p: self._ms(shape, "logprobs", p) for p in ("floor3", "floor4")}
            lines += [f"### N={n}, D={d}, V={vv}", "",
                      "| task | provider | ms | xF3 | xF4 | TFLOP/s | peak MiB | err logp/loss | err d_hidden "
                      "| err d_weight | status |",
                      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
            for it in self.plan:
                if it["shape"] != shape:
                    continue
                r = self.results.get(it["id"], {**it, "status": "not run"})
                lines.append(self._row(r, floors))
            lines.append("")
        return "\n".join(lines)

    def _ms(self, shape, task, provider):
        r = next((x for x in self.results.values() if x["shape"] == shape and x["task"] == task
                  and x["provider"] == provider and x["status"] == "ok"), None)
        return r["ms"] if r else None

    def _row(self, r, floors) -> str:
        def num(x, fmt):
            return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

        if r["status"] != "ok":
            reason = str(r.get("reason", "")).replace("|", "/").replace("\n", " ")
            return f"| {r['task']} | {r['provider']} | | | | | | | | | {r['status']}{': ' + reason if reason else ''} |"
        n, d, v = r["shape"]
        flops = (8.0 if r["task"] == "dpo" else 6.0) * n * d * v
        bad = self.flagged(r)
        errs = [num(r.get(k), ".1e") + (" !" if k[4:] in bad else "") for k in ("err_out", "err_dh", "err_dw")]
        f3, f4 = floors["floor3"], floors["floor4"]
        return (f"| {r['task']} | {r['provider']} | {r['ms']:.2f} | {num(f3 and r['ms'] / f3, '.2f')} | "
                f"{num(f4 and r['ms'] / f4, '.2f')} | {_tflops(flops / r['ms'] / 1e9)} | {num(r.get('peak_mib'), '.0f')} | "
                f"{' | '.join(errs)} | {self._status(r, bad)} |")

    @staticmethod
    def _status(r, bad) -> str:
        if "check_error" in r:
            return "unchecked: " + r["check_error"].replace("|", "/").replace("\n", " ")
        return "FLAGGED" if bad else "ok"

    def write(self) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        doc = {"meta": self.meta, "settings": {**self.settings, "shapes": self.args.shapes,
                                               "item_timeout": self.args.item_timeout, "budget_s": self.args.budget_s},
               "wall_s": round(time.monotonic() - self.t0, 1),
               "results": [self.results[i] for i in sorted(self.results)]}
        for name, text in (("gpu_check.json", json.dumps(doc, indent=1)), ("gpu_check.md", self.markdown())):
            tmp = os.path.join(self.out_dir, f".{name}.tmp")
            with open(tmp, "w") as f:
                f.write(text + "\n")
            os.replace(tmp, os.path.join(self.out_dir, name))


def drive(args) -> int:
    plan = make_plan(args)
    out_dir = args.out or os.environ.get("OUT") or "bench-results"
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the workers run Triton kernels in its interpreter
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    print(f"gpu_check: {len(plan)} items on {args.device}, {args.dtype}, shapes {args.shapes}; results in {out_dir}/",
          flush=True)
    drv = Driver(args, plan, out_dir)

    def stop(signum, frame):  # e.g. the `timeout` around this script: take the worker down too, keep the files
        if drv.proc is not None and drv.proc.poll() is None:
            Driver._kill(drv.proc)
        drv.write()
        print(f"gpu_check: stopped by signal {signum}; partial results written to {out_dir}/", flush=True)
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    drv.run()
    drv.write()
    print()
    print(drv.markdown())
    fails = drv.failures()
    counts = {}
    for r in drv.results.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"gpu_check: {len(plan)} items in {time.monotonic() - drv.t0:.0f} s: "
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
          + f"; wrote {os.path.join(out_dir, 'gpu_check.md')} and .json")
    if fails:
        def why(r):
            if r["status"] != "ok":
                return f"{r['status']}: {r.get('reason', '')}"
            return f"unchecked: {r['check_error']}" if "check_error" in r else "flagged " + ",".join(drv.flagged(r))

        print("gpu_check: FAIL: " + "; ".join(f"{'x'.join(map(str, r['shape']))} {r['task']} {r['provider']}: {why(r)}"
                                           for r in fails))
        return 1
    return 0


def main(argv=None) -> int:
    args = _parse(argv)
    if args.worker:
        return run_worker(args.worker)
    if args.small:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: --small needs a CUDA device", file=sys.stderr)
            return 2
        return _small_run()
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device (use --dry-run for the CPU self-check)", file=sys.stderr)
            return 2
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
