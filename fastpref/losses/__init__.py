"""Public losses (docs/design.md §8; their table is in the README's "Use" section): small formulas on
the fused primitives, each with an ``nn.Module`` twin whose constructor takes the same keyword options
(same defaults)."""

from __future__ import annotations

import inspect

from torch import nn

from .distill import distill_loss
from .distribution import pmle_loss, policy_kl_loss, preference_distillation_loss, reverse_kl_loss
from .dpo import dpo_loss
from .reference_free import cpo_loss, orpo_loss, simpo_loss
from .sft import nll_loss
from .unpaired import kto_loss, npo_loss


def _module_twin(fn, name: str):
    """``nn.Module`` whose ``__init__`` takes ``fn``'s keyword-only options and whose ``forward``
    takes its positional tensors (and any per-batch keyword tensors)."""
    keyword_only = {p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}

    def __init__(self, **options):
        nn.Module.__init__(self)
        unknown = set(options) - keyword_only
        if unknown:
            raise TypeError(f"{name}: unexpected option(s) {sorted(unknown)}; expected some of {sorted(keyword_only)}")
        self.options = options

    def forward(self, *args, **kwargs):
        return fn(*args, **{**self.options, **kwargs})

    def extra_repr(self):
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())

    doc = f"Module twin of :func:`fastpref.{fn.__name__}`: options at construction, tensors at call.\n\n"
    return type(name, (nn.Module,), {"__init__": __init__, "forward": forward, "extra_repr": extra_repr,
                                      "__doc__": doc + (fn.__doc__ or ""), "__module__": __name__})


DPOLoss = _module_twin(dpo_loss, "DPOLoss")
PMLELoss = _module_twin(pmle_loss, "PMLELoss")
PreferenceDistillationLoss = _module_twin(preference_distillation_loss, "PreferenceDistillationLoss")
ReverseKLLoss = _module_twin(reverse_kl_loss, "ReverseKLLoss")
PolicyKLLoss = _module_twin(policy_kl_loss, "PolicyKLLoss")
SimPOLoss = _module_twin(simpo_loss, "SimPOLoss")
CPOLoss = _module_twin(cpo_loss, "CPOLoss")
ORPOLoss = _module_twin(orpo_loss, "ORPOLoss")
KTOLoss = _module_twin(kto_loss, "KTOLoss")
NPOLoss = _module_twin(npo_loss, "NPOLoss")
NLLLoss = _module_twin(nll_loss, "NLLLoss")
DistillLoss = _module_twin(distill_loss, "DistillLoss")

__all__ = [
    "CPOLoss", "DPOLoss", "DistillLoss", "KTOLoss", "NLLLoss", "NPOLoss", "ORPOLoss", "PMLELoss", "PolicyKLLoss",
    "PreferenceDistillationLoss", "ReverseKLLoss", "SimPOLoss", "cpo_loss", "distill_loss", "dpo_loss", "kto_loss",
    "nll_loss", "npo_loss", "orpo_loss", "pmle_loss", "policy_kl_loss", "preference_distillation_loss",
    "reverse_kl_loss", "simpo_loss",
]
