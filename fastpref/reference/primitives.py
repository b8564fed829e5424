"""Reference oracle for the two primitives: materialise the full logits, then apply
the textbook formulas (docs/design.md §2).

Deliberately naive and written without sharing code with the fast paths, so that a
bug in one is visible against the other.  ``precision="fp64"`` computes everything in
float64 (the ground truth of the tests); ``precision="native"`` does what plain PyTorch
code would do: the matmul in the input dtype, the softmax math in float32.
Gradients come from autograd.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["linear_divergence", "linear_logprobs", "materialize_logits", "sequence_logprobs"]


def materialize_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    precision: str = "fp64",
) -> torch.Tensor:
    """``u = (hidden @ weight.T + bias) * logit_scale``, optionally ``u = softcap * tanh(u / softcap)``,
    then ``z = u / temperature`` (the model's softcapped logits sampled at a temperature, the order of
    TRL and Hugging Face)."""
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
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


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
    outputs: tuple = (),
    precision: str = "fp64",
):
    """Per-row ``log softmax(z)[label]``; 0 on ignored rows.

    ``return_entropy=True`` -> ``(logp, entropy)``.  With ``outputs`` (names among ``"entropy"``,
    ``"log_sum_sq_probs"``, ``"mean_logits"``, ``"is_top1"``) -> a dict with ``"logp"`` and each name.
    """
    z = materialize_logits(hidden, weight, bias, temperature=temperature, softcap=softcap,
                           logit_scale=logit_scale, precision=precision)
    logsm = torch.log_softmax(z, dim=-1)
    labels = labels.long()
    keep = labels != ignore_index
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    logp = torch.gather(logsm, -1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(keep, logp, torch.zeros_like(logp))

    def masked(x):
        return torch.where(keep, x, torch.zeros_like(x))

    if not outputs:
        if not return_entropy:
            return logp
        return logp, masked(-(logsm.exp() * logsm).sum(-1))
    out = {"logp": logp}
    for name in outputs:
        if name == "entropy":
            out[name] = masked(-(logsm.exp() * logsm).sum(-1))
        elif name == "log_sum_sq_probs":
            out[name] = masked(torch.log((logsm.exp() ** 2).sum(-1)))
        elif name == "mean_logits":
            out[name] = masked(z.mean(-1))
        elif name == "is_top1":
            out[name] = keep & (z.argmax(-1) == safe)  # torch.argmax returns the first maximum
        else:
            raise ValueError(f"outputs: unknown name {name!r}")
    return out


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
    precision: str = "fp64",
):
    """Per-row divergence between the student and (constant) teacher distributions.

    forward_kl = KL(pt || ps), reverse_kl = KL(ps || pt),
    jsd = beta * KL(pt || m) + (1 - beta) * KL(ps || m) with m = beta * pt + (1 - beta) * ps
    (beta == 0 -> forward_kl, beta == 1 -> reverse_kl, as in TRL's GKD).  ``return_entropy=True`` also
    returns the student's entropy per row.
    """
    zs = materialize_logits(
        student_hidden, student_weight, student_bias, temperature=temperature, softcap=student_softcap,
        logit_scale=student_logit_scale, precision=precision,
    )
    with torch.no_grad():
        zt = materialize_logits(
            teacher_hidden, teacher_weight, teacher_bias, temperature=temperature, softcap=teacher_softcap,
            logit_scale=teacher_logit_scale, precision=precision,
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
        # log m in log space: a probability that underflows in m itself would give 0 * log 0
        log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
        kl_t = (log_pt.exp() * (log_pt - log_m)).sum(-1)
        kl_s = (log_ps.exp() * (log_ps - log_m)).sum(-1)
        div = beta * kl_t + (1.0 - beta) * kl_s
    else:
        raise ValueError(f"kind: expected 'forward_kl', 'reverse_kl' or 'jsd', got {kind!r}")
    entropy = -(log_ps.exp() * log_ps).sum(-1).detach()
    if labels is not None:
        keep = labels.long() != ignore_index
        div = torch.where(keep, div, torch.zeros_like(div))
        entropy = torch.where(keep, entropy, torch.zeros_like(entropy))
    return (div, entropy) if return_entropy else div


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
    precision: str = "fp64",
) -> torch.Tensor:
    """``(B, T, D) -> (B,)``: sum (or mean) of the token log-probs over non-ignored positions."""
    logp = linear_logprobs(
        hidden, weight, labels, bias, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
        logit_scale=logit_scale, precision=precision,
    )
    total = logp.sum(-1)
    if not average:
        return total
    count = (labels.long() != ignore_index).sum(-1)
    return total / count.clamp(min=1)

