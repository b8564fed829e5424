"""Public primitives (SPEC §2, §7): the only heavy operations in fastpref.

Every loss in :mod:`fastpref.losses` is a few lines of PyTorch on their per-row outputs.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from . import _validate as V
from .backends import resolve
from .backends.torch_backend import FORWARD_KL, JSD, REVERSE_KL
from .ops import LinearDivergenceFunction, LinearLogprobsFunction

DIVERGENCE_KINDS = {"forward_kl": FORWARD_KL, "reverse_kl": REVERSE_KL, "jsd": JSD}


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    return_entropy: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Log-probability of each row's label under an LM head, without materialising logits.

    Args:
        hidden: ``(..., D)`` last hidden states, any float dtype.
        weight: ``(V, D)`` LM head, same dtype and device as ``hidden``.
        labels: ``(...)`` integer targets (already shifted); ``ignore_index`` rows count for nothing.
        bias: optional ``(V,)``.
        temperature: logits are divided by it (> 0).
        softcap: if set, logits become ``softcap * tanh(z / softcap)`` (Gemma-2 style).
        return_entropy: also return the full-vocabulary entropy of each row's distribution.
        backend: ``"auto" | "torch" | "triton" | "cuda"`` (``FASTPREF_BACKEND`` overrides).

    Returns:
        ``logp`` of shape ``labels.shape``, float32 (float64 for float64 inputs); 0 on ignored
        rows, NaN on rows whose label is outside ``[0, V)`` when that cannot be checked eagerly.
        With ``return_entropy=True``, ``(logp, entropy)``.  Both accept arbitrary upstream
        gradients; a frozen head (``requires_grad=False``) gets no gradient work.

    Semantics (what the fused kernels compute, in plain PyTorch)::

        z = (hidden @ weight.T + bias) / temperature
        z = softcap * torch.tanh(z / softcap)            # if softcap
        logp = z.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
        entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    """
    V.check_head(hidden, weight, bias)
    temperature = V.check_positive(temperature, "temperature")
    softcap = V.check_optional_positive(softcap, "softcap")
    labels = V.check_labels(labels, hidden, weight.shape[0], ignore_index)
    name = resolve(V.check_choice(backend, "backend", ("auto", "torch", "triton", "cuda")), hidden.device)
    lead = labels.shape
    logp, entropy = LinearLogprobsFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(),
        weight.contiguous(),
        labels.reshape(-1).contiguous(),
        None if bias is None else bias.contiguous(),
        ignore_index,
        temperature,
        softcap,
        bool(return_entropy),
        name,
    )
    if return_entropy:
        return logp.reshape(lead), entropy.reshape(lead)
    return logp.reshape(lead)


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
    backend: str = "auto",
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
        backend=backend,
    )
    total = logp.sum(-1)
    if not average:
        return total
    count = (labels != ignore_index).sum(-1).clamp(min=1)
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
    ignore_index: int = -100,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-row divergence between a student head and a constant teacher/reference head.

    Student ``zs = (student_hidden @ student_weight.T + student_bias) / temperature`` (and
    softcap), teacher ``zt`` likewise; hidden sizes may differ, vocabularies must match.
    With ``ps = softmax(zs)``, ``pt = softmax(zt)``::

        forward_kl = (pt * (pt.log() - ps.log())).sum(-1)      # KL(pt || ps)
        reverse_kl = (ps * (ps.log() - pt.log())).sum(-1)      # KL(ps || pt)
        m = beta * pt + (1 - beta) * ps                       # kind="jsd", TRL GKD convention
        jsd = beta * KL(pt || m) + (1 - beta) * KL(ps || m)   # beta=0 -> forward_kl, 1 -> reverse_kl

    Returns float32 ``(...)`` (float64 for float64 inputs), 0 where ``labels == ignore_index``
    (``labels`` only masks rows).  Gradients flow to the student side only.
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
    kind_id = DIVERGENCE_KINDS.get(V.check_choice(kind, "kind", tuple(DIVERGENCE_KINDS)))
    beta = V.check_range(beta, "beta", 0.0, 1.0, lo_open=False, hi_open=False)
    if kind_id == JSD and beta == 0.0:
        kind_id = FORWARD_KL
    elif kind_id == JSD and beta == 1.0:
        kind_id = REVERSE_KL
    temperature = V.check_positive(temperature, "temperature")
    student_softcap = V.check_optional_positive(student_softcap, "student_softcap")
    teacher_softcap = V.check_optional_positive(teacher_softcap, "teacher_softcap")
    if labels is not None:
        labels = V.check_labels(labels, student_hidden, student_weight.shape[0], ignore_index,
                                hidden_name="student_hidden", range_check=False)
        labels = labels.reshape(-1).contiguous()
    else:
        V.check_int(ignore_index, "ignore_index")
    name = resolve(V.check_choice(backend, "backend", ("auto", "torch", "triton", "cuda")), student_hidden.device)
    lead = student_hidden.shape[:-1]
    div = LinearDivergenceFunction.apply(
        student_hidden.reshape(-1, student_hidden.shape[-1]).contiguous(),
        student_weight.contiguous(),
        None if student_bias is None else student_bias.contiguous(),
        teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).contiguous(),
        teacher_weight.contiguous(),
        None if teacher_bias is None else teacher_bias.contiguous(),
        labels,
        ignore_index,
        kind_id,
        beta,
        temperature,
        student_softcap,
        teacher_softcap,
        name,
    )
    return div.reshape(lead)


class LinearLogprobs(nn.Module):
    """Module twin of :func:`linear_logprobs`; options are fixed at construction."""

    def __init__(self, *, ignore_index: int = -100, temperature: float = 1.0, softcap: Optional[float] = None,
                 return_entropy: bool = False, backend: str = "auto"):
        super().__init__()
        self.kw = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                       return_entropy=return_entropy, backend=backend)

    def forward(self, hidden, weight, labels, bias=None):
        return linear_logprobs(hidden, weight, labels, bias, **self.kw)


class LinearDivergence(nn.Module):
    """Module twin of :func:`linear_divergence`; options are fixed at construction."""

    def __init__(self, *, kind: str = "forward_kl", beta: float = 0.5, temperature: float = 1.0,
                 student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                 ignore_index: int = -100, backend: str = "auto"):
        super().__init__()
        self.kw = dict(kind=kind, beta=beta, temperature=temperature, student_softcap=student_softcap,
                       teacher_softcap=teacher_softcap, ignore_index=ignore_index, backend=backend)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                student_bias=None, teacher_bias=None):
        return linear_divergence(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                 student_bias=student_bias, teacher_bias=teacher_bias, **self.kw)
