"""Autograd layer: one ``torch.autograd.Function`` per primitive, backend-agnostic."""

from .linear_divergence import LinearDivergenceFunction
from .linear_logprobs import LinearLogprobsFunction

__all__ = ["LinearDivergenceFunction", "LinearLogprobsFunction"]
