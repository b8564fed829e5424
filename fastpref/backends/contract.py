"""The backend contract: options, divergence kinds, per-row statistics and their merge.

Every backend (torch, Triton, CUDA) implements four ops on 2-D contiguous inputs and a slice of the
vocabulary (``weight`` holds rows ``[opts.vocab_start, opts.vocab_start + weight.shape[0])`` of a
vocabulary of ``opts.vocab_size``; labels are *global* token ids):

``logprobs_fwd(hidden[N,D], weight[Vl,D], labels[N], bias[Vl]?, opts) -> (stats[LP_PLANES, N], cache)``
    partial row statistics over this vocabulary slice (planes below), and an optional ``cache`` the
    backward may reuse (empty when the backend keeps nothing).
``logprobs_bwd(g_logp[N], g_entropy[N]?, hidden, weight, labels, bias?, lse[N], entropy[N]?, cache,
opts, need_hidden, need_weight, need_bias) -> (d_hidden | [0], d_weight | [0], d_bias | [0])``
    the upstream gradients arrive masked (0 on ignored rows, NaN on rows with an invalid label);
    ``d_hidden`` is this slice's contribution.
``divergence_fwd(s_hidden, s_weight, s_bias?, t_hidden, t_weight, t_bias?, lse_st[N,2]?, opts) ->
(stats[DIV_PLANES, N], cache)``
    without ``lse_st``: the online planes (and, for JSD over the whole vocabulary, the two KL planes
    too); with the merged ``lse_st`` of a sharded JSD: only the two KL planes.
``divergence_bwd(grad[N], s_hidden, s_weight, s_bias?, t_hidden, t_weight, t_bias?, saved[N,3], cache,
opts, need_hidden, need_weight, need_bias) -> (d_s_hidden | [0], d_s_weight | [0], d_s_bias | [0])``

Statistics are float32 (float64 for float64 inputs).  :func:`merge_logprobs` / :func:`merge_divergence`
combine partial statistics (vocabulary splits of one kernel, or vocabulary shards over ranks: the
same two steps, a max then a sum of rescaled planes), and :func:`finish_logprobs` /
:func:`finish_divergence` turn merged statistics into the per-row outputs.  docs/design.md derives
every formula.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple, Optional

import torch

# --------------------------------------------------------------------------- options


class Kind(enum.IntEnum):
    """Divergence kinds (ints so they travel through ``torch.library`` schemas)."""

    FORWARD_KL = 0  # KL(pt || ps)
    REVERSE_KL = 1  # KL(ps || pt)
    JSD = 2  # beta KL(pt || m) + (1 - beta) KL(ps || m),  m = beta pt + (1 - beta) ps


KIND_NAMES = {"forward_kl": Kind.FORWARD_KL, "reverse_kl": Kind.REVERSE_KL, "jsd": Kind.JSD}

EXTRA_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass(frozen=True)
class Transform:
    """``z = softcap * tanh(u * logit_scale / softcap) / temperature`` with ``u = h @ W.T + b``
    (no tanh without a softcap): scale, softcap, then temperature, as TRL and Hugging Face models do."""

    temperature: float = 1.0
    softcap: Optional[float] = None
    logit_scale: float = 1.0

    def kernel_params(self) -> tuple[float, Optional[float]]:
        """``(inv_temp, cap)`` such that ``z = cap * tanh(u * inv_temp / cap)`` (or ``u * inv_temp``).

        Every kernel computes that two-parameter form; with ``cap = softcap / temperature`` and
        ``inv_temp = logit_scale / temperature`` it equals the transform above exactly, and its
        derivative ``dz/du = inv_temp * (1 - (z / cap)^2)`` is the chain rule of the transform.
        """
        inv_temp = self.logit_scale / self.temperature
        cap = None if self.softcap is None else self.softcap / self.temperature
        return inv_temp, cap


@dataclass(frozen=True)
class LogprobsOptions:
    """What one ``linear_logprobs`` call computes (validated by the public function)."""

    ignore_index: int = -100
    transform: Transform = Transform()
    entropy: bool = False
    log_sum_sq_probs: bool = False
    mean_logits: bool = False
    is_top1: bool = False
    vocab_start: int = 0  # this call's weight holds rows [vocab_start, vocab_start + Vl) ...
    vocab_size: int = 0  # ... of a vocabulary of vocab_size (0: the weight is the whole vocabulary)
    cache: bool = False  # a backward will run: the backend may keep what it needs (within the budget)

    def for_weight(self, weight: torch.Tensor) -> LogprobsOptions:
        return self if self.vocab_size else replace(self, vocab_size=weight.shape[0])

    @property
    def any_extra(self) -> bool:
        return self.log_sum_sq_probs or self.mean_logits or self.is_top1


@dataclass(frozen=True)
class DivergenceOptions:
    """What one ``linear_divergence`` call computes; ``kind`` is already resolved (beta 0 / 1 of a
    JSD become forward / reverse KL)."""

    kind: Kind = Kind.FORWARD_KL
    beta: float = 0.5
    ignore_index: int = -100
    student: Transform = Transform()
    teacher: Transform = Transform()
    entropy: bool = False  # the student's entropy (non-differentiable), as TRL's distillation logs it
    vocab_start: int = 0
    vocab_size: int = 0
    cache: bool = False

    def for_weight(self, weight: torch.Tensor) -> DivergenceOptions:
        return self if self.vocab_size else replace(self, vocab_size=weight.shape[0])


def covers_vocabulary(opts, local_vocab: int) -> bool:
    """True when this call's weight is the whole vocabulary (no shard)."""
    return opts.vocab_start == 0 and opts.vocab_size in (0, local_vocab)


# ``torch.library`` schemas take scalars, not dataclasses: the registration layer flattens the options
# with these two pairs of functions (and nothing else does).

_LP_FLAGS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "cache")


def logprobs_to_args(o: LogprobsOptions) -> tuple:
    t = o.transform
    flags = sum(1 << i for i, f in enumerate(_LP_FLAGS) if getattr(o, f))
    return (o.ignore_index, t.temperature, t.softcap, t.logit_scale, flags, o.vocab_start, o.vocab_size)


def logprobs_from_args(ignore_index, temperature, softcap, logit_scale, flags, vocab_start, vocab_size):
    return LogprobsOptions(
        ignore_index=ignore_index, transform=Transform(temperature, softcap, logit_scale),
        vocab_start=vocab_start, vocab_size=vocab_size,
        **{f: bool(flags >> i & 1) for i, f in enumerate(_LP_FLAGS)},
    )


def divergence_to_args(o: DivergenceOptions) -> tuple:
    s, t = o.student, o.teacher
    return (int(o.kind), o.beta, o.ignore_index, s.temperature, s.softcap, s.logit_scale, t.temperature,
            t.softcap, t.logit_scale, o.entropy, o.vocab_start, o.vocab_size, o.cache)


def divergence_from_args(kind, beta, ignore_index, s_temp, s_cap, s_scale, t_temp, t_cap, t_scale, entropy,
                         vocab_start, vocab_size, cache):
    return DivergenceOptions(
        kind=Kind(kind), beta=beta, ignore_index=ignore_index, student=Transform(s_temp, s_cap, s_scale),
        teacher=Transform(t_temp, t_cap, t_scale), entropy=entropy, vocab_start=vocab_start,
        vocab_size=vocab_size, cache=cache,
    )


# --------------------------------------------------------------------------- per-row statistics

# linear_logprobs, over a vocabulary slice, relative to the slice's running max m:
LP_MAX = 0  # m = max_v z_v
LP_SUM = 1  # s = sum_v e^{z_v - m}
LP_TARGET = 2  # z_label if the label is in this slice, else 0
LP_ENT = 3  # t = sum_v e^{z_v - m} (z_v - m)                        (entropy)
LP_SQ = 4  # q = sum_v e^{2 (z_v - m)}                                (log_sum_sq_probs)
LP_ZSUM = 5  # sum_v z_v                                              (mean_logits)
LP_BEFORE = 6  # max of z_v over the columns v < label, -inf if none   (is_top1)
LP_PLANES = 7

# linear_divergence, over a vocabulary slice:
DV_SMAX, DV_SSUM, DV_TMAX, DV_TSUM = 0, 1, 2, 3  # online max / sum-exp of both heads
DV_CROSS = 4  # forward: sum e^{zt - mt} (zt - zs);  reverse: sum e^{zs - ms} (zs - zt)
DV_SENT = 5  # sum e^{zs - ms} (zs - ms)             (student entropy)
DV_KLT, DV_KLS = 6, 7  # JSD: sum pt (log pt - log m), sum ps (log ps - log m) (need the merged lse)
DV_PLANES = 8


def empty_logprobs_stats(n: int, like: torch.Tensor) -> torch.Tensor:
    """Statistics of an empty slice: the identity of :func:`merge_logprobs`."""
    stats = like.new_zeros(LP_PLANES, n)
    stats[LP_MAX] = float("-inf")
    stats[LP_BEFORE] = float("-inf")
    return stats


def _rescale(m: torch.Tensor, s: torch.Tensor, big: torch.Tensor):
    """``(e^{m - M}, m - M)`` with empty slices (``s == 0``, ``m = -inf``) mapped to ``(0, 0)``."""
    alive = s > 0
    shift = torch.where(alive, m - big, torch.zeros_like(m))
    return torch.where(alive, torch.exp(shift), torch.zeros_like(m)), shift


def rebase_logprobs(stats: torch.Tensor, big: torch.Tensor) -> torch.Tensor:
    """Express partial statistics relative to the max ``big`` (>= their own) instead of their own max,
    so that partials can simply be added (plane ``LP_BEFORE`` is merged by a max, ``LP_MAX`` is ``big``)."""
    w, shift = _rescale(stats[LP_MAX], stats[LP_SUM], big)
    out = stats.clone()
    out[LP_MAX] = big
    out[LP_SUM] = w * stats[LP_SUM]
    out[LP_ENT] = w * (stats[LP_ENT] + shift * stats[LP_SUM])
    out[LP_SQ] = w * w * stats[LP_SQ]
    return out


_LP_SUMMED = [LP_SUM, LP_TARGET, LP_ENT, LP_SQ, LP_ZSUM]


def merge_logprobs(parts: torch.Tensor) -> torch.Tensor:
    """``parts [K, LP_PLANES, N]`` (disjoint vocabulary slices) -> ``[LP_PLANES, N]``."""
    if parts.shape[0] == 1:
        return parts[0]
    big = parts[:, LP_MAX].amax(0)
    rebased = torch.stack([rebase_logprobs(p, big) for p in parts.unbind(0)])
    out = rebased[0].clone()
    out[_LP_SUMMED] = rebased[:, _LP_SUMMED].sum(0)
    out[LP_BEFORE] = parts[:, LP_BEFORE].amax(0)
    return out


def all_reduce_logprobs(stats: torch.Tensor, all_reduce: Callable[[torch.Tensor, str], None]) -> torch.Tensor:
    """The same merge across ranks: ``all_reduce(tensor, "max" | "sum")`` reduces in place."""
    maxes = stats[[LP_MAX, LP_BEFORE]].contiguous()
    all_reduce(maxes, "max")
    out = rebase_logprobs(stats, maxes[0])
    sums = out[_LP_SUMMED].contiguous()
    all_reduce(sums, "sum")
    out[_LP_SUMMED] = sums
    out[LP_BEFORE] = maxes[1]
    return out


class LogprobsRows(NamedTuple):
    """Per-row outputs of ``linear_logprobs`` (float32 / float64; ``is_top1`` bool), ``None`` when not asked."""

    logp: torch.Tensor
    lse: torch.Tensor
    entropy: Optional[torch.Tensor]
    log_sum_sq_probs: Optional[torch.Tensor]
    mean_logits: Optional[torch.Tensor]
    is_top1: Optional[torch.Tensor]


def label_status(labels: torch.Tensor, ignore_index: int, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, bad)``: rows that count, and counted rows whose label is outside ``[0, vocab_size)``."""
    keep = labels != ignore_index
    bad = keep & ((labels < 0) | (labels >= vocab_size))
    return keep, bad


def mask_rows(values: torch.Tensor, keep: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
    """0 on ignored rows, NaN on rows with an invalid label (never a silent wrong value)."""
    nan = torch.full_like(values, float("nan"))
    return torch.where(keep, torch.where(bad, nan, values), torch.zeros_like(values))


def finish_logprobs(stats: torch.Tensor, labels: torch.Tensor, opts: LogprobsOptions) -> LogprobsRows:
    """Merged statistics -> per-row outputs.  ``lse`` is unmasked (the backward needs it)."""
    m, s = stats[LP_MAX], stats[LP_SUM]
    log_s = torch.log(s)
    lse = m + log_s
    keep, bad = label_status(labels, opts.ignore_index, opts.vocab_size)
    target = stats[LP_TARGET]
    logp = mask_rows(target - lse, keep, bad)
    entropy = mask_rows(log_s - stats[LP_ENT] / s, keep, bad) if opts.entropy else None
    lssp = mask_rows(torch.log(stats[LP_SQ]) - 2 * log_s, keep, bad) if opts.log_sum_sq_probs else None
    mean = mask_rows(stats[LP_ZSUM] / opts.vocab_size, keep, bad) if opts.mean_logits else None
    top1 = None
    if opts.is_top1:  # the label is the first argmax: it reaches the max and no earlier column does
        top1 = keep & ~bad & (target >= m) & (target > stats[LP_BEFORE])
    return LogprobsRows(logp, lse, entropy, lssp, mean, top1)


def mask_logprobs_grads(g_logp, g_entropy, labels, opts: LogprobsOptions):
    """Upstream gradients as the backends take them: fp32/fp64, 0 on ignored rows, NaN on bad labels
    (the gradient of a NaN output); the entropy's only where it counts."""
    keep, bad = label_status(labels, opts.ignore_index, opts.vocab_size)
    g = mask_rows(g_logp, keep, bad)
    ge = None if g_entropy is None else mask_rows(g_entropy, keep, bad)
    return g, ge


def empty_divergence_stats(n: int, like: torch.Tensor) -> torch.Tensor:
    stats = like.new_zeros(DV_PLANES, n)
    stats[DV_SMAX] = float("-inf")
    stats[DV_TMAX] = float("-inf")
    return stats


def rebase_divergence(stats: torch.Tensor, s_big: torch.Tensor, t_big: torch.Tensor, kind: Kind) -> torch.Tensor:
    ws, s_shift = _rescale(stats[DV_SMAX], stats[DV_SSUM], s_big)
    wt, _ = _rescale(stats[DV_TMAX], stats[DV_TSUM], t_big)
    out = stats.clone()
    out[DV_SMAX], out[DV_TMAX] = s_big, t_big
    out[DV_SSUM] = ws * stats[DV_SSUM]
    out[DV_TSUM] = wt * stats[DV_TSUM]
    out[DV_CROSS] = (wt if kind == Kind.FORWARD_KL else ws) * stats[DV_CROSS]
    out[DV_SENT] = ws * (stats[DV_SENT] + s_shift * stats[DV_SSUM])
    return out  # the KL planes are plain sums (computed against the merged lse)


_DV_SUMMED = [DV_SSUM, DV_TSUM, DV_CROSS, DV_SENT, DV_KLT, DV_KLS]


def merge_divergence(parts: torch.Tensor, kind: Kind) -> torch.Tensor:
    """``parts [K, DV_PLANES, N]`` (disjoint vocabulary slices) -> ``[DV_PLANES, N]``."""
    if parts.shape[0] == 1:
        return parts[0]
    s_big, t_big = parts[:, DV_SMAX].amax(0), parts[:, DV_TMAX].amax(0)
    rebased = torch.stack([rebase_divergence(p, s_big, t_big, kind) for p in parts.unbind(0)])
    out = rebased[0].clone()
    out[_DV_SUMMED] = rebased[:, _DV_SUMMED].sum(0)
    return out


def all_reduce_divergence(stats: torch.Tensor, kind: Kind, all_reduce) -> torch.Tensor:
    maxes = stats[[DV_SMAX, DV_TMAX]].contiguous()
    all_reduce(maxes, "max")
    out = rebase_divergence(stats, maxes[0], maxes[1], kind)
    sums = out[_DV_SUMMED].contiguous()
    all_reduce(sums, "sum")
    out[_DV_SUMMED] = sums
    return out


def divergence_lse(stats: torch.Tensor) -> torch.Tensor:
    """``[N, 2]`` log-sum-exps of the student and the teacher from merged statistics."""
    return torch.stack([stats[DV_SMAX] + torch.log(stats[DV_SSUM]), stats[DV_TMAX] + torch.log(stats[DV_TSUM])], 1)


class DivergenceRows(NamedTuple):
    div: torch.Tensor  # [N], 0 on ignored rows
    saved: torch.Tensor  # [N, 3]: lse_s, lse_t, aux (what the backward needs)
    entropy: Optional[torch.Tensor]  # [N] student entropy, when asked


def finish_divergence(stats: torch.Tensor, labels: Optional[torch.Tensor], opts: DivergenceOptions) -> DivergenceRows:
    """Merged statistics (with the KL planes for JSD) -> per-row divergence and the backward's saved rows.

    ``aux`` is the row's reverse KL (reverse_kl) or ``KL(ps || m)`` (jsd); the softmax chain rule needs it.
    """
    lse = divergence_lse(stats)
    lse_s, lse_t = lse[:, 0], lse[:, 1]
    zero = torch.zeros_like(lse_s)
    if opts.kind == Kind.FORWARD_KL:
        div, aux = stats[DV_CROSS] / stats[DV_TSUM] - lse_t + lse_s, zero
    elif opts.kind == Kind.REVERSE_KL:
        div = stats[DV_CROSS] / stats[DV_SSUM] - lse_s + lse_t
        aux = div
    else:
        div, aux = opts.beta * stats[DV_KLT] + (1.0 - opts.beta) * stats[DV_KLS], stats[DV_KLS]
    entropy = None
    if opts.entropy:
        entropy = torch.log(stats[DV_SSUM]) - stats[DV_SENT] / stats[DV_SSUM]
    if labels is not None:
        keep, bad = label_status(labels, opts.ignore_index, opts.vocab_size)
        div = mask_rows(div, keep, bad)
        if entropy is not None:
            entropy = mask_rows(entropy, keep, bad)
    return DivergenceRows(div, torch.stack([lse_s, lse_t, aux], 1), entropy)


def mask_divergence_grad(grad: torch.Tensor, labels: Optional[torch.Tensor], opts: DivergenceOptions) -> torch.Tensor:
    """The upstream gradient as the backends take it: 0 on ignored rows, NaN on invalid labels."""
    if labels is None:
        return grad
    keep, bad = label_status(labels, opts.ignore_index, opts.vocab_size)
    return mask_rows(grad, keep, bad)


def log_mixture_consts(beta: float) -> tuple[float, float]:
    """``(log beta, log(1 - beta))`` for ``log m = logaddexp(log pt + log beta, log ps + log(1 - beta))``."""
    return (math.log(beta) if beta > 0 else float("-inf"), math.log1p(-beta) if beta < 1 else float("-inf"))
