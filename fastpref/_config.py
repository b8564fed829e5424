"""Process-wide settings: the torch backend's workspace budget and label checks.

The chunked torch backend never holds more than ``workspace_bytes`` of logits tiles
at once (a few fp32 ``[rows x vocab]`` tiles live together, so a tile gets a quarter
of the budget).  Override with ``FASTPREF_WORKSPACE_MB`` or :func:`set_workspace_bytes`.
"""

from __future__ import annotations

import os

_DEFAULT_WORKSPACE_MB = 256
_workspace_bytes: int = int(float(os.environ.get("FASTPREF_WORKSPACE_MB", _DEFAULT_WORKSPACE_MB)) * 2**20)


def set_workspace_bytes(nbytes: int) -> None:
    """Bound the logits workspace of the chunked backends to ``nbytes`` (>= 64 KiB)."""
    global _workspace_bytes
    if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 2**16:
        raise ValueError(f"workspace_bytes: expected an int >= 65536, got {nbytes!r}")
    _workspace_bytes = nbytes


def get_workspace_bytes() -> int:
    return _workspace_bytes
