"""The reference oracle: logits materialised, fp64-capable, independent of the fast paths.

``fastpref.reference.linear_logprobs`` / ``linear_divergence`` for the primitives,
``fastpref.reference.losses.<name>`` for every loss.  Tests and benchmarks compare against it.
"""

from . import losses
from .primitives import linear_divergence, linear_logprobs, materialize_logits, sequence_logprobs

__all__ = ["linear_divergence", "linear_logprobs", "losses", "materialize_logits", "sequence_logprobs"]
