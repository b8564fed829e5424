"""``nll_loss``: plain NLL / SFT on the fused log-prob primitive."""

from __future__ import annotations

from typing import Optional

import torch

from .. import _validate as V
from ..primitives import logprobs_rows
from ._common import check_common, check_num_items, reduce_tokens


def nll_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    num_items_in_batch: Optional[int] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Plain NLL / SFT on ``hidden (..., D)``, ``labels (...)``: ``reduction="mean"`` averages over
    counted tokens (0 when none), ``"sum"`` sums them, ``"none"`` gives the per-token NLL; a given
    ``num_items_in_batch`` (gradient accumulation) divides the sum instead::

        nll = -linear_logprobs(hidden, weight, labels, bias)
        loss = nll.sum() / (labels != ignore_index).sum()
    """
    opts = check_common(ignore_index=ignore_index, temperature=temperature, softcap=softcap, backend=backend,
                        reduction=reduction)
    num_items_in_batch = check_num_items(num_items_in_batch)
    V.check_head(hidden, weight, bias)
    labels = V.check_labels(labels, hidden, weight.shape[0], opts.ignore_index)
    logp = logprobs_rows(hidden, weight, labels, bias, opts.logprobs_options(), opts.backend).logp
    return reduce_tokens(-logp, labels != opts.ignore_index, reduction, num_items_in_batch)
