"""Public losses (docs/design.md §8): small formulas on the fused primitives, one module per family.

================================ =========================================================================
``dpo_loss``                     DPO and its variants by ``loss_type`` (TRL 1.16's ``DPOTrainer``)
``pmle_loss``                    preference maximum-likelihood estimation (arXiv 2506.01523, §4.1)
``preference_distillation_loss`` preference distillation (arXiv 2506.01523, §4.2)
``reverse_kl_loss``              reverse-KL minimisation: RLHF plus an entropy bonus (§4.3)
``policy_kl_loss``               the ``KL(π‖π₀)`` regulariser on policy samples
``simpo_loss``                   SimPO, reference-free
``cpo_loss``                     CPO (and its hinge / IPO / SimPO / AlphaPO forms) plus an NLL term
``orpo_loss``                    ORPO: NLL plus an odds-ratio term
``kto_loss``                     KTO, unpaired (and APO-zero unpaired)
``npo_loss``                     NPO, unlearning on a forget set
``nll_loss``                     plain NLL / SFT
``distill_loss``                 token-level distillation of a teacher head (forward / reverse KL, JSD)
================================ =========================================================================

Each has an ``nn.Module`` twin in :mod:`fastpref.modules` (``fastpref.DPOLoss``, ...).  The same
formulas on log-probs a trainer already has are in :mod:`fastpref.objectives`; the independent
fp64 oracle of every loss is :mod:`fastpref.reference.losses`.
"""

from __future__ import annotations

import importlib

from .distill import distill_loss
from .distribution import pmle_loss, policy_kl_loss, preference_distillation_loss, reverse_kl_loss
from .dpo import dpo_loss
from .reference_free import cpo_loss, orpo_loss, simpo_loss
from .sft import nll_loss
from .unpaired import kto_loss, npo_loss

__all__ = [
    "cpo_loss", "distill_loss", "dpo_loss", "kto_loss", "nll_loss", "npo_loss", "orpo_loss", "pmle_loss",
    "policy_kl_loss", "preference_distillation_loss", "reverse_kl_loss", "simpo_loss",
]

_TWINS = frozenset({
    "CPOLoss", "DPOLoss", "DistillLoss", "KTOLoss", "NLLLoss", "NPOLoss", "ORPOLoss", "PMLELoss", "PolicyKLLoss",
    "PreferenceDistillationLoss", "ReverseKLLoss", "SimPOLoss",
})


def __getattr__(name: str):
    # The module twins lived here before 0.2.0; they are defined in fastpref.modules now.
    if name in _TWINS:
        return getattr(importlib.import_module("fastpref.modules"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
