"""CUDA C++ backend: not implemented yet (issue: CUDA backend).  Reports why it cannot run."""

from __future__ import annotations

from typing import Optional

import torch


def unavailable_reason(device: torch.device) -> Optional[str]:
    return "the CUDA extension is not implemented yet"
