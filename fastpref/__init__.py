"""fastpref: fused preference-alignment and distillation losses that never materialise the logits.

The last hidden states and an LM head ``(weight, bias)`` go in; per-token log-probs, per-row
divergences or a loss come out, computed tile by tile within a bounded workspace, forward and
backward, on the ``"torch"``, ``"triton"`` or ``"cuda"`` backend (``backend="auto"`` picks one)::

    import fastpref as fp
    loss = fp.dpo_loss(hidden, weight, labels, ref_chosen_logps=rc, ref_rejected_logps=rr, beta=0.1)
    loss = fp.pmle_loss(hidden, weight, labels, gamma=0.01)
    logp = fp.linear_logprobs(hidden, weight, labels)        # (..., D) -> (...), no [N x V] logits

Primitives     linear_logprobs, sequence_logprobs, linear_divergence; LogprobsOutput
Losses         dpo_loss, simpo_loss, cpo_loss, orpo_loss, kto_loss, npo_loss, nll_loss, pmle_loss,
               preference_distillation_loss, reverse_kl_loss, policy_kl_loss, distill_loss
Module twins   DPOLoss, SimPOLoss, CPOLoss, ORPOLoss, KTOLoss, NPOLoss, NLLLoss, PMLELoss,
               PreferenceDistillationLoss, ReverseKLLoss, PolicyKLLoss, DistillLoss, LinearLogprobs,
               SequenceLogprobs, LinearDivergence: ``nn.Module``s, options at construction, tensors
               at call (documented in fastpref.modules; e.g. ``help(fastpref.DPOLoss)``)
Objectives     fastpref.objectives: the loss formulas on log-probs a trainer already has
Settings       set_workspace_bytes / get_workspace_bytes (FASTPREF_WORKSPACE_MB),
               set_keep_logits / get_keep_logits (FASTPREF_KEEP_LOGITS), available_backends
               (FASTPREF_BACKEND overrides ``backend="auto"``)
Reference      fastpref.reference: the fp64 oracle that materialises the logits
Integrations   fastpref.integrations.trl: TRL 1.16's trainers run their fused LM head on fastpref;
               fastpref.integrations.trl_trainers: DistributionDPOTrainer, ReverseKLTrainer
Distributed    vocabulary-parallel heads (a DTensor head, or ``process_group=``): fastpref.distributed

The design (layers, the backend contract, the cost model) is in docs/design.md; the README has the
usage, and CHANGELOG.md what changed between versions.
"""

import importlib as _importlib

from . import distributed, objectives
from ._config import get_keep_logits, get_workspace_bytes, set_keep_logits, set_workspace_bytes
from ._version import __version__ as __version__
from .backends import available_backends
from .losses import (
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
from .modules import CPOLoss as CPOLoss
from .modules import DistillLoss as DistillLoss
from .modules import DPOLoss as DPOLoss
from .modules import KTOLoss as KTOLoss
from .modules import LinearDivergence as LinearDivergence
from .modules import LinearLogprobs as LinearLogprobs
from .modules import NLLLoss as NLLLoss
from .modules import NPOLoss as NPOLoss
from .modules import ORPOLoss as ORPOLoss
from .modules import PMLELoss as PMLELoss
from .modules import PolicyKLLoss as PolicyKLLoss
from .modules import PreferenceDistillationLoss as PreferenceDistillationLoss
from .modules import ReverseKLLoss as ReverseKLLoss
from .modules import SequenceLogprobs as SequenceLogprobs
from .modules import SimPOLoss as SimPOLoss
from .primitives import LogprobsOutput, linear_divergence, linear_logprobs, sequence_logprobs

# The module twins (DPOLoss, ...) are public too (imported `X as X` above, the explicit re-export form
# of typed packages), but listed in fastpref.modules.__all__ rather than here: pydoc documents every class
# in __all__ with all the methods it inherits from nn.Module, which made help(fastpref) 15,000 lines.
__all__ = [
    # primitives
    "LogprobsOutput", "linear_divergence", "linear_logprobs", "sequence_logprobs",
    # losses
    "cpo_loss", "distill_loss", "dpo_loss", "kto_loss", "nll_loss", "npo_loss", "orpo_loss", "pmle_loss",
    "policy_kl_loss", "preference_distillation_loss", "reverse_kl_loss", "simpo_loss",
    # settings
    "available_backends", "get_keep_logits", "get_workspace_bytes", "set_keep_logits", "set_workspace_bytes",
    # submodules
    "distributed", "integrations", "modules", "objectives", "reference",
]

# Submodules imported on first use (``fastpref.reference.losses`` works right after ``import fastpref``)
# so that ``import fastpref`` stays light; fastpref.integrations imports nothing until asked.
_LAZY_SUBMODULES = ("integrations", "reference")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
