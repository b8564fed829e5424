"""Reference oracle for the two primitives: materialise the full logits, then apply
the textbook formulas (SPEC §2.1, §2.2).

Deliberately naive and written without sharing code with the fast paths, so that a
bug in one is visible against the other.  ``precision="fp64"`` computes everything in
float64 (the ground truth of the tests); ``precision="native"`` does what plain PyTorch
code would do: the matmul in the input dtype, the softmax math in float32.
Gradients come from autograd.
"""

from __future__ import annotations

from typing import Optional

import torch


def materialize_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    precision: str = "fp64",
) -> torch.Tensor:
    """``z = (hidden @ weight.T + bias) / temperature``, optionally ``softcap * tanh(z / softcap)``."""
    if precision == "fp64":
        z = hidden.double() @ weight.double().T
        if bias is not None:
            z = z + bias.double()
    elif precision == "native":
        z = hidden @ weight.T
        if bias is not None:
            z = z + bias
        z = z.float() if z.dtype != torch.float64 else z
    else:
        raise ValueError(f"precision: expected 'fp64' or 'native', got {precision!r}")
    z = z / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


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
    precision: str = "fp64",
):
    """Per-row ``log softmax(z)[label]`` (and the entropy of ``softmax(z)``); 0 on ignored rows."""
    z = materialize_logits(hidden, weight, bias, temperature=temperature, softcap=softcap, precision=precision)
    logsm = torch.log_softmax(z, dim=-1)
    keep = labels != ignore_index
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    logp = torch.gather(logsm, -1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(keep, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    probs = logsm.exp()
    entropy = -(probs * logsm).sum(-1)
    entropy = torch.where(keep, entropy, torch.zeros_like(entropy))
    return logp, entropy


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
    precision: str = "fp64",
) -> torch.Tensor:
    """Per-row divergence between the student and (constant) teacher distributions.

    forward_kl = KL(pt || ps), reverse_kl = KL(ps || pt),
    jsd = beta * KL(pt || m) + (1 - beta) * KL(ps || m) with m = beta * pt + (1 - beta) * ps
    (beta == 0 -> forward_kl, beta == 1 -> reverse_kl, as in TRL's GKD).
    """
    zs = materialize_logits(
        student_hidden, student_weight, student_bias, temperature=temperature, softcap=student_softcap,
        precision=precision,
    )
    with torch.no_grad():
        zt = materialize_logits(
            teacher_hidden, teacher_weight, teacher_bias, temperature=temperature, softcap=teacher_softcap,
            precision=precision,
        )
    zt = zt.to(zs.dtype)
    log_ps = torch.log_softmax(zs, dim=-1)
    log_pt = torch.log_softmax(zt, dim=-1)
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "forward_kl":
        div = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    elif kind == "reverse_kl":
        div = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    elif kind == "jsd":
        m = beta * log_pt.exp() + (1.0 - beta) * log_ps.exp()
        log_m = m.log()
        kl_t = (log_pt.exp() * (log_pt - log_m)).sum(-1)
        kl_s = (log_ps.exp() * (log_ps - log_m)).sum(-1)
        div = beta * kl_t + (1.0 - beta) * kl_s
    else:
        raise ValueError(f"kind: expected 'forward_kl', 'reverse_kl' or 'jsd', got {kind!r}")
    if labels is not None:
        div = torch.where(labels != ignore_index, div, torch.zeros_like(div))
    return div


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
    precision: str = "fp64",
) -> torch.Tensor:
    """``(B, T, D) -> (B,)``: sum (or mean) of the token log-probs over non-ignored positions."""
    logp = linear_logprobs(
        hidden, weight, labels, bias, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
        precision=precision,
    )
    total = logp.sum(-1)
    if not average:
        return total
    count = (labels != ignore_index).sum(-1)
    return total / count.clamp(min=1)

