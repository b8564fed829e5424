"""fastpref: fused preference-alignment and distillation losses that never materialise logits."""

from . import objectives
from ._config import get_keep_logits, get_workspace_bytes, set_keep_logits, set_workspace_bytes
from .backends import available_backends
from .losses import (
    CPOLoss,
    DistillLoss,
    DPOLoss,
    KTOLoss,
    NLLLoss,
    NPOLoss,
    ORPOLoss,
    PMLELoss,
    PolicyKLLoss,
    PreferenceDistillationLoss,
    ReverseKLLoss,
    SimPOLoss,
    cpo_loss,
    distill_loss,
    dpo_loss,
    kto_loss,
    nll_loss,
    npo_loss,
    orpo_loss,
    pmle_loss,
    policy_kl_loss,
    preference_distillation_loss,
    reverse_kl_loss,
    simpo_loss,
)
from .primitives import (
    LinearDivergence,
    LinearLogprobs,
    LogprobsOutput,
    linear_divergence,
    linear_logprobs,
    sequence_logprobs,
)

from ._version import __version__

__all__ = [
    "CPOLoss", "DPOLoss", "DistillLoss", "KTOLoss", "NLLLoss", "NPOLoss", "ORPOLoss", "PMLELoss", "PolicyKLLoss",
    "PreferenceDistillationLoss", "ReverseKLLoss", "SimPOLoss", "cpo_loss", "distill_loss", "dpo_loss", "kto_loss",
    "nll_loss", "npo_loss", "objectives", "orpo_loss", "pmle_loss", "policy_kl_loss", "preference_distillation_loss",
    "reverse_kl_loss", "simpo_loss",
    "LinearDivergence",
    "LinearLogprobs",
    "LogprobsOutput",
    "available_backends",
    "get_keep_logits",
    "get_workspace_bytes",
    "linear_divergence",
    "linear_logprobs",
    "sequence_logprobs",
    "set_keep_logits",
    "set_workspace_bytes",
]
