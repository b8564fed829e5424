"""TRL 1.16's fused LM head and distillation divergence, computed by fastpref.

TRL 1.16 never builds the ``[tokens x vocab]`` logits in its DPO, KTO, GRPO, RLOO and SFT
trainers: ``trl.trainer.utils.add_fused_lm_head`` makes ``model(..., fused_lm_head=True)`` run the
backbone and hand the last hidden states and the output-embedding weight to
``ChunkedLogProbFunction.apply``; its ``DistillationTrainer`` hands both models' hidden states and
heads to ``ChunkedDivergenceFunction.apply``.  :func:`enable` puts fastpref behind those two
names, at every place TRL bound them::

    import fastpref.integrations.trl as fp_trl
    fp_trl.enable()                    # from here on, TRL's trainers run their heads on fastpref
    trainer = DPOTrainer(...); trainer.train()
    fp_trl.disable()                   # TRL's own kernels again

    with fp_trl.enabled(backend="torch"):   # or scoped
        trainer.train()

Only the head computation moves.  Everything around it stays TRL's own code: which positions are
scored and the masking of the others, the DTensor (FSDP2) gather of the head, the DeepSpeed
ZeRO-3 gather, PEFT adapters and the reference model, ``num_items_in_batch``, the loss formulas
and every metric.  The drop-ins keep TRL's contract:

- ``ChunkedLogProbFunction.apply(hidden, weight, bias, targets, temperature, chunk_size,
  final_logit_softcapping=None, logit_scale=1.0, outputs=...)`` returns ``(log_probs, entropy,
  log_sum_sq_probs, mean_logits, is_top1)``, each extra ``None`` unless named in ``outputs``;
  ``log_probs`` and ``entropy`` take gradients, the other three are non-differentiable.
- ``ChunkedDivergenceFunction.apply(student_hidden, student_weight, student_bias, teacher_hidden,
  teacher_weight, teacher_bias, beta, temperature=1.0, student_logit_scale=1.0,
  student_final_logit_softcapping=None, teacher_logit_scale=1.0,
  teacher_final_logit_softcapping=None)`` returns ``(divergence, student_entropy)``; ``beta=0`` is
  KL(teacher || student), ``beta=1`` KL(student || teacher), in between the generalized JSD with
  mixture ``beta * p_teacher + (1 - beta) * p_student``.  Gradients reach the student only.
- Logits are ``z = softcap * tanh(((h @ W.T + b) * logit_scale) / softcap) / temperature``, as in
  TRL and Hugging Face models, via fastpref's ``logit_scale`` / ``softcap`` / ``temperature``.
- Autocast: like TRL, the head runs in the autocast dtype when autocast is on (the hidden states,
  weight and bias are cast to it), else in the hidden states' dtype; outputs are float32.
- ``chunk_size`` (TRL's vocabulary tile width) is accepted and not used: fastpref tiles within its
  own workspace budget (``FASTPREF_WORKSPACE_MB`` / :func:`fastpref.set_workspace_bytes`).
- Under DeepSpeed ZeRO-3 the head is only whole inside TRL's gather context, so the drop-ins run
  forward without building a graph and recompute the head inside the gather during backward,
  exactly where TRL's own backward re-gathers it.

A value fastpref cannot serve raises a ``ValueError`` naming the TRL option it came from (e.g. an
unknown name in ``outputs``, a non-positive ``final_logit_softcapping``).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import sys
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch

import fastpref

__all__ = [
    "ChunkedDivergenceFunction",
    "ChunkedLogProbFunction",
    "MIN_TRL_VERSION",
    "disable",
    "enable",
    "enabled",
    "is_enabled",
]

MIN_TRL_VERSION = (1, 16)
# Per-token fields of TRL's fused head besides the log-probs (TRL's OPTIONAL_OUTPUTS).
TRL_OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
_BACKENDS = ("auto", "torch", "triton", "cuda")

# Where TRL 1.16 binds the two functions by name: (module, attribute).  The defining modules come
# first; enable() also sweeps every loaded ``trl.*`` module for other bindings of the originals.
_LOGPROB_SITES = (
    ("trl.kernels.chunked_logprob", "ChunkedLogProbFunction"),
    ("trl.kernels", "ChunkedLogProbFunction"),
    ("trl.trainer.utils", "_ChunkedLogProbFunction"),
)
_DIVERGENCE_SITES = (
    ("trl.kernels.chunked_divergence", "ChunkedDivergenceFunction"),
    ("trl.trainer.distillation_trainer", "ChunkedDivergenceFunction"),
)

_state = {"backend": None, "patched": []}  # patched: [(module, attribute, original)]


# --------------------------------------------------------------------------- helpers


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """TRL's rule: the autocast dtype when autocast is on for the device, else the hidden states'."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _no_autocast(device_type: str):
    return torch.autocast(device_type, enabled=False)


def _backend() -> str:
    return _state["backend"] or "auto"


def _check_outputs(outputs: Sequence[str]) -> Tuple[str, ...]:
    if isinstance(outputs, str):
        outputs = (outputs,)
    extras = []
    for name in outputs:
        if name == "log_probs":  # always computed; TRL's trainers list it
            continue
        if name not in TRL_OPTIONAL_OUTPUTS:
            raise ValueError(
                f"outputs: fastpref serves 'log_probs' and {list(TRL_OPTIONAL_OUTPUTS)}, got {name!r} "
                f"(in the `outputs` of trl.trainer.utils.add_fused_lm_head)"
            )
        if name not in extras:
            extras.append(name)
    return tuple(extras)


def _check_transform(temperature, softcap, logit_scale, *, softcap_name, scale_name) -> None:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature: fastpref needs a finite temperature > 0 (TRL's `temperature`), got {temperature!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap <= 0):
        raise ValueError(
            f"{softcap_name}: fastpref needs a finite softcap > 0 or None (the model config's "
            f"`final_logit_softcapping`), got {softcap!r}"
        )
    if not isinstance(logit_scale, (int, float)) or not math.isfinite(logit_scale):
        raise ValueError(
            f"{scale_name}: fastpref needs a finite logit scale (the model config's `logit_scale` / "
            f"`output_multiplier` / `lm_head_multiplier` / `logits_scaling`), got {logit_scale!r}"
        )


def _zero3_enabled() -> bool:
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except Exception:  # transformers without the deepspeed integration module
        return False
    return bool(is_deepspeed_zero3_enabled())


def _gather_ctx(*params: Optional[torch.Tensor]):
    """TRL's own ZeRO-3 gather of the head parameters (a null context without ZeRO-3)."""
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    return maybe_gather_lm_head_ctx(*params)


class _RecomputeUnderGather(torch.autograd.Function):
    """Run ``fn(*tensors)`` without a graph; in backward, gather the head and recompute with one.

    Used under DeepSpeed ZeRO-3, where the head weight is whole only inside TRL's gather context:
    the saved weight is the partitioned parameter itself, gathered again for the backward, as TRL's
    own autograd functions do.  ``n_diff`` leading outputs are differentiable; ``gather_params``
    are the parameters to gather.
    """

    @staticmethod
    def forward(ctx, fn: Callable, n_diff: int, gather_params: tuple, *tensors):
        ctx.fn, ctx.n_diff, ctx.gather_params = fn, n_diff, gather_params
        ctx.save_for_backward(*tensors)
        with _gather_ctx(*gather_params):
            outs = fn(*tensors)
        ctx.mark_non_differentiable(*(o for o in outs[n_diff:] if o is not None))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        tensors = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]
        with torch.enable_grad(), _gather_ctx(*ctx.gather_params):
            leaves = [
                t.detach().requires_grad_(bool(need)) if t is not None and t.is_floating_point() else t
                for t, need in zip(tensors, needs)
            ]
            outs = ctx.fn(*leaves)
            pairs = [
                (o, g) for o, g in zip(outs[: ctx.n_diff], grads[: ctx.n_diff])
                if o is not None and g is not None and o.requires_grad
            ]
            wrt = [leaf for leaf, need in zip(leaves, needs) if need]
            got = iter(
                torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                if pairs and wrt
                else [None] * len(wrt)
            )
            result = [next(got) if need else None for need in needs]
        return (None, None, None, *result)


# --------------------------------------------------------------------------- log-probs


def _logprobs(hidden, weight, bias, targets, *, extras, temperature, softcap, logit_scale, backend):
    """fastpref.linear_logprobs, as TRL's 5-tuple."""
    kw = dict(temperature=temperature, softcap=softcap, backend=backend)
    if logit_scale != 1.0:
        kw["logit_scale"] = logit_scale
    if not extras:
        return fastpref.linear_logprobs(hidden, weight, targets, bias, **kw), None, None, None, None
    if extras == ("entropy",):
        logp, entropy = fastpref.linear_logprobs(hidden, weight, targets, bias, return_entropy=True, **kw)
        return logp, entropy, None, None, None
    out = fastpref.linear_logprobs(hidden, weight, targets, bias, outputs=extras, **kw)
    return out.logp, out.entropy, out.log_sum_sq_probs, out.mean_logits, out.is_top1


class ChunkedLogProbFunction:
    """Drop-in for ``trl.kernels.chunked_logprob.ChunkedLogProbFunction`` built on
    :func:`fastpref.linear_logprobs` (see the module docstring for the contract)."""

    @staticmethod
    def apply(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: Optional[float] = None,
        logit_scale: float = 1.0,
        outputs: Sequence[str] = TRL_OPTIONAL_OUTPUTS,
    ):
        extras = _check_outputs(outputs)
        _check_transform(temperature, final_logit_softcapping, logit_scale,
                         softcap_name="final_logit_softcapping", scale_name="logit_scale")
        dtype = _compute_dtype(hidden)
        opts = dict(extras=extras, temperature=float(temperature), softcap=final_logit_softcapping,
                    logit_scale=float(logit_scale), backend=_backend())

        def run(h_, w_, b_, y_):
            # In the compute dtype, outside autocast; autograd casts the gradients back.
            with _no_autocast(h_.device.type):
                return _logprobs(_cast(h_, dtype), _cast(w_, dtype), _cast(b_, dtype), y_, **opts)

        if _zero3_enabled():
            # log_probs and entropy are differentiable; the saved weight is the parameter itself
            return _RecomputeUnderGather.apply(run, 2, (weight, bias), hidden, weight, bias, targets)
        return run(hidden, weight, bias, targets)


# --------------------------------------------------------------------------- divergence


def _divergence_kind(beta) -> Tuple[str, float]:
    if not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta: TRL's generalized JSD needs 0 <= beta <= 1 (DistillationConfig.beta), got {beta!r}")
    if beta == 0.0:
        return "forward_kl", 0.5
    if beta == 1.0:
        return "reverse_kl", 0.5
    return "jsd", float(beta)


class ChunkedDivergenceFunction:
    """Drop-in for ``trl.kernels.chunked_divergence.ChunkedDivergenceFunction`` built on
    :func:`fastpref.linear_divergence` (see the module docstring for the contract)."""

    @staticmethod
    def apply(
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        student_bias: Optional[torch.Tensor],
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        teacher_bias: Optional[torch.Tensor],
        beta: float,
        temperature: float = 1.0,
        student_logit_scale: float = 1.0,
        student_final_logit_softcapping: Optional[float] = None,
        teacher_logit_scale: float = 1.0,
        teacher_final_logit_softcapping: Optional[float] = None,
    ):
        kind, jsd_beta = _divergence_kind(beta)
        _check_transform(temperature, student_final_logit_softcapping, student_logit_scale,
                         softcap_name="student_final_logit_softcapping", scale_name="student_logit_scale")
        _check_transform(temperature, teacher_final_logit_softcapping, teacher_logit_scale,
                         softcap_name="teacher_final_logit_softcapping", scale_name="teacher_logit_scale")
        s_dtype, t_dtype = _compute_dtype(student_hidden), _compute_dtype(teacher_hidden)
        kw = dict(kind=kind, beta=jsd_beta, temperature=float(temperature), student_softcap=student_final_logit_softcapping,
                  teacher_softcap=teacher_final_logit_softcapping, return_entropy=True, backend=_backend())
        if student_logit_scale != 1.0:
            kw["student_logit_scale"] = float(student_logit_scale)
        if teacher_logit_scale != 1.0:
            kw["teacher_logit_scale"] = float(teacher_logit_scale)

        def run(hs, ws, bs, ht, wt, bt):
            with _no_autocast(hs.device.type):
                hs, ws, bs = _cast(hs, s_dtype), _cast(ws, s_dtype), _cast(bs, s_dtype)
                # TRL's teacher is a constant: no graph reaches its side.
                ht, wt = _cast(ht.detach(), t_dtype), _cast(wt.detach(), t_dtype)
                bt = None if bt is None else _cast(bt.detach(), t_dtype)
                div, entropy = fastpref.linear_divergence(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, **kw)
            return div, entropy.detach()

        tensors = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias)
        gather = (student_weight, student_bias, teacher_weight, teacher_bias)
        if _zero3_enabled():
            return _RecomputeUnderGather.apply(run, 1, gather, *tensors)
        with _gather_ctx(*gather):  # TRL's own forward gathers both heads (a no-op without ZeRO-3)
            return run(*tensors)


# --------------------------------------------------------------------------- enable / disable


def _trl_version() -> Tuple[int, ...]:
    import trl

    parts = []
    for piece in str(trl.__version__).split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _sites() -> List[Tuple[object, str, object, object]]:
    """(module, attribute, original, replacement) for every place TRL bound the two functions."""
    try:
        version = _trl_version()
    except ImportError as exc:
        raise ImportError("fastpref.integrations.trl needs TRL (pip install 'fastpref[trl]')") from exc
    if version < MIN_TRL_VERSION:
        raise ImportError(
            f"fastpref.integrations.trl needs trl >= {'.'.join(map(str, MIN_TRL_VERSION))} "
            f"(its fused LM head); found trl {'.'.join(map(str, version))}"
        )
    found = []
    originals = {}
    for sites, replacement in ((_LOGPROB_SITES, ChunkedLogProbFunction), (_DIVERGENCE_SITES, ChunkedDivergenceFunction)):
        for mod_name, attr in sites:
            module = importlib.import_module(mod_name)
            original = getattr(module, attr, None)
            if original is None:
                raise ImportError(f"fastpref.integrations.trl: {mod_name}.{attr} not found in this TRL version")
            if original is replacement:  # already enabled
                continue
            originals[id(original)] = replacement
            found.append((module, attr, original, replacement))
    # Any other trl module that imported the originals under some name (e.g. experimental trainers).
    seen = {(id(m), a) for m, a, _, _ in found}
    for name, module in list(sys.modules.items()):
        if not (name == "trl" or name.startswith("trl.")) or module is None:
            continue
        for attr, value in list(getattr(module, "__dict__", {}).items()):
            if id(value) in originals and (id(module), attr) not in seen:
                found.append((module, attr, value, originals[id(value)]))
                seen.add((id(module), attr))
    return found


def enable(*, backend: str = "auto") -> None:
    """From now on, TRL 1.16's fused LM head and distillation divergence run on fastpref.

    Affects every TRL trainer that computes them (DPO, KTO, GRPO, RLOO, SFT, Distillation and
    TRL's experimental trainers that use the same functions), whether created before or after
    this call, policy and reference model alike.  Idempotent; calling it again changes the
    ``backend`` (``"auto" | "torch" | "triton" | "cuda"``, as in :func:`fastpref.linear_logprobs`).
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend: expected one of {list(_BACKENDS)}, got {backend!r}")
    sites = _sites()
    for module, attr, original, replacement in sites:
        setattr(module, attr, replacement)
        _state["patched"].append((module, attr, original))
    _state["backend"] = backend


def disable() -> None:
    """Undo :func:`enable`: TRL's own functions are back wherever they were replaced, including in TRL modules
    imported while it was in effect."""
    originals = {}
    for module, attr, original in reversed(_state["patched"]):
        originals[id(getattr(module, attr))] = original
        setattr(module, attr, original)
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "trl" or name.startswith("trl.")):
            continue
        for attr, value in list(getattr(module, "__dict__", {}).items()):
            if id(value) in originals:
                setattr(module, attr, originals[id(value)])
    _state["patched"] = []
    _state["backend"] = None


def is_enabled() -> bool:
    """Whether :func:`enable` is in effect."""
    return _state["backend"] is not None


@contextlib.contextmanager
def enabled(*, backend: str = "auto") -> Iterator[None]:
    """``with enabled(): ...`` — :func:`enable` for the block, then the previous state again."""
    previous = _state["backend"]
    enable(backend=backend)
    try:
        yield
    finally:
        if previous is None:
            disable()
        else:
            _state["backend"] = previous
