"""What the spawned ranks of tests/test_distributed.py run (gloo on 127.0.0.1, CPU).

The parent writes the inputs of every case to ``inputs.pt`` (the same full tensors for every rank),
spawns ``world`` processes, and each rank writes what it computed to ``out{rank}.pt``: the outputs,
the gradient of its own shard of each split weight, and the gradients of the other leaves.  The parent
reassembles the shards and judges everything against the fp64 oracle (tests/conftest.py).
"""

from __future__ import annotations

import datetime
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(job: str, world: int, workdir: Path, inputs) -> list:
    """Run ``job(rank, world, inputs)`` on ``world`` spawned gloo ranks -> each rank's result."""
    workdir.mkdir(parents=True, exist_ok=True)
    torch.save(inputs, workdir / "inputs.pt")
    mp.start_processes(_entry, args=(world, free_port(), job, str(workdir)), nprocs=world, start_method="spawn")
    return [torch.load(workdir / f"out{r}.pt", weights_only=False) for r in range(world)]


def _entry(rank: int, world: int, port: int, job: str, workdir: str) -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))  # a hang fails the test instead
    try:
        inputs = torch.load(Path(workdir) / "inputs.pt", weights_only=False)
        t1 = time.perf_counter()
        out = getattr(sys.modules[__name__], job)(rank, world, inputs)
        out["__seconds__"] = (t1 - t0, time.perf_counter() - t1)  # (start-up, work)
        torch.save(out, Path(workdir) / f"out{rank}.pt")
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- primitives and a loss


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_(t.is_floating_point())


def _grad_of(t):
    """A leaf's gradient as this rank holds it: a DTensor's local shard (Shard(0)) or full value."""
    from torch.distributed.tensor import Shard

    from fastpref.distributed import is_dtensor

    if t is None or t.grad is None:
        return None
    g = t.grad
    if is_dtensor(g):
        return g.to_local() if tuple(g.placements) == (Shard(0),) else g.full_tensor()
    return g


def _slices(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _split_head(case, rank, world, mesh, prefix=""):
    """The case's head (weight, bias) for this rank, per the case's form."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    x = case["x"]
    w, b = x[prefix + "weight"], x.get(prefix + "bias")
    if case["form"] == "explicit":
        sl = _slices(case["sizes"], rank) if case.get("sizes") else slice(None)  # no sizes: the whole head
        return _leaf(w[sl]), _leaf(None if b is None else b[sl])
    place = [Replicate()] if case.get("bias_placement") == "replicate" else [Shard(0)]
    dw = distribute_tensor(w.detach(), mesh, [Shard(0)]).requires_grad_(True)
    db = None if b is None else distribute_tensor(b.detach(), mesh, place).requires_grad_(True)
    return dw, db


def _rows(case, rank, mesh, name):
    """The case's hidden states for this rank: global rows (a DTensor, or plain for the explicit form)
    or, for the gathered form, this rank's own rows."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    h = case["x"][name]
    if case["form"] == "gather":
        return _leaf(h[rank])
    if case["form"] == "explicit":
        return _leaf(h)
    place = [Shard(1)] if case["form"] == "seqshard" else [Replicate()]
    return distribute_tensor(h.detach(), mesh, place).requires_grad_(True)


def _weighted_sum(values, weights, rank, gathered):
    total = 0
    for v, g in zip(values, weights):
        if v is not None and g is not None:
            total = total + (v.double() * (g[rank] if gathered else g)).sum()
    return total


def primitives_job(rank, world, cases):
    from torch.distributed.device_mesh import init_device_mesh

    import fastpref as fp

    mesh = init_device_mesh("cpu", (world,))
    alone = [dist.new_group([r]) for r in range(world)]  # every rank creates every group, in order
    results = {}
    for name, case in cases.items():
        t0 = time.perf_counter()
        x, kw, gathered = case["x"], dict(case["kw"]), case["form"] == "gather"
        if case["form"] == "explicit":
            kw["process_group"] = alone[rank] if case.get("group_of_one") else dist.group.WORLD
        labels = x["labels"][rank] if gathered else x["labels"]
        w, b = _split_head(case, rank, world, mesh)
        h = _rows(case, rank, mesh, "hidden")
        leaves = {"hidden": h, "weight": w, "bias": b}
        if case["op"] == "logprobs":
            out = fp.linear_logprobs(h, w, labels, b, **kw)
            if isinstance(out, fp.LogprobsOutput):
                values = [getattr(out, k) for k in ("logp", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")]
            elif isinstance(out, tuple):
                values = list(out)
            else:
                values = [out]
        elif case["op"] == "divergence":
            tw, tb = _split_head(case, rank, world, mesh, prefix="teacher_")
            th = _rows(case, rank, mesh, "teacher_hidden")
            out = fp.linear_divergence(h, w, th, tw, labels, student_bias=b, teacher_bias=tb, **kw)
            values = list(out) if isinstance(out, tuple) else [out]
        elif case["op"] == "loss":  # per-row / per-pair losses (reduction="none") against the oracle's
            rw, _ = _split_head(case, rank, world, mesh, prefix="ref_")
            rh, rw = _rows(case, rank, mesh, "ref_hidden").detach(), rw.detach()
            fn = getattr(fp, f"{case['loss']}_loss")
            if case["loss"] == "distill":
                values = [fn(h, w, rh, rw, labels, student_bias=b, reduction="none", **kw)]
            else:
                values = [fn(h, w, labels, b, ref_hidden=rh, ref_weight=rw, reduction="none", **kw)]
        else:
            raise ValueError(case["op"])
        loss = _weighted_sum(values, case["upstream"], rank, gathered)
        if torch.is_tensor(loss):
            loss.backward()
        results[name] = {
            "values": [None if v is None else v.detach() for v in values],
            "grads": {k: _grad_of(t) for k, t in leaves.items()},
            "seconds": time.perf_counter() - t0,
        }
    return results


def suite_job(rank, world, inputs):
    """Everything one spawn runs: the primitive cases, the bad-input calls, the DDP / FSDP2 runs."""
    out = {"cases": primitives_job(rank, world, inputs["cases"])}
    if "errors" in inputs:
        out["errors"] = errors_job(rank, world, inputs["errors"])
    for wrapper, spec in inputs.get("data_parallel", {}).items():
        out[wrapper] = data_parallel_job(rank, world, dict(spec, wrapper=wrapper))
    return out


def errors_job(rank, world, cases):
    """Bad distributed input: each case must raise its exception type naming the argument."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import fastpref as fp

    mesh = init_device_mesh("cpu", (world,))
    x = cases["x"]
    h, w, b, labels = x["hidden"], x["weight"], x["bias"], x["labels"]
    W = distribute_tensor(w, mesh, [Shard(0)])
    H = distribute_tensor(h, mesh, [Replicate()])
    Wrep = distribute_tensor(w, mesh, [Replicate()])
    L = distribute_tensor(labels, mesh, [Replicate()])
    calls = {
        "hidden-dtensor-plain-weight": lambda: fp.linear_logprobs(H, w, labels),
        "weight-replicated-with-dtensor-hidden": lambda: fp.linear_logprobs(H, Wrep, labels),
        "bias-plain-with-vocab-parallel": lambda: fp.linear_logprobs(H, W, labels, b),
        "labels-dtensor": lambda: fp.linear_logprobs(H, W, L),
        "process-group-with-dtensor": lambda: fp.linear_logprobs(h, W, labels, process_group=dist.group.WORLD),
        "process-group-not-a-group": lambda: fp.linear_logprobs(h, w, labels, process_group="world"),
        "teacher-plain-vocab-parallel": lambda: fp.linear_divergence(H, W, H, w, labels),
        "teacher-hidden-dtensor-gathered": lambda: fp.linear_divergence(h, W, H, W, labels),
        "explicit-rows-differ": lambda: fp.linear_logprobs(
            h[: rank + 1], w[_slices(cases["sizes"], rank)], labels[: rank + 1], process_group=dist.group.WORLD),
        "label-out-of-range-explicit": lambda: fp.linear_logprobs(
            h, w[_slices(cases["sizes"], rank)], torch.full_like(labels, w.shape[0]), process_group=dist.group.WORLD),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = None
        except (TypeError, ValueError) as exc:
            out[name] = (type(exc).__name__, str(exc))
    return out


# --------------------------------------------------------------------------- DDP and FSDP2


class Tiny(torch.nn.Module):
    """Embedding -> Linear -> tanh, and an lm_head the loss uses outside the forward."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.body = torch.nn.Linear(dim, dim)
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        return torch.tanh(self.body(self.emb(ids)))


def data_parallel_job(rank, world, spec):
    """Two SGD steps of a DPO loss on ``model.lm_head.weight`` under DDP or FSDP2 -> full parameters."""
    import fastpref as fp

    torch.manual_seed(0)  # the state is loaded below; the seed only makes construction deterministic
    model = Tiny(spec["vocab"], spec["dim"])
    model.load_state_dict(spec["state"])
    wrapper = spec["wrapper"]
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
        head = model.module.lm_head
    else:
        from torch.distributed.fsdp import fully_shard

        if wrapper == "fsdp2-head-unit":  # the head is its own unit: a sharded DTensor outside its forward
            fully_shard(model.lm_head)
        fully_shard(model.body)
        fully_shard(model)
        head = model.lm_head
    opt = torch.optim.SGD(model.parameters(), lr=spec["lr"])
    kinds = []
    for step in range(spec["steps"]):
        ids, labels = spec["ids"][step][rank], spec["labels"][step][rank]
        rc, rr = spec["ref_logps"][step][rank]
        opt.zero_grad()
        hidden = model(ids)
        kinds.append(type(head.weight).__name__)
        loss = fp.dpo_loss(hidden, head.weight, labels, ref_chosen_logps=rc, ref_rejected_logps=rr, beta=spec["beta"])
        loss.backward()
        opt.step()
    state = (model.module if wrapper == "ddp" else model).state_dict()
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for k, v in state.items()}
    return {"state": full, "weight_types": kinds}


