"""``nn.Module`` twins of fastpref's public functions: options at construction, tensors at call.

Each twin is made from its function (:func:`module_twin`), so it cannot drift from it: the
constructor takes the function's options — the same names and defaults, keyword-only — and
``forward`` takes the function's tensors (its positional arguments, then the per-batch keyword
tensors such as ``ref_chosen_logps``, ``rewards``, ``desirable`` or ``num_items_in_batch``) and
returns exactly what the function returns::

    loss_fn = fastpref.DPOLoss(beta=0.1, loss_type="ipo")
    loss = loss_fn(hidden, weight, labels, ref_chosen_logps=rc, ref_rejected_logps=rr)
    # == fastpref.dpo_loss(hidden, weight, labels, ref_chosen_logps=rc, ref_rejected_logps=rr,
    #                      beta=0.1, loss_type="ipo")

``inspect.signature(fastpref.DPOLoss)`` lists the options and
``inspect.signature(fastpref.DPOLoss.forward)`` the tensors.  The twins are also attributes of
:mod:`fastpref` (``fastpref.DPOLoss``); they are listed in this module's ``__all__`` rather than the
package's, so that ``help(fastpref)`` is not filled with the methods every ``nn.Module`` inherits.
"""

from __future__ import annotations

import inspect
import textwrap
from typing import Callable

from torch import nn

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
from .primitives import linear_divergence, linear_logprobs, sequence_logprobs

__all__ = [
    "CPOLoss", "DPOLoss", "DistillLoss", "KTOLoss", "LinearDivergence", "LinearLogprobs", "NLLLoss", "NPOLoss",
    "ORPOLoss", "PMLELoss", "PolicyKLLoss", "PreferenceDistillationLoss", "ReverseKLLoss", "SequenceLogprobs",
    "SimPOLoss", "module_twin",
]

# Keyword-only arguments that change from batch to batch although they are not tensors.
_PER_CALL = frozenset({"num_items_in_batch"})


def _is_call_argument(p: inspect.Parameter) -> bool:
    """Positional arguments, keyword-only tensors and per-call values go to ``forward``; the other
    keyword-only arguments are the module's options.  (Annotations may be strings.)"""
    return p.kind is not p.KEYWORD_ONLY or p.name in _PER_CALL or "Tensor" in str(p.annotation)


def _summary(fn: Callable) -> str:
    """The first paragraph of ``fn``'s docstring, on one line."""
    doc = inspect.cleandoc(fn.__doc__ or "")
    return " ".join(doc.split("\n\n", 1)[0].split())


def _fill(text: str) -> str:
    return textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False)


def module_twin(fn: Callable, name: str, module: str = __name__) -> type:
    """Make the ``nn.Module`` twin of the public function ``fn``.

    ``fn``'s keyword-only arguments that are not tensors (nor ``num_items_in_batch``) become the
    constructor's keyword-only options, with ``fn``'s defaults (an option without a default must be
    given); the others become ``forward``'s arguments, in ``fn``'s order.  ``forward`` calls ``fn``
    with its arguments and the options given at construction, so the twin returns exactly what the
    function returns.  The class gets real signatures (``__signature__``) and a docstring that starts
    with what ``fn`` computes.
    """
    fn_sig = inspect.signature(fn)
    call_params = [p for p in fn_sig.parameters.values() if _is_call_argument(p)]
    option_params = [p for p in fn_sig.parameters.values() if not _is_call_argument(p)]
    option_names = frozenset(p.name for p in option_params)
    required = tuple(p.name for p in option_params if p.default is p.empty)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    qualified = f"fastpref.{fn.__name__}"

    def __init__(self, *args, **options):
        if args:
            raise TypeError(f"{name}: options are keyword-only, got {len(args)} positional argument(s)")
        unknown = sorted(set(options) - option_names)
        if unknown:
            raise TypeError(f"{name}: unexpected option(s) {unknown}; expected some of {sorted(option_names)}")
        missing = [n for n in required if n not in options]
        if missing:
            raise TypeError(f"{name}: missing required option(s) {missing}")
        nn.Module.__init__(self)
        self.options = options

    def forward(self, *args, **kwargs):
        # An option given here overrides the constructor's for this call (as in fastpref 0.1).
        return fn(*args, **{**self.options, **kwargs})

    def extra_repr(self) -> str:
        """The options given at construction."""
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())

    __init__.__signature__ = inspect.Signature([self_param, *option_params])
    __init__.__doc__ = _fill(f"Fix the options of :func:`{qualified}` (keyword-only, same names and defaults): "
                             f"{', '.join(p.name for p in option_params) or 'none'}.")
    forward.__signature__ = inspect.Signature([self_param, *call_params],
                                              return_annotation=fn_sig.return_annotation)
    forward.__doc__ = _fill(f"``{qualified}({', '.join(p.name for p in call_params)}, **options)`` with the options "
                            f"given at construction (an option passed here by keyword overrides its value for this "
                            f"call); returns what the function returns.")
    for method in (__init__, forward, extra_repr):
        method.__qualname__ = f"{name}.{method.__name__}"
        method.__module__ = module

    plain = [p.replace(annotation=p.empty) for p in call_params]
    doc = "\n\n".join([
        _fill(f"``nn.Module`` twin of :func:`{qualified}`: {_summary(fn)}"),
        _fill(f"``{name}(**options)(*tensors)`` is ``{fn.__name__}(*tensors, **options)``.  The options "
              f"({', '.join(p.name for p in option_params) or 'none'}) are given at construction, with the "
              f"function's names and defaults; the tensors at each call (an option passed to ``forward`` by keyword "
              f"overrides its value for that call)::"),
        f"    forward{inspect.Signature(plain)}",
        _fill(f"The documentation of :func:`{qualified}` follows; :mod:`fastpref.modules` says how the twins "
              f"are made."),
        "-" * 72,
        inspect.cleandoc(fn.__doc__ or ""),
    ])
    return type(name, (nn.Module,), {
        "__init__": __init__, "forward": forward, "extra_repr": extra_repr, "__doc__": doc, "__module__": module,
        "__qualname__": name, "function": staticmethod(fn),  # the function it twins
    })


LinearLogprobs = module_twin(linear_logprobs, "LinearLogprobs")
SequenceLogprobs = module_twin(sequence_logprobs, "SequenceLogprobs")
LinearDivergence = module_twin(linear_divergence, "LinearDivergence")
DPOLoss = module_twin(dpo_loss, "DPOLoss")
PMLELoss = module_twin(pmle_loss, "PMLELoss")
PreferenceDistillationLoss = module_twin(preference_distillation_loss, "PreferenceDistillationLoss")
ReverseKLLoss = module_twin(reverse_kl_loss, "ReverseKLLoss")
PolicyKLLoss = module_twin(policy_kl_loss, "PolicyKLLoss")
SimPOLoss = module_twin(simpo_loss, "SimPOLoss")
CPOLoss = module_twin(cpo_loss, "CPOLoss")
ORPOLoss = module_twin(orpo_loss, "ORPOLoss")
KTOLoss = module_twin(kto_loss, "KTOLoss")
NPOLoss = module_twin(npo_loss, "NPOLoss")
NLLLoss = module_twin(nll_loss, "NLLLoss")
DistillLoss = module_twin(distill_loss, "DistillLoss")
