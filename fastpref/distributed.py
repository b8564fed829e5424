"""Heads split over ranks: vocabulary-parallel calls, and sharded DTensor weights (README "Distributed").

A weight whose rows are split over ranks means one of two opposite things:

* **vocabulary parallel** (tensor parallelism: Megatron's vocab-parallel head, torch's ``ColwiseParallel``
  on ``lm_head``): every rank of the group holds *the same rows* (hidden states, labels) and its own
  slice of the vocabulary.  Each rank runs the backend ops on its slice (``opts.vocab_start`` /
  ``opts.vocab_size``), the ``O(N)`` partial row statistics are merged across ranks (one max and one
  sum all-reduce, docs/design.md §3.2-3.3) and finished; a sharded JSD makes a second local pass with
  the merged log-sum-exps.  The backward computes the local ``dz``, ``d weight`` and ``d bias`` and
  all-reduces ``d hidden`` (a sum over the slices).  Nothing of size ``N x V`` or ``V x D`` moves.
* **data parallel with a sharded parameter** (FSDP2's ``fully_shard``, used outside the module's
  forward): every rank holds *its own rows*; the split of the weight is storage only.  The weight is
  gathered for the call (``full_tensor``) and its gradient is reduce-scattered back, averaged over the
  ranks, as DDP and FSDP2 average every other gradient.

The weight's placements cannot tell the two apart (FSDP2 shards dim 0 over a 1-D mesh, exactly as
``ColwiseParallel`` does); the hidden states can, so the rule is:

===========================================  ============================  ===========================
weight                                       hidden                        treatment
===========================================  ============================  ===========================
local slice, ``process_group=`` given        plain, same rows on all ranks vocabulary parallel
DTensor ``Shard(0)`` on a 1-D mesh           DTensor on that mesh          vocabulary parallel
DTensor, any placements                      plain (this rank's own rows)  gathered for the call
===========================================  ============================  ===========================

A DTensor ``hidden`` holds the *global* rows (``Replicate``, or sharded along the sequence and gathered
here as ``ColwiseParallel`` gathers its input); the outputs are plain tensors with the same values on
every rank, and ``labels`` are plain global ids for those rows.  Anything else is refused with a
``TypeError`` / ``ValueError`` that names the argument.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.distributed as dist

from .backends import contract as C
from .backends import registered_ops as R

log = logging.getLogger("fastpref")

__all__ = ["Split", "any_dtensor", "divergence_rows", "is_dtensor", "logprobs_rows", "split_of"]


def is_dtensor(t: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (without importing that module: until it is
    imported, no DTensor exists)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def any_dtensor(*tensors) -> bool:
    """True if any of ``tensors`` is a DTensor (see :func:`is_dtensor`)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and any(isinstance(t, mod.DTensor) for t in tensors)


@dataclass(frozen=True)
class Split:
    """How one call's head is split over ranks.

    ``vocab_parallel``: this rank's weight holds rows ``[vocab_start, vocab_start + local)`` of a
    vocabulary of ``vocab_size``, and every rank of ``group`` holds the same rows of hidden states.
    Otherwise the DTensor inputs are gathered for the call (data-parallel rows)."""

    vocab_parallel: bool
    vocab_size: int
    vocab_start: int = 0
    group: Optional[object] = None
    mesh: Optional[object] = None


# --------------------------------------------------------------------------- the split of a call


def split_of(hidden, weight, bias, labels, process_group, teacher=None, prefix: str = "") -> Optional[Split]:
    """The :class:`Split` of a call whose arguments passed the ordinary checks (``V.check_head``), or
    ``None`` for an ordinary single-device call.  ``teacher``: ``(hidden, weight, bias)`` of a
    divergence's teacher, split like the student; ``prefix``: ``"student_"`` for a divergence."""
    names = (f"{prefix}hidden", f"{prefix}weight", f"{prefix}bias")
    tensors = {names[0]: hidden, names[1]: weight, names[2]: bias}
    if teacher is not None:
        tensors.update(zip(("teacher_hidden", "teacher_weight", "teacher_bias"), teacher))
    if is_dtensor(labels):
        raise TypeError("labels: expected a plain tensor of global token ids (one per row of the hidden "
                        "states), got a DTensor")
    dtensors = [name for name, t in tensors.items() if is_dtensor(t)]
    if process_group is not None:
        return _explicit_split(hidden, weight, process_group, dtensors, names)
    if not dtensors:
        return None
    if not is_dtensor(weight):
        raise TypeError(f"{dtensors[0]}: a DTensor needs a DTensor {names[1]} (a head split over the same "
                        f"mesh); got a plain {names[1]}")
    if is_dtensor(hidden):
        return _dtensor_split(hidden, weight, bias, teacher, names)
    for name, t in tensors.items():
        if "hidden" in name and is_dtensor(t):
            raise TypeError(f"{name}: expected a plain tensor like {names[0]}, got a DTensor")
    return Split(vocab_parallel=False, vocab_size=weight.shape[0])


def _explicit_split(hidden, weight, group, dtensors, names) -> Split:
    """Megatron style: plain local slices and a process group; the offsets come from gathering every
    rank's ``(local vocabulary, rows)`` (two ints per rank)."""
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group: expected a torch.distributed.ProcessGroup, got {type(group).__name__}")
    if dtensors:
        raise TypeError(f"{dtensors[0]}: with process_group, expected plain local tensors, got a DTensor "
                        "(a DTensor head carries its own mesh: leave process_group out)")
    rank, world, rows = dist.get_rank(group), dist.get_world_size(group), hidden.shape[:-1].numel()
    every = torch.zeros(world, 2, dtype=torch.int64, device=weight.device)
    every[rank] = torch.tensor([weight.shape[0], rows])
    dist.all_reduce(every, op=dist.ReduceOp.SUM, group=group)  # an all-gather of 2 ints per rank
    local = every.tolist()
    if any(r != rows for _, r in local):
        raise ValueError(f"{names[0]}: a vocabulary-parallel call needs the same rows on every rank of "
                         f"process_group; the ranks hold {[r for _, r in local]} rows")
    starts = [0]
    for v, _ in local:
        starts.append(starts[-1] + v)
    return Split(vocab_parallel=True, vocab_size=starts[-1], vocab_start=starts[rank], group=group)


def _dtensor_split(hidden, weight, bias, teacher, names) -> Split:
    from torch.distributed.tensor import Replicate, Shard

    mesh = weight.device_mesh
    if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),):
        raise ValueError(
            f"{names[1]}: a vocabulary-parallel call needs a weight sharded along the vocabulary, Shard(0) on "
            f"a 1-D mesh (what ColwiseParallel gives lm_head), got {tuple(weight.placements)} on a "
            f"{mesh.ndim}-D mesh; pass {names[0]} as a plain tensor of this rank's rows to gather the weight "
            "instead, or move the head to a 1-D (tensor-parallel) sub-mesh"
        )
    heads = [(names, hidden, weight, bias)]
    if teacher is not None:
        heads.append((("teacher_hidden", "teacher_weight", "teacher_bias"), *teacher))
    for (h_name, w_name, b_name), h, w, b in heads:
        if not is_dtensor(h) or h.device_mesh != mesh:
            raise ValueError(f"{h_name}: expected a DTensor on the mesh of {names[1]} (its rows are then the "
                             "same on every rank), got " + ("a plain tensor" if not is_dtensor(h) else
                                                            f"one on {h.device_mesh}"))
        if not is_dtensor(w) or w.device_mesh != mesh or tuple(w.placements) != (Shard(0),):
            raise ValueError(f"{w_name}: expected a DTensor Shard(0) on the mesh of {names[1]} (both heads split "
                             f"alike), got {_describe(w)}")
        if b is not None and (not is_dtensor(b) or b.device_mesh != mesh
                              or tuple(b.placements) not in ((Shard(0),), (Replicate(),))):
            raise ValueError(f"{b_name}: expected a DTensor on the mesh of {names[1]}, Shard(0) or "
                             f"Replicate(), got {_describe(b)}")
    start = _shard_offset(weight)
    return Split(vocab_parallel=True, vocab_size=weight.shape[0], vocab_start=start, group=mesh.get_group(),
                 mesh=mesh)


def _describe(t) -> str:
    return f"{tuple(t.placements)} on {t.device_mesh}" if is_dtensor(t) else "a plain tensor"


def _shard_offset(weight) -> int:
    """First global row of this rank's ``Shard(0)`` slice (torch.chunk layout: uneven shards allowed)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    assert tuple(shape) == tuple(weight.to_local().shape), "DTensor local shard and its layout disagree"
    return int(offset[0])


# --------------------------------------------------------------------------- gathering (data-parallel rows)

_announced = False


def _gather(t):
    """A DTensor as the full tensor on this rank; its gradient is reduce-scattered back averaged over
    the mesh (each rank's rows are its own: DDP / FSDP2's convention).  Plain tensors pass through."""
    global _announced
    if t is None or not is_dtensor(t):
        return t
    from torch.distributed.tensor import Partial

    if not _announced:
        _announced = True
        log.info("fastpref: gathering a DTensor head for the call (plain hidden: each rank's rows are its "
                 "own); pass hidden as a DTensor on the head's mesh for a vocabulary-parallel call")
    if not t.requires_grad:
        return t.full_tensor()
    return t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)


# --------------------------------------------------------------------------- entry points


def _local(split: Split, hidden, weight, bias):
    """DTensor inputs of a vocabulary-parallel call as this rank's plain tensors (differentiable): the
    hidden states replicated, the weight's shard, the matching slice of the bias."""
    if split.mesh is None:
        return hidden, weight, bias
    from torch.distributed.tensor import Replicate, Shard

    h = hidden.redistribute(split.mesh, [Replicate()]).to_local()
    if bias is not None:
        bias = (bias if tuple(bias.placements) == (Shard(0),) else bias.redistribute(split.mesh, [Shard(0)]))
        bias = bias.to_local()
    return h, weight.to_local(), bias


def _flat(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.reshape(n, t.shape[-1]).contiguous()


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def logprobs_rows(split: Split, hidden, weight, labels, bias, opts: C.LogprobsOptions, backend: str):
    """``linear_logprobs`` over a split head (arguments validated) -> ``LogprobsOutput``."""
    from .primitives import LogprobsOutput
    from .primitives import logprobs_rows as single

    if not split.vocab_parallel:
        return single(hidden, _gather(weight), labels, _gather(bias), opts, backend)
    h, w, b = _local(split, hidden, weight, bias)
    lead = labels.shape
    opts = replace(opts, vocab_start=split.vocab_start, vocab_size=split.vocab_size, cache=_needs_grad(h, w, b))
    logp, ent, lssp, mean, top1 = VocabParallelLogprobs.apply(
        _flat(h, labels.numel()), w.contiguous(), labels.reshape(-1).contiguous(),
        None if b is None else b.contiguous(), opts, backend, split.group,
    )
    return LogprobsOutput(
        logp.reshape(lead), ent.reshape(lead) if opts.entropy else None,
        lssp.reshape(lead) if opts.log_sum_sq_probs else None, mean.reshape(lead) if opts.mean_logits else None,
        top1.reshape(lead) if opts.is_top1 else None,
    )


def divergence_rows(split: Split, s_hidden, s_weight, t_hidden, t_weight, labels, s_bias, t_bias,
                    opts: C.DivergenceOptions, backend: str):
    """``linear_divergence`` over split heads (arguments validated) -> ``(div, student entropy or None)``."""
    from .primitives import divergence_rows as single

    if not split.vocab_parallel:
        return single(s_hidden, _gather(s_weight), t_hidden, _gather(t_weight), labels, _gather(s_bias),
                      _gather(t_bias), opts, backend)
    sh, sw, sb = _local(split, s_hidden, s_weight, s_bias)
    th, tw, tb = _local(split, t_hidden.detach(), t_weight.detach(), None if t_bias is None else t_bias.detach())
    lead = sh.shape[:-1]
    n = lead.numel()
    opts = replace(opts, vocab_start=split.vocab_start, vocab_size=split.vocab_size, cache=_needs_grad(sh, sw, sb))
    div, ent = VocabParallelDivergence.apply(
        _flat(sh, n), sw.contiguous(), None if sb is None else sb.contiguous(), _flat(th, n), tw.contiguous(),
        None if tb is None else tb.contiguous(), None if labels is None else labels.reshape(-1).contiguous(),
        opts, backend, split.group,
    )
    return div.reshape(lead), (ent.reshape(lead) if opts.entropy else None)


# --------------------------------------------------------------------------- autograd over a vocabulary slice


def _reducer(group):
    """``all_reduce(tensor, "max" | "sum")`` in place over ``group`` (what the contract's merges take)."""
    ops = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}

    def all_reduce(t: torch.Tensor, op: str) -> None:
        dist.all_reduce(t, op=ops[op], group=group)

    return all_reduce


def _stats_like(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(0, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)


def _zero_grads(hidden, weight, bias, needs):
    """Gradients of an empty vocabulary slice (more ranks than rows of a small vocabulary)."""
    return (torch.zeros_like(hidden) if needs[0] else None, torch.zeros_like(weight) if needs[1] else None,
            torch.zeros_like(bias) if needs[2] else None)


class VocabParallelLogprobs(torch.autograd.Function):
    """``linear_logprobs`` on this rank's vocabulary slice; statistics merged over ``group``."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, bias, opts: C.LogprobsOptions, backend: str, group):
        ctx.set_materialize_grads(False)
        if weight.shape[0]:
            stats, cache = R.logprobs_fwd(hidden, weight, labels, bias, opts, backend)
        else:
            stats, cache = C.empty_logprobs_stats(hidden.shape[0], _stats_like(hidden)), _stats_like(hidden)
        rows = C.finish_logprobs(C.all_reduce_logprobs(stats, _reducer(group)), labels, opts)

        def empty():  # one tensor per absent output: outputs must not alias each other
            return rows.lse.new_empty(0)

        entropy = rows.entropy if opts.entropy else empty()
        ctx.save_for_backward(hidden, weight, labels, bias, rows.lse, entropy, cache)
        ctx.opts, ctx.backend, ctx.group = opts, backend, group
        extras = [empty() if t is None else t for t in (rows.log_sum_sq_probs, rows.mean_logits)]
        top1 = rows.is_top1 if opts.is_top1 else labels.new_empty(0, dtype=torch.bool)
        ctx.mark_non_differentiable(*extras, top1, *(() if opts.entropy else (entropy,)))
        return rows.logp, entropy, extras[0], extras[1], top1

    @staticmethod
    def backward(ctx, g_logp, g_entropy, *_):
        hidden, weight, labels, bias, lse, entropy, cache = ctx.saved_tensors
        opts = ctx.opts
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3] and bias is not None)
        if not any(needs) or (g_logp is None and g_entropy is None):  # the same on every rank (same graph)
            return (None,) * 7
        if g_logp is None:
            g_logp = torch.zeros_like(lse)
        g, ge = C.mask_logprobs_grads(g_logp, g_entropy if opts.entropy else None, labels, opts)
        if weight.shape[0]:
            d_h, d_w, d_b = R.logprobs_bwd(
                g.contiguous(), None if ge is None else ge.contiguous(), hidden, weight, labels, bias, lse,
                entropy if ge is not None else None, cache, opts, ctx.backend, needs,
            )
        else:
            d_h, d_w, d_b = _zero_grads(hidden, weight, bias, needs)
        if needs[0]:
            dist.all_reduce(d_h, op=dist.ReduceOp.SUM, group=ctx.group)  # d hidden: a sum over the slices
        return (d_h if needs[0] else None, d_w if needs[1] else None, None, d_b if needs[2] else None,
                None, None, None)


class VocabParallelDivergence(torch.autograd.Function):
    """``linear_divergence`` on this rank's vocabulary slice of both heads; statistics merged over
    ``group`` (a JSD takes a second local pass with the merged log-sum-exps)."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, opts: C.DivergenceOptions,
                backend: str, group):
        ctx.set_materialize_grads(False)
        local = s_weight.shape[0] > 0
        heads = (s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias)
        if local:
            stats, cache = R.divergence_fwd(*heads, None, opts, backend)
        else:
            stats, cache = C.empty_divergence_stats(s_hidden.shape[0], _stats_like(s_hidden)), _stats_like(s_hidden)
        stats = C.all_reduce_divergence(stats, opts.kind, _reducer(group))
        if opts.kind == C.Kind.JSD and dist.get_world_size(group) > 1:
            # its two KL planes need the merged log-sum-exps: a second pass (in a group of one, the slice
            # is the whole vocabulary and the first pass computed them)
            if local:
                kl = R.divergence_fwd(*heads, C.divergence_lse(stats).contiguous(), opts, backend)[0]
                kl = kl[[C.DV_KLT, C.DV_KLS]].contiguous()
            else:
                kl = stats.new_zeros(2, stats.shape[1])
            dist.all_reduce(kl, op=dist.ReduceOp.SUM, group=group)
            stats[C.DV_KLT], stats[C.DV_KLS] = kl[0], kl[1]
        rows = C.finish_divergence(stats, labels, opts)
        ctx.save_for_backward(*heads, labels, rows.saved, cache)
        ctx.opts, ctx.backend, ctx.group = opts, backend, group
        entropy = rows.entropy if opts.entropy else rows.div.new_empty(0)
        ctx.mark_non_differentiable(entropy)
        return rows.div, entropy

    @staticmethod
    def backward(ctx, grad, _):
        s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, labels, saved, cache = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and s_bias is not None)
        if grad is None or not any(needs):
            return (None,) * 10
        g = C.mask_divergence_grad(grad, labels, ctx.opts).contiguous()
        if s_weight.shape[0]:
            d_h, d_w, d_b = R.divergence_bwd(g, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, saved, cache,
                                             ctx.opts, ctx.backend, needs)
        else:
            d_h, d_w, d_b = _zero_grads(s_hidden, s_weight, s_bias, needs)
        if needs[0]:
            dist.all_reduce(d_h, op=dist.ReduceOp.SUM, group=ctx.group)
        return (d_h if needs[0] else None, d_w if needs[1] else None, d_b if needs[2] else None) + (None,) * 7
