"""fastpref on torch.distributed: a vocabulary-parallel head (tensor parallel, and Megatron style), and
the head of an FSDP2 / DDP model used outside its forward.  Each part checks its loss and gradients
against the same loss computed by one process on the full head.

    torchrun --nproc-per-node 2 examples/distributed.py            # CPU: gloo; GPUs: NCCL, one per rank
    torchrun --nproc-per-node 3 examples/distributed.py --part tp  # one part; V=1003 splits unevenly

README, "Distributed", explains which pattern to use when.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate

import fastpref as fp

V, D, B, T = 1003, 64, 4, 32  # B: 2 preference pairs (chosen rows first, then rejected)


class TinyLM(nn.Module):
    """Embedding -> one block -> final hidden states; ``lm_head`` is used by the loss, not the forward."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.block = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D))
        self.lm_head = nn.Linear(D, V, bias=False)

    def forward(self, ids):
        return self.block(self.embed(ids))


def batch(seed: int, device):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :8] = -100  # the prompt
    ref = -T * 6.0 + torch.randn(B, generator=g)  # precomputed reference log-probs
    return ids.to(device), labels.to(device), ref[: B // 2].to(device), ref[B // 2:].to(device)


def dpo(hidden, weight, labels, rc, rr):
    return fp.dpo_loss(hidden, weight, labels, ref_chosen_logps=rc, ref_rejected_logps=rr, beta=0.1)


def check(name, got, want, rank):
    err = (got.double() - want.double()).abs().max().item()
    assert err < 1e-4 * max(1.0, want.abs().max().item()), f"{name}: differs by {err:.2e}"
    if rank == 0:
        print(f"  {name}: matches the single-process value (max |diff| {err:.1e})")


def tensor_parallel(mesh, device, rank):
    """ColwiseParallel shards lm_head.weight along the vocabulary; the hidden states, the same on every
    rank, go in as a Replicate DTensor, which is what makes the call vocabulary parallel."""
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = TinyLM().to(device)
    full = model.lm_head.weight.detach().clone()
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel()})
    ids, labels, rc, rr = batch(0, device)
    hidden = model(ids)
    loss = dpo(DTensor.from_local(hidden, mesh, [Replicate()]), model.lm_head.weight, labels, rc, rr)
    loss.backward()
    w = full.requires_grad_()
    want = dpo(hidden.detach(), w, labels, rc, rr)
    want.backward()
    check("tensor-parallel DPO loss", loss, want, rank)
    check("d lm_head (gathered shards)", model.lm_head.weight.grad.full_tensor(), w.grad, rank)


def megatron(group, device, rank, world):
    """The explicit form: this rank's rows of the head and the process group; labels are global ids."""
    torch.manual_seed(1)
    full = torch.randn(V, D, device=device) * D**-0.5
    sizes = [len(c) for c in torch.arange(V).chunk(world)]
    start = sum(sizes[:rank])
    shard = full[start:start + sizes[rank]].clone().requires_grad_()
    hidden = torch.randn(B * T, D, device=device)
    dist.broadcast(hidden, 0, group=group)  # tensor parallel: the same rows on every rank
    _, labels, _, _ = batch(1, device)
    logp, ent = fp.linear_logprobs(hidden, shard, labels.reshape(-1), return_entropy=True, process_group=group)
    want_logp, want_ent = fp.linear_logprobs(hidden, full, labels.reshape(-1), return_entropy=True)
    check("Megatron-style log-probs", logp, want_logp, rank)
    check("Megatron-style entropy", ent, want_ent, rank)


def fsdp2(device, rank, world):
    """lm_head its own FSDP2 unit: outside its forward, lm_head.weight is a sharded DTensor and the hidden
    states are this rank's own rows, so fastpref gathers the head for the call and reduce-scatters its
    gradient back, averaged over the ranks as FSDP2 averages every other gradient."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(2)
    model = TinyLM().to(device)
    ref = TinyLM().to(device)
    ref.load_state_dict(model.state_dict())
    fully_shard(model.lm_head)
    fully_shard(model)
    ids, labels, rc, rr = batch(10 + rank, device)  # each rank its own batch
    loss = dpo(model(ids), model.lm_head.weight, labels, rc, rr)
    loss.backward()
    # one process, every rank's batch, the mean of the per-rank losses (what FSDP2's averaging computes)
    total = 0
    for r in range(world):
        ids_r, labels_r, rc_r, rr_r = batch(10 + r, device)
        total = total + dpo(ref(ids_r), ref.lm_head.weight, labels_r, rc_r, rr_r) / world
    total.backward()
    check("FSDP2 d lm_head", model.lm_head.weight.grad.full_tensor(), ref.lm_head.weight.grad, rank)
    check("FSDP2 d block", model.block[0].weight.grad.full_tensor(), ref.block[0].weight.grad, rank)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("all", "tp", "megatron", "fsdp2"), default="all")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))
    if rank == 0:
        print(f"{world} ranks on {device.type}, V={V} ({', '.join(str(len(c)) for c in torch.arange(V).chunk(world))} "
              "rows per rank)")
    try:
        if args.part in ("all", "tp"):
            tensor_parallel(mesh, device, rank)
        if args.part in ("all", "megatron"):
            megatron(mesh.get_group(), device, rank, world)
        if args.part in ("all", "fsdp2"):
            fsdp2(device, rank, world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
