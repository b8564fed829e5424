"""The GPU checks split heads still owe: each backend as the local kernel of a vocabulary-parallel call
(DTensor head and the explicit process-group form), judged against the fp64 oracle by the accuracy rule,
at a real LM-head shape.

    python benchmarks/gpu_check_distributed.py                    # 2 ranks; NCCL if there are 2+ GPUs
    python benchmarks/gpu_check_distributed.py --world 4 --V 151936
    python benchmarks/gpu_check_distributed.py --device cpu --N 64 --D 32 --V 1000 --backends torch  # dry run

With fewer GPUs than ranks the ranks share the GPUs over gloo (the local kernels are what is checked;
NCCL itself needs one GPU per rank).  Prints one line per (backend, case, output) with both errors;
exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def accuracy(name, out, naive, truth, dtype) -> dict:
    """The accuracy rule of tests/conftest.py: |out - truth| <= 2 |naive - truth| + 8 fp32 ulps."""
    truth = truth.double()
    err = (out.double() - truth).abs().max().item()
    err_naive = (naive.double() - truth).abs().max().item()
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    bound = 2 * err_naive + 8 * eps * max(1.0, truth.abs().max().item())
    return dict(name=name, err=err, naive_err=err_naive, bound=bound, ok=bool(err <= bound and out.isfinite().all()))


def _case_inputs(args, dtype, device, kind):
    g = torch.Generator(device="cpu").manual_seed(0)
    n, d, v = args.N, args.D, args.V

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = dict(h=rnd(n, d), w=rnd(v, d, scale=3.0 / d**0.5), b=rnd(v, scale=0.5),
             labels=torch.randint(0, v, (n,), generator=g).to(device), g=torch.randn(n, generator=g).to(device))
    x["labels"][: n // 5] = -100
    if kind != "logprobs":
        x.update(th=rnd(n, d), tw=rnd(v, d, scale=3.0 / d**0.5))
    return x


def _call(fp, kind, h, w, b, x, backend, **extra):
    if kind == "logprobs":
        return fp.linear_logprobs(h, w, x["labels"], b, return_entropy=True, softcap=30.0, backend=backend, **extra)
    return (fp.linear_divergence(h, w, x["th_"], x["tw_"], x["labels"], student_bias=b, kind=kind, beta=0.3,
                                 temperature=0.9, backend=backend, **extra),)


def _rank(rank, world, port, args, out_dir):
    import fastpref as fp
    from fastpref import reference as ref

    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    device = torch.device("cuda", rank % gpus) if gpus else torch.device("cpu")
    if gpus:
        torch.cuda.set_device(device)
    pg = "nccl" if gpus >= world else "gloo"
    dist.init_process_group(pg, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh(device.type, (world,))
    dtype = getattr(torch, args.dtype)
    lines = []
    for kind in args.kinds.split(","):
        x = _case_inputs(args, dtype, device, kind)
        truth = naive = None
        for backend in args.backends.split(","):
            for form in ("dtensor", "explicit"):
                if form == "dtensor":
                    h = distribute_tensor(x["h"], mesh, [Replicate()]).requires_grad_()
                    w = distribute_tensor(x["w"], mesh, [Shard(0)]).requires_grad_()
                    b = distribute_tensor(x["b"], mesh, [Shard(0)]).requires_grad_()
                    if kind != "logprobs":
                        x["th_"] = distribute_tensor(x["th"], mesh, [Replicate()])
                        x["tw_"] = distribute_tensor(x["tw"], mesh, [Shard(0)])
                    extra = {}
                else:
                    rows = [len(c) for c in torch.arange(args.V).chunk(world)]
                    sl = slice(sum(rows[:rank]), sum(rows[: rank + 1]))
                    h = x["h"].clone().requires_grad_()
                    w, b = x["w"][sl].clone().requires_grad_(), x["b"][sl].clone().requires_grad_()
                    if kind != "logprobs":
                        x["th_"], x["tw_"] = x["th"], x["tw"][sl]
                    extra = dict(process_group=dist.group.WORLD)
                try:
                    outs = _call(fp, kind, h, w, b, x, backend, **extra)
                except RuntimeError as exc:  # a backend that cannot take a vocabulary slice says why
                    lines.append(dict(backend=backend, kind=kind, form=form, skipped=str(exc)[:300]))
                    continue
                (outs[0] * x["g"]).sum().backward()
                grads = [t.grad for t in (h, w, b)]
                grads = [gr.full_tensor() if hasattr(gr, "full_tensor") else gr for gr in grads]
                if form == "explicit":  # reassemble the slices of the weight and bias gradients
                    grads[1:] = [_gather_rows(gr, world) for gr in grads[1:]]
                if rank != 0:
                    continue
                if truth is None:
                    truth, naive = (_oracle(ref, kind, x, p) for p in ("fp64", "native"))
                got = [outs[0].detach()] + grads
                for name, o, nv, t in zip(("out", "d_hidden", "d_weight", "d_bias"), got, naive, truth):
                    lines.append(dict(backend=backend, kind=kind, form=form, **accuracy(name, o, nv, t, dtype)))
    if rank == 0:
        Path(out_dir, "lines.json").write_text(json.dumps(lines))
    dist.destroy_process_group()


def _gather_rows(t, world):
    sizes = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], device=t.device))
    big = int(max(s.item() for s in sizes))
    padded = torch.zeros(big, *t.shape[1:], dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def _oracle(ref, kind, x, precision):
    cast = (lambda t: t.double()) if precision == "fp64" else (lambda t: t)
    h, w, b = (cast(x[k]).detach().requires_grad_() for k in ("h", "w", "b"))
    if kind == "logprobs":
        out = ref.linear_logprobs(h, w, x["labels"], b, return_entropy=True, softcap=30.0, precision=precision)[0]
    else:
        out = ref.linear_divergence(h, w, cast(x["th"]), cast(x["tw"]), x["labels"], student_bias=b, kind=kind,
                                    beta=0.3, temperature=0.9, precision=precision)
    (out.double() * x["g"].double()).sum().backward()
    return [out.detach(), h.grad, w.grad, b.grad]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--backends", default="auto,triton,cuda,torch")
    p.add_argument("--kinds", default="logprobs,forward_kl,reverse_kl,jsd")
    p.add_argument("--N", type=int, default=2048)
    p.add_argument("--D", type=int, default=2048)
    p.add_argument("--V", type=int, default=128256)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default="gpu-check-distributed")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device: no CUDA device (use --device cpu for a dry run)")
    os.makedirs(args.out, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(args.world, port, args, args.out), nprocs=args.world, start_method="spawn")
    lines = json.loads(Path(args.out, "lines.json").read_text())
    failed = 0
    for ln in lines:
        head = f"{ln['backend']:<7} {ln['kind']:<11} {ln['form']:<9}"
        if "skipped" in ln:
            print(f"{head} skipped: {ln['skipped']}")
            continue
        failed += not ln["ok"]
        print(f"{head} {ln['name']:<9} err={ln['err']:.3e} naive_err={ln['naive_err']:.3e} bound={ln['bound']:.3e} "
              f"{'ok' if ln['ok'] else 'FAIL'}")
    print(f"{failed} failed of {sum('ok' in ln for ln in lines)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
