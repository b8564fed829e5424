"""Triton backend: not implemented yet (issue: Triton backend).  Reports why it cannot run."""

from __future__ import annotations

from typing import Optional

import torch


def unavailable_reason(device: torch.device) -> Optional[str]:
    return "the Triton kernels are not implemented yet"
