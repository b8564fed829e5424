"""Process-wide settings: the workspace budget of the chunked backends.

The budget bounds what one call holds beyond its inputs, outputs and O(N) row statistics: logits and
``dz`` tiles, and — when the whole logits of the call fit in three quarters of it — the logits kept
from the forward for the backward (``fastpref/backends/tiling.py``; docs/design.md has the cost
model).  Default 256 MiB; override with ``FASTPREF_WORKSPACE_MB`` or :func:`set_workspace_bytes`.
"""

from __future__ import annotations

import math
import os

_DEFAULT_WORKSPACE_MB = 256
_MIN_BYTES = 2**16


def _from_env() -> int:
    raw = os.environ.get("FASTPREF_WORKSPACE_MB")
    if raw is None:
        return _DEFAULT_WORKSPACE_MB * 2**20
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"FASTPREF_WORKSPACE_MB: expected a number of MiB, got {raw!r}") from None
    if not math.isfinite(mb) or mb * 2**20 < _MIN_BYTES:
        raise ValueError(f"FASTPREF_WORKSPACE_MB: expected a finite number of MiB >= 0.0625, got {raw!r}")
    return int(mb * 2**20)


_workspace_bytes: int = _from_env()
_keep_logits: bool = os.environ.get("FASTPREF_KEEP_LOGITS", "1") != "0"


def set_workspace_bytes(nbytes: int) -> None:
    """Bound the workspace of the chunked backends to ``nbytes`` (an int >= 65536) per call."""
    global _workspace_bytes
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < _MIN_BYTES:
        raise ValueError(f"nbytes: expected an int >= {_MIN_BYTES}, got {nbytes!r}")
    _workspace_bytes = nbytes


def get_workspace_bytes() -> int:
    """The workspace budget per call, in bytes (``FASTPREF_WORKSPACE_MB`` or :func:`set_workspace_bytes`)."""
    return _workspace_bytes


def set_keep_logits(enabled: bool) -> None:
    """Let a forward keep the whole logits for its backward when they fit the budget (default on;
    ``FASTPREF_KEEP_LOGITS=0`` turns it off): off, every backward recomputes its tiles."""
    global _keep_logits
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
    _keep_logits = enabled


def get_keep_logits() -> bool:
    """Whether forwards may keep their logits for the backward (:func:`set_keep_logits`)."""
    return _keep_logits
