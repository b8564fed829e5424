"""Registers the chunked torch backend (``torch_backend.py``) as ``fastpref::*_torch`` ops."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch

from . import torch_backend
from ._register import register_backend_ops


def unavailable_reason(device: torch.device) -> Optional[str]:
    return None  # runs wherever PyTorch runs


register_backend_ops(
    "torch",
    SimpleNamespace(
        logprobs_fwd=torch_backend.logprobs_fwd,
        logprobs_bwd=torch_backend.logprobs_bwd,
        divergence_fwd=torch_backend.divergence_fwd,
        divergence_bwd=torch_backend.divergence_bwd,
    ),
)
