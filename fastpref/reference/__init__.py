"""The reference oracle: logits materialised, fp64-capable, independent of the fast paths.

Tests and benchmarks compare every backend against it.
"""

from .primitives import linear_divergence, linear_logprobs, materialize_logits, sequence_logprobs

__all__ = ["linear_divergence", "linear_logprobs", "materialize_logits", "sequence_logprobs"]
