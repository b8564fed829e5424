"""fastpref: fused preference-alignment and distillation losses that never materialise logits."""

from ._config import get_workspace_bytes, set_workspace_bytes
from .backends import available_backends
from .primitives import (
    LinearDivergence,
    LinearLogprobs,
    linear_divergence,
    linear_logprobs,
    sequence_logprobs,
)

__version__ = "0.1.0"

__all__ = [
    "LinearDivergence",
    "LinearLogprobs",
    "available_backends",
    "get_workspace_bytes",
    "linear_divergence",
    "linear_logprobs",
    "sequence_logprobs",
    "set_workspace_bytes",
]
