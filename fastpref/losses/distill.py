"""``distill_loss``: token-level knowledge distillation on ``linear_divergence``."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as V
from ..primitives import linear_divergence, linear_logprobs
from ._common import BACKENDS, REDUCTIONS, check_num_items, check_reference_head, reduce_tokens

KINDS = ("forward_kl", "reverse_kl", "jsd")


def distill_loss(
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
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    ignore_index: int = -100,
    temperature: float = 1.0,
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    reduction: str = "mean",
    num_items_in_batch: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Distil a teacher head into a student head, token by token, never materialising logits.

    ``loss = soft_weight · div + hard_weight · NLL(labels)``, per token, where ``div`` is
    ``forward_kl`` = KL(pt‖ps), ``reverse_kl`` = KL(ps‖pt) or the generalised ``jsd`` with ``beta``
    (TRL's GKD convention), both heads at ``temperature`` (the hard NLL at temperature 1).  Positions with
    ``labels == ignore_index`` count for nothing; ``labels=None`` counts every position (and allows no
    hard term).

    ``reduction="mean"`` averages over counted tokens (0 if none), ``"sum"`` sums, and a given
    ``num_items_in_batch`` divides the sum by it (gradient accumulation); ``"none"`` returns the
    per-token loss.  Shapes: ``student_hidden (..., Ds)``, ``teacher_hidden (..., Dt)``,
    ``labels (...)``; both heads share the vocabulary.
    """
    V.check_choice(reduction, "reduction", REDUCTIONS)
    V.check_choice(kind, "kind", KINDS)
    V.check_range(beta, "beta", 0.0, 1.0, lo_open=False, hi_open=False)
    V.check_positive(temperature, "temperature")
    V.check_choice(backend, "backend", BACKENDS)
    V.check_int(ignore_index, "ignore_index")
    hard_weight = V.check_range(hard_weight, "hard_weight", 0.0, float("inf"), lo_open=False, hi_open=True)
    soft_weight = V.check_range(soft_weight, "soft_weight", 0.0, float("inf"), lo_open=False, hi_open=True)
    num_items_in_batch = check_num_items(num_items_in_batch)
    V.check_head(student_hidden, student_weight, student_bias, hidden_name="student_hidden",
                 weight_name="student_weight", bias_name="student_bias")
    if teacher_hidden is None or teacher_weight is None:
        raise TypeError("teacher_hidden: expected the teacher's hidden states and head (teacher_weight), got None")
    check_reference_head(teacher_hidden, teacher_weight, teacher_bias, student_hidden, student_weight,
                         names=("teacher_hidden", "teacher_weight", "teacher_bias"),
                         of=("student_hidden", "student_weight"))
    V.check_optional_positive(student_softcap, "student_softcap")
    V.check_optional_positive(teacher_softcap, "teacher_softcap")
    if labels is not None:
        labels = V.check_labels(labels, student_hidden, student_weight.shape[0], ignore_index,
                                hidden_name="student_hidden")
    elif hard_weight > 0:
        raise ValueError("labels: hard_weight > 0 needs labels for its NLL term")
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
    mask = None if labels is None else labels != ignore_index
    return reduce_tokens(per_token, mask, reduction, num_items_in_batch)
