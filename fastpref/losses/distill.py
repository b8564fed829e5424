"""``distill_loss``: token-level knowledge distillation (SPEC §4.4) on ``linear_divergence``."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as V
from ..primitives import linear_divergence, linear_logprobs


def distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    reduction: str = "mean",
    num_items_in_batch: Optional[int] = None,
    ignore_index: int = -100,
    backend: str = "auto",
) -> torch.Tensor:
    """Distil a teacher head into a student head, token by token, never materialising logits.

    ``loss = soft_weight · div + hard_weight · NLL(labels)``, per token, where ``div`` is
    ``forward_kl`` = KL(pt‖ps), ``reverse_kl`` = KL(ps‖pt) or the generalised ``jsd`` with ``beta``
    (TRL's GKD convention), both heads at ``temperature`` (the hard NLL at temperature 1).  Positions with
    ``labels == ignore_index`` count for nothing.

    ``reduction="mean"`` averages over counted tokens (0 if none), ``"sum"`` sums, and a given
    ``num_items_in_batch`` divides the sum by it (gradient accumulation); ``"none"`` returns the
    per-token loss.  Shapes: ``student_hidden (..., Ds)``, ``teacher_hidden (..., Dt)``,
    ``labels (...)``; both heads share the vocabulary.
    """
    V.check_choice(reduction, "reduction", ("mean", "sum", "none"))
    hard_weight = V.check_range(hard_weight, "hard_weight", 0.0, float("inf"), lo_open=False, hi_open=True)
    soft_weight = V.check_range(soft_weight, "soft_weight", 0.0, float("inf"), lo_open=False, hi_open=True)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.clamp(min=1)
        elif V.check_int(num_items_in_batch, "num_items_in_batch") < 1:
            raise ValueError(f"num_items_in_batch: expected an int >= 1, got {num_items_in_batch}")
    per_token = soft_weight * linear_divergence(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias=student_bias,
        teacher_bias=teacher_bias, kind=kind, beta=beta, temperature=temperature, student_softcap=student_softcap,
        teacher_softcap=teacher_softcap, ignore_index=ignore_index, backend=backend,
    )
    if hard_weight > 0:
        per_token = per_token - hard_weight * linear_logprobs(
            student_hidden, student_weight, labels, student_bias, ignore_index=ignore_index,
            softcap=student_softcap, backend=backend,
        )
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp(min=1).to(total.dtype)
