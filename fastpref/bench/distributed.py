"""``fastpref-bench --distributed`` / ``python -m fastpref.bench.distributed``: what a split LM head costs
per rank — extra memory, bytes communicated and time of one forward+backward — at several world sizes.

Each world size is one set of spawned ranks (gloo on 127.0.0.1 on a CPU, NCCL on GPUs, one GPU per
rank).  Modes, each a ``linear_logprobs`` (or JSD ``linear_divergence``) forward+backward with an
arbitrary upstream gradient, ``hidden`` and ``weight`` trainable:

- ``single``: world size 1, an ordinary call (the baseline; ``vocab-parallel`` runs at world size 1 too,
  to show what the DTensor path itself costs);
- ``vocab-parallel``: the head a DTensor ``Shard(0)``, the hidden states a ``Replicate`` DTensor: every
  rank holds the same ``N`` rows and ``V / world`` of the vocabulary;
- ``gathered``: the head a DTensor ``Shard(0)``, the hidden states plain: every rank holds its own ``N``
  rows and the weight is gathered for the call (FSDP2's parameter used outside its module's forward).

Bytes are counted by a dispatch mode that sees every c10d / functional collective of the call: the
payload (input tensor bytes) and, for a ring algorithm, what one rank sends
(all-reduce ``2 (w-1)/w S``, all-gather ``(w-1) s``, reduce-scatter ``(w-1)/w S``).  Memory is the rise
of the peak over what exists before the call (peak RSS on a CPU, after a warm-up call; the CUDA
allocator's peak on a GPU), the gradients of ``hidden`` and of this rank's weight included.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

_COLLECTIVES = {  # op name -> (kind, whether the payload is the full tensor) for the ring estimate
    "allreduce_": "all_reduce", "all_reduce": "all_reduce", "allgather_": "all_gather",
    "_allgather_base_": "all_gather", "all_gather_into_tensor": "all_gather", "all_gather_into_tensor_out": "all_gather",
    "reduce_scatter_": "reduce_scatter", "_reduce_scatter_base_": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter", "broadcast_": "broadcast",
}


def _bytes(a) -> int:
    if isinstance(a, torch.Tensor):
        return a.numel() * a.element_size()
    if isinstance(a, (list, tuple)):
        return sum(_bytes(x) for x in a)
    return 0


def ring_sent(kind: str, payload: int, world: int) -> float:
    """Bytes one rank sends for a collective of ``payload`` input bytes, with a ring algorithm."""
    if world <= 1:
        return 0.0
    if kind == "all_reduce":
        return 2 * (world - 1) / world * payload
    if kind == "all_gather":
        return (world - 1) * payload
    if kind == "reduce_scatter":
        return (world - 1) / world * payload
    return payload


def comm_counter():
    """A ``TorchDispatchMode`` recording ``(kind, payload bytes)`` of every collective run inside it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CommCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.log: List[tuple] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace in ("c10d", "_c10d_functional"):
                name = func._schema.name.split("::")[-1]
                if name in _COLLECTIVES:
                    self.log.append((_COLLECTIVES[name], _bytes(args[0])))
            return func(*args, **(kwargs or {}))

    return CommCounter()


# --------------------------------------------------------------------------- one rank


def _inputs(mode, workload, n, d, v, dtype, device, rank, mesh):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    g = torch.Generator(device="cpu").manual_seed(1234 + (rank if mode == "gathered" else 0))
    w_gen = torch.Generator(device="cpu").manual_seed(99)

    def rnd(*shape, gen=g, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    h, w = rnd(n, d), rnd(v, d, gen=w_gen, scale=d**-0.5)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    grad = torch.randn(n, generator=g).to(device)
    extra = {}
    if workload == "jsd":
        extra = dict(th=rnd(n, d), tw=rnd(v, d, gen=w_gen, scale=d**-0.5))
    if mode != "single":
        w = distribute_tensor(w, mesh, [Shard(0)])
        if "tw" in extra:
            extra["tw"] = distribute_tensor(extra["tw"], mesh, [Shard(0)])
        if mode == "vocab-parallel":
            h = distribute_tensor(h, mesh, [Replicate()])
            if "th" in extra:
                extra["th"] = distribute_tensor(extra["th"], mesh, [Replicate()])
    return h.requires_grad_(True), w.requires_grad_(True), labels, grad, extra


def _measure(mode, workload, cfg, device, rank, mesh) -> Dict:
    """One rank's record of one (mode, workload): memory, bytes per collective, time."""
    import fastpref as fp

    from . import measure

    h, w, labels, grad, extra = _inputs(mode, workload, cfg["N"], cfg["D"], cfg["V"], getattr(torch, cfg["dtype"]),
                                        device, rank, mesh)

    def forward():
        if workload == "jsd":
            return fp.linear_divergence(h, w, extra["th"], extra["tw"], labels, kind="jsd")
        return fp.linear_logprobs(h, w, labels)

    def step():
        h.grad = w.grad = None
        out = forward()
        (out * grad).sum().backward()
        measure.sync(device)

    step()  # warm-up (first-use costs, the allocator)
    with comm_counter() as fwd_comm:
        out = forward()
    with comm_counter() as bwd_comm:
        (out * grad).sum().backward()
    del out
    h.grad = w.grad = None
    mem = measure.measure_call(step, device)
    times = measure.time_calls(step, cfg["repeats"])
    return dict(mode=mode, workload=workload, world=mesh.size(), rank=rank, peak_mib=mem["peak_bytes"] / 2**20,
                mem_method=mem["mem_method"], time_ms=measure.median_ms(times),
                fwd=[list(x) for x in fwd_comm.log], bwd=[list(x) for x in bwd_comm.log])


def _rank_main(rank, world, port, cfg, out_dir):
    import torch.distributed as dist

    from . import measure

    device = torch.device(cfg["device"])
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        measure.configure_malloc()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=cfg["timeout"]))
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world,))
        rows = [_measure(mode, workload, cfg, device, rank, mesh) for mode in cfg["modes"]
                for workload in cfg["workloads"] if (mode == "single") == (world == 1) or mode == "vocab-parallel"]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- the sweep


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, cfg: Dict, work: Path) -> List[Dict]:
    import torch.multiprocessing as mp

    out_dir = work / f"world{world}"
    out_dir.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_rank_main, args=(world, _free_port(), cfg, str(out_dir)), nprocs=world,
                       start_method="spawn")
    return [row for r in range(world) for row in json.loads(Path(out_dir, f"rank{r}.json").read_text())]


def summarise(rows: List[Dict]) -> List[Dict]:
    """One line per (workload, mode, world): the largest per-rank memory, the bytes of rank 0."""
    keys = sorted({(r["workload"], r["world"], r["mode"]) for r in rows},
                  key=lambda k: (k[0], k[1], ["single", "vocab-parallel", "gathered"].index(k[2])))
    out = []
    for wl, world, mode in keys:
        group = [r for r in rows if (r["workload"], r["world"], r["mode"]) == (wl, world, mode)]
        r0 = next(r for r in group if r["rank"] == 0)
        line = dict(workload=wl, world=world, mode=mode, peak_mib_max=max(r["peak_mib"] for r in group),
                    time_ms_max=max(r["time_ms"] for r in group))
        for phase in ("fwd", "bwd"):
            line[f"{phase}_calls"] = len(r0[phase])
            line[f"{phase}_payload_bytes"] = sum(b for _, b in r0[phase])
            line[f"{phase}_ring_sent_bytes"] = sum(ring_sent(k, b, world) for k, b in r0[phase])
            line[f"{phase}_ops"] = sorted({k for k, _ in r0[phase]})
        out.append(line)
    return out


def _fmt_bytes(b: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{b:.0f} B"


def _comm_cell(s: Dict, phase: str) -> str:
    if not s[f"{phase}_calls"]:
        return "—"
    return (f"{_fmt_bytes(s[f'{phase}_payload_bytes'])} ({_fmt_bytes(s[f'{phase}_ring_sent_bytes'])}) in "
            f"{s[f'{phase}_calls']} × {'/'.join(s[f'{phase}_ops'])}")


def markdown(summary: List[Dict], cfg: Dict, meta: Dict) -> str:
    n, d, v = cfg["N"], cfg["D"], cfg["V"]
    lines = [
        f"# Split LM head: per-rank cost of one forward+backward ({meta['date']})",
        "",
        f"N={n} rows, D={d}, V={v}, {cfg['dtype']}, {meta['device_name']}; torch {meta['torch']}; "
        f"workspace {meta['workspace_mib']} MiB, keep logits {meta['keep_logits']}. Memory: {meta['memory_method']}; "
        "bytes: payload of every collective of rank 0 (ring estimate of what it sends in brackets). "
        "vocab-parallel: every rank the same N rows and V/world of the vocabulary; gathered: every rank its "
        "own N rows, the weight gathered (FSDP2 outside the forward).",
        "",
        "| workload | world | mode | extra memory / rank | forward comm | backward comm | time |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(f"| {s['workload']} | {s['world']} | {s['mode']} | {s['peak_mib_max']:.1f} MiB | "
                     f"{_comm_cell(s, 'fwd')} | {_comm_cell(s, 'bwd')} | {s['time_ms_max']:.0f} ms |")
    lines += ["", f"Expected: forward 7·N fp32 = {_fmt_bytes(28 * n)} for log-probs (2 planes max-reduced, 5 summed), "
              f"backward N·D = {_fmt_bytes(n * d * torch.finfo(getattr(torch, cfg['dtype'])).bits // 8)} "
              f"(d hidden); gathered: V·D each way = {_fmt_bytes(v * d * torch.finfo(getattr(torch, cfg['dtype'])).bits // 8)}."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastpref-bench --distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", default="1,2,4", help="comma list of world sizes (default 1,2,4)")
    p.add_argument("--workloads", default="logprobs,jsd", help="logprobs, jsd (default both)")
    p.add_argument("--modes", default="single,vocab-parallel,gathered")
    p.add_argument("--N", type=int, default=1024)
    p.add_argument("--D", type=int, default=256)
    p.add_argument("--V", type=int, default=32768)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a collective may wait")
    p.add_argument("--quick", action="store_true", help="tiny shapes, worlds 1,2 (CI)")
    p.add_argument("--out", default="bench-results", help="writes distributed.json and distributed.md here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    worlds = [int(w) for w in args.worlds.split(",")]
    if args.quick:
        args.N, args.D, args.V, args.repeats, worlds = 64, 32, 1000, 1, [1, 2]
    if args.device.startswith("cuda"):
        args.device = "cuda"
        fit = [w for w in worlds if w <= torch.cuda.device_count()]
        if not fit:
            raise SystemExit(f"--worlds: one GPU per rank, found {torch.cuda.device_count()} GPUs")
        worlds = fit
    elif args.device != "cpu":
        raise SystemExit(f"--device: expected cpu or cuda, got {args.device!r}")
    cfg = dict(N=args.N, D=args.D, V=args.V, dtype=args.dtype, repeats=args.repeats, device=args.device,
               timeout=args.timeout, workloads=args.workloads.split(","), modes=args.modes.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: List[Dict] = []
    t0 = time.perf_counter()
    for world in worlds:
        print(f"world {world}: spawning {world} rank(s)", flush=True)
        rows += run_world(world, cfg, out / "distributed-ranks")
    import fastpref

    from .__main__ import device_name
    from .measure import configure_malloc

    meta = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=" ".join(["python -m fastpref.bench.distributed"] + (sys.argv[1:] if argv is None else list(argv))),
        device_name=device_name(torch.device(args.device)), torch=torch.__version__, fastpref=fastpref.__version__,
        workspace_mib=fastpref.get_workspace_bytes() // 2**20, keep_logits=fastpref.get_keep_logits(),
        memory_method=("torch.cuda.max_memory_allocated rise" if args.device == "cuda" else
                       "peak RSS rise, peak reset after a warm-up call" + ("" if configure_malloc() else
                                                                           " (glibc mallopt unavailable)")),
        wall_s=round(time.perf_counter() - t0, 1), loadavg=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    )
    summary = summarise(rows)
    (out / "distributed.json").write_text(json.dumps(dict(meta=meta, config=cfg, summary=summary, ranks=rows),
                                                     indent=1))
    md = markdown(summary, cfg, meta)
    (out / "distributed.md").write_text(md)
    print(md, flush=True)
    print(f"wrote {out / 'distributed.json'} and {out / 'distributed.md'} in {meta['wall_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
