"""What every sequence-level loss shares: per-sequence log-probs from the fused primitive,
reference log-probs (precomputed or from a frozen head in the same call), the ``β·KL(π‖π₀)``
estimators, reductions and metrics."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as V
from ..primitives import linear_divergence, linear_logprobs

REDUCTIONS = ("mean", "sum", "none")


class SeqLogps:
    """Per-sequence summed log-probs ``logps (B,)``, completion lengths ``lengths (B,)``,
    and the token-level values they came from (``token_logps (B, T)``, ``token_entropy``)."""

    def __init__(self, logps, lengths, token_logps, token_entropy=None):
        self.logps, self.lengths, self.token_logps, self.token_entropy = logps, lengths, token_logps, token_entropy


def check_sequences(hidden, weight, labels, bias, *, paired: bool, hidden_name: str = "hidden") -> int:
    """hidden ``(B, T, D)``, labels ``(B, T)``; ``B`` even for paired losses. Returns ``B``."""
    V.check_head(hidden, weight, bias, hidden_name=hidden_name)
    if hidden.dim() != 3:
        raise ValueError(f"{hidden_name}: expected shape (B, T, D), got {tuple(hidden.shape)}")
    V.check_tensor(labels, "labels")
    if tuple(labels.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"labels: expected shape {tuple(hidden.shape[:2])} (B, T), got {tuple(labels.shape)}")
    b = hidden.shape[0]
    if paired and b % 2:
        raise ValueError(
            f"{hidden_name}: expected an even number of sequences (first half chosen/first responses, "
            f"second half rejected/second responses), got {b}"
        )
    return b


def sequence_logps(
    hidden, weight, labels, bias, *, ignore_index, temperature, softcap, backend,
    ld_alpha: Optional[float] = None, return_entropy: bool = False,
) -> SeqLogps:
    out = linear_logprobs(
        hidden, weight, labels, bias, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
        return_entropy=return_entropy, backend=backend,
    )
    tok, ent = out if return_entropy else (out, None)
    mask = labels != ignore_index
    lengths = mask.sum(-1)
    if ld_alpha is None:
        logps = tok.sum(-1)
    else:  # LD-DPO: tokens past the shorter response of the pair are down-weighted by ld_alpha
        half = labels.shape[0] // 2
        public = torch.minimum(lengths[:half], lengths[half:]).repeat(2)
        rank = mask.cumsum(-1)  # 1-based position among the counted tokens
        rear = mask & (rank > public.unsqueeze(-1))
        logps = torch.where(rear, tok * ld_alpha, tok).sum(-1)
    return SeqLogps(logps, lengths.to(logps.dtype), tok, ent)


def reference_logps(
    labels, *, precomputed, ref_hidden, ref_weight, ref_bias, hidden, weight, ignore_index, temperature, softcap,
    backend, ld_alpha: Optional[float] = None, names=("ref_logps",),
) -> Optional[torch.Tensor]:
    """``ℓ₀ (B,)``: the precomputed tensor(s), or a no-grad fused pass over the reference head."""
    have_pre = precomputed is not None
    have_head = ref_hidden is not None or ref_weight is not None
    if have_pre and have_head:
        raise ValueError(f"{names[0]}: give precomputed reference log-probs or ref_hidden/ref_weight, not both")
    if have_head:
        if ref_hidden is None or ref_weight is None:
            raise ValueError("ref_weight: ref_hidden and ref_weight must be given together")
        V.check_head(ref_hidden, ref_weight, ref_bias, hidden_name="ref_hidden", weight_name="ref_weight",
                     bias_name="ref_bias")
        if ref_weight.shape[0] != weight.shape[0]:
            raise ValueError(
                f"ref_weight: expected vocabulary V={weight.shape[0]} (that of weight), got shape "
                f"{tuple(ref_weight.shape)}"
            )
        if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
            raise ValueError(
                f"ref_hidden: expected leading shape {tuple(hidden.shape[:-1])} (that of hidden), got "
                f"{tuple(ref_hidden.shape)}"
            )
        with torch.no_grad():
            return sequence_logps(
                ref_hidden.detach(), ref_weight.detach(), labels, None if ref_bias is None else ref_bias.detach(),
                ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                ld_alpha=ld_alpha,
            ).logps
    if not have_pre:
        return None
    pre = precomputed
    if isinstance(pre, tuple):  # (chosen, rejected) halves
        for t, name in zip(pre, names):
            V.check_tensor(t, name)
            if tuple(t.shape) != (labels.shape[0] // 2,):
                raise ValueError(f"{name}: expected shape ({labels.shape[0] // 2},), got {tuple(t.shape)}")
        pre = torch.cat(pre)
    else:
        V.check_tensor(pre, names[0])
        if tuple(pre.shape) != (labels.shape[0],):
            raise ValueError(f"{names[0]}: expected shape ({labels.shape[0]},), got {tuple(pre.shape)}")
    if pre.device != labels.device:
        raise ValueError(f"{names[0]}: expected device {labels.device}, got {pre.device}")
    return pre.detach().float() if pre.dtype != torch.float64 else pre.detach()


def token_exact_kl(hidden, weight, labels, bias, *, ref_hidden, ref_weight, ref_bias, ignore_index, temperature,
                   softcap, backend) -> torch.Tensor:
    """``Σ_t KL(π(·|y<t) ‖ π₀(·|y<t))`` along each sequence's path (B,), exact over the vocabulary."""
    if ref_hidden is None or ref_weight is None:
        raise ValueError("ref_hidden: the token_exact KL estimator needs ref_hidden and ref_weight")
    kl = linear_divergence(
        hidden, weight, ref_hidden, ref_weight, labels, student_bias=bias, teacher_bias=ref_bias,
        kind="reverse_kl", temperature=temperature, student_softcap=softcap, teacher_softcap=softcap,
        ignore_index=ignore_index, backend=backend,
    )
    return kl.sum(-1)


def reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    V.check_choice(reduction, "reduction", REDUCTIONS)
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.mean() if losses.numel() else losses.sum()


def pair_metrics(logps: torch.Tensor, rewards: torch.Tensor) -> dict:
    """Detached chosen/rejected log-probs and rewards, mean margin and accuracy."""
    half = logps.shape[0] // 2
    rw, rl = rewards[:half].detach(), rewards[half:].detach()
    return {
        "chosen_logps": logps[:half].detach(),
        "rejected_logps": logps[half:].detach(),
        "chosen_rewards": rw,
        "rejected_rewards": rl,
        "reward_margin": (rw - rl).mean() if half else rw.sum(),
        "reward_accuracy": (rw > rl).float().mean() if half else rw.sum(),
    }
