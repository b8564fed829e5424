"""Public primitives: the only heavy operations in fastpref (docs/design.md §2).

Every loss in :mod:`fastpref.losses` is a few lines of PyTorch on their per-row outputs.  The public
functions validate their arguments once; losses, which validate their own, call the unchecked
``logprobs_rows`` / ``divergence_rows`` below.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple, Optional, Sequence, Union

import torch

from . import _validate as V
from . import distributed as _dist
from .backends import CHOICES
from .backends import contract as C
from .ops import LinearDivergenceFunction, LinearLogprobsFunction

__all__ = [
    "DIVERGENCE_KINDS", "EXTRA_OUTPUTS", "LogprobsOutput", "linear_divergence", "linear_logprobs", "sequence_logprobs",
]

DIVERGENCE_KINDS = tuple(C.KIND_NAMES)
EXTRA_OUTPUTS = C.EXTRA_OUTPUTS


class LogprobsOutput(NamedTuple):
    """What :func:`linear_logprobs` returns when ``outputs`` asks for per-row statistics (each shaped
    like ``labels``; ``None`` when not asked for)."""

    logp: torch.Tensor  # log-probability of the label (differentiable)
    entropy: Optional[torch.Tensor] = None  # full-vocabulary entropy (differentiable)
    log_sum_sq_probs: Optional[torch.Tensor] = None  # log sum_v p_v^2 (no gradient)
    mean_logits: Optional[torch.Tensor] = None  # mean over the vocabulary of the transformed logits (no gradient)
    is_top1: Optional[torch.Tensor] = None  # bool: the label is the first argmax


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------- unchecked internal calls


def logprobs_rows(hidden, weight, labels, bias, opts: C.LogprobsOptions, backend: str,
                  split: Optional[_dist.Split] = None) -> LogprobsOutput:
    """``linear_logprobs`` without validation: ``hidden (..., D)``, ``labels (...)`` int64.  A head split
    over ranks (DTensors, or ``split`` from :func:`.distributed.split_of`) goes to :mod:`.distributed`."""
    if split is None and _dist.any_dtensor(hidden, weight, bias):
        split = _dist.split_of(hidden, weight, bias, labels, None)
    if split is not None:
        return _dist.logprobs_rows(split, hidden, weight, labels, bias, opts, backend)
    lead = labels.shape
    opts = replace(opts.for_weight(weight), cache=_needs_grad(hidden, weight, bias))
    logp, ent, lssp, mean, top1 = LinearLogprobsFunction.apply(
        hidden.reshape(labels.numel(), hidden.shape[-1]).contiguous(),
        weight.contiguous(),
        labels.reshape(-1).contiguous(),
        None if bias is None else bias.contiguous(),
        opts,
        backend,
    )
    return LogprobsOutput(
        logp.reshape(lead),
        ent.reshape(lead) if opts.entropy else None,
        lssp.reshape(lead) if opts.log_sum_sq_probs else None,
        mean.reshape(lead) if opts.mean_logits else None,
        top1.reshape(lead) if opts.is_top1 else None,
    )


def divergence_rows(s_hidden, s_weight, t_hidden, t_weight, labels, s_bias, t_bias, opts: C.DivergenceOptions,
                    backend: str, split: Optional[_dist.Split] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``linear_divergence`` without validation -> ``(div, student entropy or None)`` shaped ``(...)``.
    Heads split over ranks go to :mod:`.distributed`, as in :func:`logprobs_rows`."""
    if split is None and _dist.any_dtensor(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias):
        split = _dist.split_of(s_hidden, s_weight, s_bias, labels, None, teacher=(t_hidden, t_weight, t_bias),
                               prefix="student_")
    if split is not None:
        return _dist.divergence_rows(split, s_hidden, s_weight, t_hidden, t_weight, labels, s_bias, t_bias, opts,
                                     backend)
    lead = s_hidden.shape[:-1]
    n = lead.numel()
    opts = replace(opts.for_weight(s_weight), cache=_needs_grad(s_hidden, s_weight, s_bias))
    div, ent = LinearDivergenceFunction.apply(
        s_hidden.reshape(n, s_hidden.shape[-1]).contiguous(),
        s_weight.contiguous(),
        None if s_bias is None else s_bias.contiguous(),
        t_hidden.detach().reshape(n, t_hidden.shape[-1]).contiguous(),  # constants (and never the
        t_weight.detach().contiguous(),  # same tensor objects as the student's: autograd.Function inputs)
        None if t_bias is None else t_bias.detach().contiguous(),
        None if labels is None else labels.reshape(-1).contiguous(),
        opts,
        backend,
    )
    return div.reshape(lead), (ent.reshape(lead) if opts.entropy else None)


# --------------------------------------------------------------------------- public functions


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    return_entropy: bool = False,
    outputs: Sequence[str] = (),
    backend: str = "auto",
    process_group: Optional[object] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor], LogprobsOutput]:
    """Log-probability of each row's label under an LM head, without materialising the logits.

    Args:
        hidden: ``(..., D)`` last hidden states, any float dtype.
        weight: ``(V, D)`` LM head, same dtype and device as ``hidden``.
        labels: ``(...)`` integer targets (already shifted); ``ignore_index`` rows count for nothing.
        bias: optional ``(V,)``.
        temperature: the transformed logits are divided by it (> 0).
        softcap: if set, ``softcap * tanh(x / softcap)`` of the scaled logits (Gemma-2 style).
        logit_scale: multiplies the logits before the softcap (Cohere / Granite style).
        return_entropy: also return the full-vocabulary entropy of each row's distribution.
        outputs: per-row statistics to compute in the same pass, any of ``"entropy"``,
            ``"log_sum_sq_probs"`` (``log sum_v p_v^2``), ``"mean_logits"`` (mean of the transformed
            logits over the vocabulary), ``"is_top1"`` (the label is the first argmax) — TRL 1.16's
            fused LM head contract.  Each costs a little and only when asked for.
        backend: ``"auto" | "torch" | "triton" | "cuda"`` (``FASTPREF_BACKEND`` overrides).
        process_group: vocabulary parallel, Megatron style: ``weight`` (and ``bias``) are this rank's
            slice of the head, the ranks of the group hold consecutive slices in rank order and the
            same rows (``hidden``, ``labels``: global token ids).  A DTensor ``weight`` needs no group:
            see :mod:`fastpref.distributed` and the README's "Distributed" section.

    Returns:
        ``logp`` of shape ``labels.shape``, float32 (float64 for float64 inputs), 0 on ignored rows,
        NaN on rows whose label is outside ``[0, V)`` when that cannot be checked eagerly (labels on
        an accelerator, or under ``torch.compile``).  With ``return_entropy=True`` and no
        ``outputs``: ``(logp, entropy)``.  With ``outputs``: a :class:`LogprobsOutput`.  The log-probs
        and the entropy accept arbitrary upstream gradients; the other statistics have none; a
        frozen head (``requires_grad=False``) gets no gradient work.

    Semantics (what the fused kernels compute, in plain PyTorch)::

        u = (hidden @ weight.T + bias) * logit_scale
        u = softcap * torch.tanh(u / softcap)                  # if softcap
        z = u / temperature
        logp = z.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
        log_sum_sq_probs = (2 * z.log_softmax(-1)).logsumexp(-1)
        mean_logits = z.mean(-1)
        is_top1 = z.argmax(-1) == labels
    """
    V.check_head(hidden, weight, bias)
    opts = C.LogprobsOptions(
        ignore_index=V.check_ignore_index(ignore_index),
        transform=V.check_transform(temperature, softcap, logit_scale),
        **{name: True for name in V.check_outputs(outputs, "outputs", EXTRA_OUTPUTS)},
    )
    if V.check_bool(return_entropy, "return_entropy"):
        opts = replace(opts, entropy=True)
    split = _dist.split_of(hidden, weight, bias, labels, process_group)
    labels = V.check_labels(labels, hidden, weight.shape[0] if split is None else split.vocab_size, opts.ignore_index)
    backend = V.check_choice(backend, "backend", CHOICES)
    out = logprobs_rows(hidden, weight, labels, bias, opts, backend, split)
    if outputs:
        return out
    return (out.logp, out.entropy) if return_entropy else out.logp


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    average: bool = False,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    backend: str = "auto",
    process_group: Optional[object] = None,
) -> torch.Tensor:
    """Summed (or, with ``average=True``, mean) log-prob of each sequence's non-ignored tokens.

    ``hidden (B, T, D)``, ``labels (B, T)`` -> ``(B,)``.  A sequence with no counted token gives 0::

        logp = linear_logprobs(hidden, weight, labels, bias, ...)       # (B, T)
        total = logp.sum(-1)
        out = total / (labels != ignore_index).sum(-1).clamp(min=1) if average else total
    """
    V.check_float_tensor(hidden, "hidden", min_dim=2)
    logp = linear_logprobs(
        hidden, weight, labels, bias, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
        logit_scale=logit_scale, backend=backend, process_group=process_group,
    )
    total = logp.sum(-1)
    if not V.check_bool(average, "average"):
        return total
    count = (labels.long() != ignore_index).sum(-1).clamp(min=1)
    return total / count.to(total.dtype)


def linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
    process_group: Optional[object] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Per-row divergence between a student head and a constant teacher/reference head.

    Each head's logits are transformed as in :func:`linear_logprobs` (bias, logit scale, softcap,
    then the shared temperature); hidden sizes may differ, vocabularies must match.  With
    ``ps = softmax(zs)``, ``pt = softmax(zt)``::

        forward_kl = (pt * (pt.log() - ps.log())).sum(-1)      # KL(pt || ps)
        reverse_kl = (ps * (ps.log() - pt.log())).sum(-1)      # KL(ps || pt)
        m = beta * pt + (1 - beta) * ps                       # kind="jsd", TRL's GKD convention
        jsd = beta * KL(pt || m) + (1 - beta) * KL(ps || m)   # beta=0 -> forward_kl, 1 -> reverse_kl

    Returns float32 ``(...)`` (float64 for float64 inputs): 0 where ``labels == ignore_index``, NaN
    where a label is outside ``[0, V)`` and could not be checked eagerly (``labels`` only mask rows).
    Gradients flow to the student side only.  ``return_entropy=True`` also returns the student's
    entropy per row (no gradient), as TRL's distillation trainer logs it.  Split heads (a DTensor pair,
    or local slices with ``process_group``) must be split alike: see :func:`linear_logprobs`.
    """
    V.check_head(student_hidden, student_weight, student_bias, hidden_name="student_hidden",
                 weight_name="student_weight", bias_name="student_bias")
    V.check_head(teacher_hidden, teacher_weight, teacher_bias, hidden_name="teacher_hidden",
                 weight_name="teacher_weight", bias_name="teacher_bias")
    V.check_same_device(student_hidden, "student_hidden", teacher_hidden, "teacher_hidden")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(
            f"teacher_weight: expected vocabulary V={student_weight.shape[0]} (that of student_weight), "
            f"got shape {tuple(teacher_weight.shape)}"
        )
    if tuple(teacher_hidden.shape[:-1]) != tuple(student_hidden.shape[:-1]):
        raise ValueError(
            f"teacher_hidden: expected leading shape {tuple(student_hidden.shape[:-1])} (that of "
            f"student_hidden), got shape {tuple(teacher_hidden.shape)}"
        )
    kind_id = C.KIND_NAMES[V.check_choice(kind, "kind", DIVERGENCE_KINDS)]
    beta = V.check_range(beta, "beta", 0.0, 1.0, lo_open=False, hi_open=False)
    if kind_id == C.Kind.JSD and beta in (0.0, 1.0):
        kind_id = C.Kind.FORWARD_KL if beta == 0.0 else C.Kind.REVERSE_KL
    temperature = V.check_positive(temperature, "temperature")
    opts = C.DivergenceOptions(
        kind=kind_id, beta=beta, ignore_index=V.check_ignore_index(ignore_index),
        student=V.check_transform(temperature, student_softcap, student_logit_scale, prefix="student_"),
        teacher=V.check_transform(temperature, teacher_softcap, teacher_logit_scale, prefix="teacher_"),
        entropy=V.check_bool(return_entropy, "return_entropy"),
    )
    split = _dist.split_of(student_hidden, student_weight, student_bias, labels, process_group,
                           teacher=(teacher_hidden, teacher_weight, teacher_bias), prefix="student_")
    vocab = student_weight.shape[0] if split is None else split.vocab_size
    if labels is not None:
        labels = V.check_labels(labels, student_hidden, vocab, opts.ignore_index, hidden_name="student_hidden")
    backend = V.check_choice(backend, "backend", CHOICES)
    div, ent = divergence_rows(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
                               teacher_bias, opts, backend, split)
    return (div, ent) if return_entropy else div


def __getattr__(name: str):
    # The module twins lived here before 0.2.0; they are defined in fastpref.modules now.
    if name in ("LinearDivergence", "LinearLogprobs", "SequenceLogprobs"):
        from . import modules

        return getattr(modules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
