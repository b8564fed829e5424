"""Workloads x providers: the same seeded inputs, the same forward+backward, per provider.

Every (workload, provider) pair is a function of the workload's input tensors that
returns a scalar loss; the benchmark step calls it, then ``loss.backward()``, so each
provider does the same useful work: the loss, and the gradients w.r.t. the policy /
student ``hidden`` and ``weight`` (the reference / teacher side is frozen everywhere).

Providers:

- ``floor``: the GEMM floor, only the plain matrix products a fused forward+backward of the
  workload cannot avoid, in the input dtype, nothing else (:data:`FLOOR_GEMMS`): ``logprobs`` and
  ``pref_distill`` 3 GEMMs, 6NDV FLOPs (``z = h W^T``, ``d h = dz W``, ``d W = dz^T h`` with a
  random ``dz``); ``dpo`` and ``jsd`` 4 GEMMs, 8NDV (those 3 plus the forward of the frozen
  reference / teacher head).  Every other provider's time is reported as a multiple of it.  Its
  memory is the gradient floor, the bytes of ``d hidden`` and ``d weight`` that every provider
  must return.
- ``naive``: :mod:`fastpref.reference` with ``precision="native"``, i.e. what plain
  PyTorch code does: materialise the ``[N, V]`` logits, log-softmax, gather; autograd.
- ``compiled``: ``torch.compile`` of that same naive function.
- ``fastpref-torch`` / ``fastpref-triton`` / ``fastpref-cuda``: the public fastpref
  function with an explicit ``backend=``.
- ``liger``: Liger-Kernel 0.8.5 (``LigerFusedLinearDPOLoss``, ``LigerFusedLinearJSDLoss``,
  ``LigerFusedLinearCrossEntropyLoss(reduction="none")`` for log-probs).
- ``cce``: Apple's cut-cross-entropy ``linear_cross_entropy(reduction="none")`` as negative
  per-token log-probs (``impl="torch_compile"`` on CPU, its Triton ``"cce"`` on GPUs),
  with the loss formula on top for the sequence-level workloads.
- ``trl``: TRL 1.16's fused LM head, ``trl.kernels.chunked_logprob.ChunkedLogProbFunction``
  (cuBLAS tiles + a Triton fold on GPUs, a torch fold elsewhere), called as TRL's
  ``add_fused_lm_head`` calls it (only the labelled rows on CUDA; every row, labels clamped
  and the output masked, elsewhere), and ``ChunkedDivergenceFunction`` for the JSD workload.
- ``torch-lce``: ``torch.nn.functional.linear_cross_entropy`` (PyTorch >= 2.13) with the
  chunked ``options=torch.nn.LinearCrossEntropyOptions()`` and ``reduction="none"``, as
  negative per-token log-probs (cross-entropy only: no JSD).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import logging
import os
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import fastpref
from fastpref import reference as ref

from .cases import Case

IGNORE_INDEX = -100
DPO_BETA = 0.1
PD_GAMMA = 0.1
JSD_BETA = 0.5

PROVIDERS = (
    "floor", "naive", "compiled", "fastpref-torch", "fastpref-triton", "fastpref-cuda", "liger", "cce", "trl", "torch-lce",
)


class Skip(Exception):
    """A provider that cannot run a workload on this device; the message says why."""


# Providers that need an optional package: provider -> (module, distribution, pip extra).
OPTIONAL_PACKAGES = {
    "liger": ("liger_kernel", "liger-kernel", "bench"),
    "cce": ("cut_cross_entropy", "cut-cross-entropy", "bench"),
    "trl": ("trl", "trl", "trl"),
}


def missing_package_reason(provider: str) -> Optional[str]:
    """``"liger-kernel not installed (pip install 'fastpref[bench]')"`` when ``provider``'s package is
    absent, else None.  Looks the package up without importing it (no import-time side effects)."""
    if provider not in OPTIONAL_PACKAGES:
        return None
    module, dist, extra = OPTIONAL_PACKAGES[provider]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails, or a broken module spec
        found = False
    if found:
        return None
    return f"{dist} not installed (pip install 'fastpref[{extra}]')"


@contextlib.contextmanager
def quiet_import():
    """Import optional providers without their import-time chatter reaching the terminal.

    Liger-Kernel, cut-cross-entropy, TRL and Triton import ``torch.utils.cpp_extension`` and friends,
    which warn through ``warnings`` and ``logging`` (e.g. torch's "No CUDA runtime is found" on a CPU
    box) or print.  Inside this block Python warnings and log records below ERROR are recorded instead
    of shown, and ``sys.stdout`` / ``sys.stderr`` are captured; what was captured is available as
    ``.text`` on the yielded object for a caller that wants to report it in one line.
    """

    class Captured:
        text = ""

    cap = Captured()
    out, err = io.StringIO(), io.StringIO()
    caught: List[warnings.WarningMessage] = []
    logged: List[str] = []
    handle = logging.Logger.handle

    def quiet_handle(logger, record):  # every logger, whatever handlers it has
        if record.levelno >= logging.ERROR:
            return handle(logger, record)
        logged.append(f"{record.levelname}: {record.getMessage()}")

    logging.Logger.handle = quiet_handle
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    yield cap
            finally:
                caught = list(record)
    finally:
        logging.Logger.handle = handle
        lines = logged + [ln.strip() for ln in (out.getvalue() + err.getvalue()).splitlines() if ln.strip()]
        lines += [f"{w.category.__name__}: {w.message}" for w in caught]
        cap.text = "; ".join(dict.fromkeys(lines))


# Text an optional provider's import printed or warned, per provider (reported once, in one line).
IMPORT_NOTES: Dict[str, str] = {}


def _import_optional(provider: str, importer: Callable):
    """``importer()`` under :func:`quiet_import`; :class:`Skip` with one line when the package is missing
    or its import fails."""
    reason = missing_package_reason(provider)
    if reason is not None:
        raise Skip(reason)
    dist = OPTIONAL_PACKAGES[provider][1]
    with quiet_import() as q:
        try:
            result = importer()
        except Exception as exc:  # installed but broken, or too old to have the API used here
            first = (str(exc).splitlines() or [""])[0][:200]
            raise Skip(f"{dist} installed but not importable ({type(exc).__name__}: {first})") from exc
    if q.text:
        IMPORT_NOTES[provider] = q.text
    return result


# --------------------------------------------------------------------------- inputs

# Argument names, in order, of every workload's loss functions.
ARGS = {
    "logprobs": ("hidden", "weight", "labels", "grad_out"),
    "dpo": ("hidden", "weight", "labels", "ref_hidden", "ref_weight"),
    "pref_distill": ("hidden", "weight", "labels", "reward_a", "reward_b"),
    "jsd": ("hidden", "weight", "teacher_hidden", "teacher_weight", "labels"),
}
# The tensors that receive gradients (the trainable policy / student side).
TRAINABLE = ("hidden", "weight")


def make_inputs(case: Case, device: torch.device) -> Dict[str, torch.Tensor]:
    """Seeded random inputs (never zeros): hidden ~ N(0, 1), heads ~ N(0, 1/D), so logits ~ N(0, 1).

    Preference workloads stack chosen then rejected sequences and ignore the first
    quarter of every sequence (the prompt).  The reference / teacher is a perturbed copy
    of the policy / an independent head, frozen (``requires_grad=False``).
    """
    B, T, D, V = case.B, case.T, case.D, case.V
    dtype = getattr(torch, case.dtype)
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    g = torch.Generator(device=gen_device).manual_seed(case.seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=gen_device) * scale).to(device=device, dtype=dtype)

    x = {
        "hidden": rnd(B, T, D),
        "weight": rnd(V, D, scale=D**-0.5),
        "labels": torch.randint(0, V, (B, T), generator=g, device=gen_device).to(device),
    }
    if case.workload in ("dpo", "pref_distill"):
        if B % 2:
            raise ValueError(f"B: a preference workload needs an even number of sequences, got {B}")
        x["labels"][:, : T // 4] = IGNORE_INDEX
    if case.workload == "logprobs":
        x["grad_out"] = rnd(B, T).float()  # an arbitrary upstream gradient for the per-token log-probs
    elif case.workload == "dpo":
        x["ref_hidden"] = x["hidden"] + rnd(B, T, D, scale=0.1)
        x["ref_weight"] = x["weight"] + rnd(V, D, scale=0.1 * D**-0.5)
    elif case.workload == "pref_distill":
        x["reward_a"] = rnd(B // 2).float()
        x["reward_b"] = rnd(B // 2).float()
    elif case.workload == "jsd":
        x["teacher_hidden"] = rnd(B, T, D)
        x["teacher_weight"] = rnd(V, D, scale=D**-0.5)
    for name in TRAINABLE:
        x[name].requires_grad_(True)
    return x


def args_of(case: Case, inputs: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """The workload's arguments, in order; the floor's extra ``dz`` and logits buffer last when ``inputs``
    has them."""
    names = ARGS[case.workload] + ((FLOOR_DZ, FLOOR_Z) if FLOOR_DZ in inputs else ())
    return tuple(inputs[n] for n in names)


def make_provider_inputs(case: Case, provider: str, device: torch.device) -> Dict[str, torch.Tensor]:
    """:func:`make_inputs`, plus what ``provider`` alone needs (the floor's ``dz`` and logits buffer)."""
    x = make_inputs(case, device)
    if provider == "floor":
        x.update(floor_inputs(case, device))
    return x


# --------------------------------------------------------------------------- naive losses
# Written out here (a few lines each, docs/design.md §8) on the reference oracle, so the
# naive provider does exactly what a plain PyTorch trainer would.


def _naive_seq_logps(h, w, y):
    return ref.sequence_logprobs(h, w, y, ignore_index=IGNORE_INDEX, precision="native")


def naive_logprobs(hidden, weight, labels, grad_out):
    logp = ref.linear_logprobs(hidden, weight, labels, ignore_index=IGNORE_INDEX, precision="native")
    return (logp * grad_out).sum()


def dpo_from_logps(logps, ref_logps, beta=DPO_BETA):
    """Sigmoid DPO, mean over pairs; rows stacked chosen then rejected."""
    P = logps.shape[0] // 2
    delta = (logps[:P] - ref_logps[:P]) - (logps[P:] - ref_logps[P:])
    return -F.logsigmoid(beta * delta).mean()


def naive_dpo(hidden, weight, labels, ref_hidden, ref_weight):
    logps = _naive_seq_logps(hidden, weight, labels)
    with torch.no_grad():
        ref_logps = _naive_seq_logps(ref_hidden, ref_weight, labels)
    return dpo_from_logps(logps, ref_logps)


def pref_distill_from_logps(logps, reward_a, reward_b, gamma=PD_GAMMA):
    """BCE_with_logits(gamma * (l(a1) - l(a2)), sigmoid(R(a1) - R(a2))), mean over pairs."""
    P = logps.shape[0] // 2
    return F.binary_cross_entropy_with_logits(gamma * (logps[:P] - logps[P:]), torch.sigmoid(reward_a - reward_b))


def naive_pref_distill(hidden, weight, labels, reward_a, reward_b):
    return pref_distill_from_logps(_naive_seq_logps(hidden, weight, labels), reward_a, reward_b)


def naive_jsd(hidden, weight, teacher_hidden, teacher_weight, labels):
    div = ref.linear_divergence(
        hidden,
        weight,
        teacher_hidden,
        teacher_weight,
        labels,
        kind="jsd",
        beta=JSD_BETA,
        ignore_index=IGNORE_INDEX,
        precision="native",
    )
    return div.sum() / (labels != IGNORE_INDEX).sum().clamp(min=1)


NAIVE = {"logprobs": naive_logprobs, "dpo": naive_dpo, "pref_distill": naive_pref_distill, "jsd": naive_jsd}


# --------------------------------------------------------------------------- fastpref


# The public loss each workload needs from fastpref; while it is missing the workload is
# skipped as a whole (the jsd workload falls back to linear_divergence).
FASTPREF_API = {
    "logprobs": "linear_logprobs",
    "dpo": "dpo_loss",
    "pref_distill": "preference_distillation_loss",
    "jsd": "distill_loss",
}


def workload_skip_reason(workload: str) -> Optional[str]:
    name = FASTPREF_API[workload]
    if workload != "jsd" and not hasattr(fastpref, name):
        return f"fastpref.{name} is not available in this build of fastpref {fastpref.__version__}"
    return None


def _call_with_backend(fn, backend, *args, **kwargs):
    """``fn(..., backend=backend)``; for a function without that keyword, the env override."""
    try:
        accepts = "backend" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        accepts = False
    if accepts:
        return fn(*args, backend=backend, **kwargs)
    with _env("FASTPREF_BACKEND", backend):
        return fn(*args, **kwargs)


@contextlib.contextmanager
def _env(key, value):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def fastpref_impl(workload: str) -> str:
    """Which fastpref function a workload calls (recorded in the results)."""
    if workload == "jsd" and not hasattr(fastpref, "distill_loss"):
        return "fastpref.linear_divergence(kind='jsd') (fastpref.distill_loss not available)"
    return f"fastpref.{FASTPREF_API[workload]}"


def _fastpref_fn(workload: str, backend: str) -> Callable:
    fp = fastpref
    if workload == "logprobs":

        def f(hidden, weight, labels, grad_out):
            return (
                fp.linear_logprobs(hidden, weight, labels, ignore_index=IGNORE_INDEX, backend=backend) * grad_out
            ).sum()
    elif workload == "dpo":

        def f(hidden, weight, labels, ref_hidden, ref_weight):
            return _call_with_backend(
                fp.dpo_loss,
                backend,
                hidden,
                weight,
                labels,
                ref_hidden=ref_hidden,
                ref_weight=ref_weight,
                beta=DPO_BETA,
                loss_type="sigmoid",
                ignore_index=IGNORE_INDEX,
            )
    elif workload == "pref_distill":

        def f(hidden, weight, labels, reward_a, reward_b):
            return _call_with_backend(
                fp.preference_distillation_loss,
                backend,
                hidden,
                weight,
                labels,
                gamma=PD_GAMMA,
                reward_a=reward_a,
                reward_b=reward_b,
                ignore_index=IGNORE_INDEX,
            )
    elif workload == "jsd" and hasattr(fp, "distill_loss"):

        def f(hidden, weight, teacher_hidden, teacher_weight, labels):
            return _call_with_backend(
                fp.distill_loss,
                backend,
                hidden,
                weight,
                teacher_hidden,
                teacher_weight,
                labels,
                kind="jsd",
                beta=JSD_BETA,
                ignore_index=IGNORE_INDEX,
            )
    elif workload == "jsd":

        def f(hidden, weight, teacher_hidden, teacher_weight, labels):
            div = fp.linear_divergence(
                hidden,
                weight,
                teacher_hidden,
                teacher_weight,
                labels,
                kind="jsd",
                beta=JSD_BETA,
                ignore_index=IGNORE_INDEX,
                backend=backend,
            )
            return div.sum() / (labels != IGNORE_INDEX).sum().clamp(min=1)
    else:
        raise ValueError(f"workload: unknown {workload!r}")
    return f


# --------------------------------------------------------------------------- the GEMM floor

# The plain GEMMs of one fused forward+backward, per workload (each N*D*V multiply-adds, 2NDV FLOPs):
#
# - logprobs, pref_distill: the policy head, 3 GEMMs (6NDV): logits z = h @ W^T, then d h = dz @ W and
#   d W = dz^T @ h;
# - dpo: those 3 plus the frozen reference head's forward, z_ref = h_ref @ W_ref^T: 4 GEMMs (8NDV);
# - jsd: those 3 plus the frozen teacher head's forward, z_t = h_t @ W_t^T: 4 GEMMs (8NDV).
#
# A fused implementation that recomputes the logits in its backward does one more (the 8NDV cost of
# linear_logprobs in docs/design.md §4); the floor counts the useful work only, as ``Case.flops`` does.
FLOOR_GEMMS = {"logprobs": 3, "dpo": 4, "pref_distill": 3, "jsd": 4}

# The frozen head a workload also runs forward (its hidden and weight arguments), if any.
FROZEN_HEAD = {"dpo": ("ref_hidden", "ref_weight"), "jsd": ("teacher_hidden", "teacher_weight")}

# The floor's extra inputs, both [N, V] in the case's dtype: a random stand-in for d loss / d logits, and
# the buffer the forward GEMMs write the logits into (allocated once, like a fused kernel's reused tiles,
# so the floor times the GEMMs and not the page faults of a fresh [N, V] allocation on every call).
FLOOR_DZ = "floor_dz"
FLOOR_Z = "floor_z"


class _GemmFloor(torch.autograd.Function):
    """The GEMMs of :data:`FLOOR_GEMMS` and nothing else.

    Forward: ``z = h @ W^T`` (and the frozen head's logits) into the preallocated ``z`` buffer; returns
    one logit as a stand-in loss.  Backward: the gradients of ``sum(z * dz)`` for the given ``dz``, i.e.
    ``d h = dz @ W`` and ``d W = dz^T @ h`` (the upstream scalar gradient is ignored: the bench passes 1).
    """

    @staticmethod
    def forward(ctx, hidden, weight, dz, z, frozen_hidden, frozen_weight):
        torch.mm(hidden.reshape(-1, hidden.shape[-1]), weight.T, out=z)
        loss = z[0, 0].float().clone()
        if frozen_hidden is not None:
            torch.mm(frozen_hidden.reshape(-1, frozen_hidden.shape[-1]), frozen_weight.T, out=z)
        ctx.save_for_backward(hidden, weight, dz)
        return loss

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, dz = ctx.saved_tensors
        h = hidden.reshape(-1, hidden.shape[-1])
        return (dz @ weight).view_as(hidden), dz.T @ h, None, None, None, None


def floor_inputs(case: Case, device: torch.device) -> Dict[str, torch.Tensor]:
    """The floor's extra inputs, ``[N, V]`` in the case's dtype: ``dz`` ~ N(0, 1/V) (seeded) and the
    logits buffer (zero-filled, so its pages exist before the first call)."""
    dtype = getattr(torch, case.dtype)
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    g = torch.Generator(device=gen_device).manual_seed(case.seed + 1)
    dz = torch.randn(case.N, case.V, generator=g, device=gen_device, dtype=dtype)  # no fp32 copy of [N, V]
    return {
        FLOOR_DZ: dz.mul_(case.V**-0.5).to(device=device),
        FLOOR_Z: torch.zeros(case.N, case.V, device=device, dtype=dtype),
    }


def _floor_fn(workload: str) -> Callable:
    names = ARGS[workload] + (FLOOR_DZ, FLOOR_Z)
    frozen = FROZEN_HEAD.get(workload)

    def f(*args):
        x = dict(zip(names, args))
        fh, fw = (x[frozen[0]], x[frozen[1]]) if frozen else (None, None)
        return _GemmFloor.apply(x["hidden"], x["weight"], x[FLOOR_DZ], x[FLOOR_Z], fh, fw)

    return f


# --------------------------------------------------------------------------- liger


def _liger_fn(workload: str, device: torch.device) -> Callable:
    if workload == "pref_distill":
        raise Skip("Liger-Kernel 0.8.5 has no preference-distillation loss")
    if workload == "logprobs" and device.type != "cuda":
        raise Skip(
            "LigerFusedLinearCrossEntropyLoss is a Triton kernel: needs a CUDA GPU "
            "(on CPU only under TRITON_INTERPRET=1, a numerics-only interpreter)"
        )

    def load():
        if workload == "logprobs":
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            return LigerFusedLinearCrossEntropyLoss
        if workload == "dpo":
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

            return LigerFusedLinearDPOLoss
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        return LigerFusedLinearJSDLoss

    cls = _import_optional("liger", load)
    if workload == "logprobs":
        lce = cls(ignore_index=IGNORE_INDEX, reduction="none")

        def f(hidden, weight, labels, grad_out):
            nll = lce(weight, hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1))
            return (-nll.float() * grad_out.reshape(-1)).sum()
    elif workload == "dpo":
        dpo = cls(ignore_index=IGNORE_INDEX, beta=DPO_BETA, use_ref_model=True, loss_type="sigmoid")

        def f(hidden, weight, labels, ref_hidden, ref_weight):
            out = dpo(weight, hidden, labels, ref_input=ref_hidden, ref_weight=ref_weight)
            return out[0] if isinstance(out, tuple) else out
    else:
        jsd = cls(
            weight_hard_loss=0.0, weight_soft_loss=1.0, beta=JSD_BETA, ignore_index=IGNORE_INDEX
        )

        def f(hidden, weight, teacher_hidden, teacher_weight, labels):
            return jsd(
                hidden.reshape(-1, hidden.shape[-1]),
                weight,
                teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
                teacher_weight,
                labels.reshape(-1),
            )

    return f


# --------------------------------------------------------------------------- cut-cross-entropy


def _cce_fn(workload: str, device: torch.device) -> Callable:
    if workload == "jsd":
        raise Skip("cut-cross-entropy computes cross-entropy only (no teacher distribution / divergence)")

    def load():
        from cut_cross_entropy import linear_cross_entropy

        return linear_cross_entropy

    linear_cross_entropy = _import_optional("cce", load)
    impl = "cce" if device.type == "cuda" else "torch_compile"

    def token_logps(h, w, y):
        return -linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX, reduction="none", impl=impl).float()

    if workload == "logprobs":

        def f(hidden, weight, labels, grad_out):
            return (token_logps(hidden, weight, labels) * grad_out).sum()
    elif workload == "dpo":

        def f(hidden, weight, labels, ref_hidden, ref_weight):
            logps = token_logps(hidden, weight, labels).sum(-1)
            with torch.no_grad():
                ref_logps = token_logps(ref_hidden, ref_weight, labels).sum(-1)
            return dpo_from_logps(logps, ref_logps)
    else:

        def f(hidden, weight, labels, reward_a, reward_b):
            return pref_distill_from_logps(token_logps(hidden, weight, labels).sum(-1), reward_a, reward_b)

    return f


# --------------------------------------------------------------------------- TRL's fused head


def _trl_fn(workload: str, device: torch.device) -> Callable:

    def load():
        import trl

        version = tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in trl.__version__.split(".")[:2])
        if version < (1, 16):
            raise ImportError(f"TRL's fused LM head needs trl >= 1.16, found {trl.__version__}")
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        return ChunkedDivergenceFunction, ChunkedLogProbFunction, _CHUNKED_LOGPROB_CHUNK_SIZE

    ChunkedDivergenceFunction, ChunkedLogProbFunction, chunk = _import_optional("trl", load)
    compact = device.type == "cuda"  # TRL scores only the labelled rows where its Triton fold runs

    def token_logps(h, w, y):
        h2, y2 = h.reshape(-1, h.shape[-1]), y.reshape(-1)
        keep = y2 != IGNORE_INDEX
        if compact:
            out = ChunkedLogProbFunction.apply(h2[keep], w, None, y2[keep], 1.0, chunk, None, 1.0, ())[0]
            return out.new_zeros(keep.shape).masked_scatter(keep, out).view(y.shape)
        out = ChunkedLogProbFunction.apply(h2, w, None, y2.clamp(min=0), 1.0, chunk, None, 1.0, ())[0]
        return out.masked_fill(~keep, 0.0).view(y.shape)

    if workload == "logprobs":

        def f(hidden, weight, labels, grad_out):
            return (token_logps(hidden, weight, labels) * grad_out).sum()
    elif workload == "dpo":

        def f(hidden, weight, labels, ref_hidden, ref_weight):
            logps = token_logps(hidden, weight, labels).sum(-1)
            with torch.no_grad():
                ref_logps = token_logps(ref_hidden, ref_weight, labels).sum(-1)
            return dpo_from_logps(logps, ref_logps)
    elif workload == "pref_distill":

        def f(hidden, weight, labels, reward_a, reward_b):
            return pref_distill_from_logps(token_logps(hidden, weight, labels).sum(-1), reward_a, reward_b)
    else:

        def f(hidden, weight, teacher_hidden, teacher_weight, labels):
            keep = labels.reshape(-1) != IGNORE_INDEX
            hs, ht = hidden.reshape(-1, hidden.shape[-1]), teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
            if compact:
                hs, ht = hs[keep], ht[keep]
            div = ChunkedDivergenceFunction.apply(hs, weight, None, ht, teacher_weight, None, JSD_BETA)[0]
            if not compact:
                div = div.masked_fill(~keep, 0.0)
            return div.sum() / keep.sum().clamp(min=1)

    return f


# --------------------------------------------------------------------------- torch.nn.functional.linear_cross_entropy


def _torch_lce_fn(workload: str, device: torch.device) -> Callable:
    if not (hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")):
        raise Skip(
            f"torch.nn.functional.linear_cross_entropy with chunked options needs PyTorch >= 2.13 "
            f"(found {torch.__version__})"
        )
    if workload == "jsd":
        raise Skip("torch.nn.functional.linear_cross_entropy computes cross-entropy only (no teacher distribution)")
    options = torch.nn.LinearCrossEntropyOptions()

    def token_logps(h, w, y):
        nll = F.linear_cross_entropy(
            h.reshape(-1, h.shape[-1]), w, y.reshape(-1), reduction="none", ignore_index=IGNORE_INDEX, options=options
        )
        return -nll.float().view(y.shape)

    if workload == "logprobs":

        def f(hidden, weight, labels, grad_out):
            return (token_logps(hidden, weight, labels) * grad_out).sum()
    elif workload == "dpo":

        def f(hidden, weight, labels, ref_hidden, ref_weight):
            logps = token_logps(hidden, weight, labels).sum(-1)
            with torch.no_grad():
                ref_logps = token_logps(ref_hidden, ref_weight, labels).sum(-1)
            return dpo_from_logps(logps, ref_logps)
    else:

        def f(hidden, weight, labels, reward_a, reward_b):
            return pref_distill_from_logps(token_logps(hidden, weight, labels).sum(-1), reward_a, reward_b)

    return f


_EXTERNAL = {"liger": _liger_fn, "cce": _cce_fn, "trl": _trl_fn, "torch-lce": _torch_lce_fn}


# --------------------------------------------------------------------------- dispatch


def provider_skip_reason(workload: str, provider: str, device: torch.device) -> Optional[str]:
    """Why ``provider`` cannot run ``workload`` on ``device`` (cheap: nothing is run), or None."""
    reason = workload_skip_reason(workload)
    if reason is not None:
        return reason
    if provider == "floor":
        return None
    if provider.startswith("fastpref-"):
        backend = provider[len("fastpref-") :]
        if backend == "triton" and device.type != "cuda":
            return "Triton kernels need a CUDA device (the CPU interpreter checks numerics; it is not timed)"
        with quiet_import():  # probing the Triton / CUDA backends imports triton
            reasons = fastpref.available_backends(device)
        if backend not in reasons:
            return f"unknown fastpref backend {backend!r}"
        return reasons[backend]
    if provider in _EXTERNAL:
        try:
            _EXTERNAL[provider](workload, device)
        except Skip as exc:
            return str(exc)
        return None
    if provider in ("naive", "compiled"):
        return None
    return f"unknown provider {provider!r} (known: {', '.join(PROVIDERS)})"


def loss_fn(workload: str, provider: str, device: torch.device) -> Callable:
    """The loss function of ``provider`` for ``workload``; raises :class:`Skip` with a reason."""
    reason = provider_skip_reason(workload, provider, device)
    if reason is not None:
        raise Skip(reason)
    if provider == "floor":
        return _floor_fn(workload)
    if provider == "naive":
        return NAIVE[workload]
    if provider == "compiled":
        return torch.compile(NAIVE[workload])
    if provider.startswith("fastpref-"):
        return _fastpref_fn(workload, provider[len("fastpref-") :])
    return _EXTERNAL[provider](workload, device)


def trainable(inputs: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
    return [inputs[n] for n in TRAINABLE]
