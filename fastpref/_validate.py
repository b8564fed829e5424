"""Cheap argument checks shared by every public entry point (validation happens once, at the public
boundary: docs/design.md §1).

Every check here looks at metadata only (shapes, dtypes, devices, Python numbers),
except the label-range check, which reads the labels only when they live on the CPU
and we are not being traced (there it costs no device sync).  On an accelerator, or
under ``torch.compile``, an out-of-range label is never read out of bounds: its row
yields NaN, which propagates into the loss.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def check_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def check_float_tensor(x: object, name: str, *, min_dim: int = 1) -> torch.Tensor:
    x = check_tensor(x, name)
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (fp16/bf16/fp32/fp64), got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name}: expected at least {min_dim} dimension(s), got shape {tuple(x.shape)}")
    return x


def check_positive(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite value > 0, got {value!r}")
    return float(value)


def check_optional_positive(value: object, name: str) -> Optional[float]:
    return None if value is None else check_positive(value, name)


def check_finite(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite value, got {value!r}")
    return float(value)


def check_range(value: object, name: str, lo: float, hi: float, *, lo_open: bool, hi_open: bool) -> float:
    v = check_finite(value, name)
    bad_lo = v <= lo if lo_open else v < lo
    bad_hi = v >= hi if hi_open else v > hi
    if bad_lo or bad_hi:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name}: expected a value in {interval}, got {value!r}")
    return v


def check_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return value


_INT64 = (-(2**63), 2**63 - 1)


def check_ignore_index(value: object, name: str = "ignore_index") -> int:
    v = check_int(value, name)
    if not _INT64[0] <= v <= _INT64[1]:
        raise ValueError(f"{name}: expected an int64 value, got {value!r}")
    return v


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def check_outputs(value: object, name: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    """A sequence of distinct names among ``choices`` (a bare string is a mistake, not a sequence)."""
    if isinstance(value, str) or not isinstance(value, (tuple, list, set, frozenset)):
        raise TypeError(f"{name}: expected a tuple of names among {list(choices)}, got {value!r}")
    for item in value:
        if item not in choices:
            raise ValueError(f"{name}: expected names among {list(choices)}, got {item!r}")
    return tuple(value)


def check_transform(temperature: object, softcap: object, logit_scale: object, *, prefix: str = ""):
    """The logit transform's three numbers (temperature > 0, softcap None or > 0, finite logit_scale)."""
    from .backends.contract import Transform

    return Transform(
        temperature=check_positive(temperature, "temperature"),
        softcap=check_optional_positive(softcap, f"{prefix}softcap"),
        logit_scale=check_finite(logit_scale, f"{prefix}logit_scale"),
    )


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value  # type: ignore[return-value]


def check_same_device(ref: torch.Tensor, ref_name: str, x: torch.Tensor, name: str) -> None:
    if x.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (that of {ref_name}), got {x.device}")


def check_same_dtype(ref: torch.Tensor, ref_name: str, x: torch.Tensor, name: str) -> None:
    if x.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (that of {ref_name}), got {x.dtype}")


def check_not_partitioned(x: object, name: str) -> None:
    """A DeepSpeed ZeRO-3 parameter outside its module's forward holds no data (an empty tensor whose
    full shape is ``ds_shape``): say so, rather than report a shape of (0,)."""
    ds_shape = getattr(x, "ds_shape", None)
    if ds_shape is not None and isinstance(x, torch.Tensor) and x.numel() == 0:
        raise ValueError(
            f"{name}: a DeepSpeed ZeRO-3 partitioned parameter (full shape {tuple(ds_shape)}) holds no data "
            "outside its module's forward; call fastpref inside a forward that gathers it "
            "(deepspeed.zero.register_external_parameter) or under deepspeed.zero.GatheredParameters "
            "(README, 'Distributed')"
        )


def check_head(
    hidden: object,
    weight: object,
    bias: object,
    *,
    hidden_name: str = "hidden",
    weight_name: str = "weight",
    bias_name: str = "bias",
) -> None:
    """hidden ``(..., D)``, weight ``(V, D)``, bias ``(V,)``: same device, same dtype."""
    check_not_partitioned(weight, weight_name)
    check_not_partitioned(bias, bias_name)
    hidden = check_float_tensor(hidden, hidden_name)
    weight = check_float_tensor(weight, weight_name, min_dim=2)
    if weight.dim() != 2:
        raise ValueError(f"{weight_name}: expected shape (V, D), got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{weight_name}: expected a vocabulary of at least 1, got shape {tuple(weight.shape)}")
    check_same_device(hidden, hidden_name, weight, weight_name)
    check_same_dtype(hidden, hidden_name, weight, weight_name)
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{hidden_name}: expected last dimension D={weight.shape[1]} (from {weight_name} of shape "
            f"{tuple(weight.shape)}), got shape {tuple(hidden.shape)}"
        )
    if bias is not None:
        bias = check_float_tensor(bias, bias_name)
        check_same_device(weight, weight_name, bias, bias_name)
        check_same_dtype(weight, weight_name, bias, bias_name)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{bias_name}: expected shape ({weight.shape[0]},), got {tuple(bias.shape)}")


def check_labels(
    labels: object,
    hidden: torch.Tensor,
    vocab: int,
    ignore_index: int,
    *,
    name: str = "labels",
    hidden_name: str = "hidden",
) -> torch.Tensor:
    """Integer labels shaped like ``hidden`` without its last dimension, as int64.

    Labels of any integer width are widened first, so that ``ignore_index`` and the range are compared
    exactly (a uint8 156 is a label, not -100).  On the CPU, outside ``torch.compile``, a label outside
    ``[0, vocab)`` other than ``ignore_index`` raises; elsewhere it gives NaN (no host sync)."""
    labels = check_tensor(labels, name)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype (int64), got {labels.dtype}")
    check_same_device(hidden, hidden_name, labels, name)
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{name}: expected shape {tuple(hidden.shape[:-1])} (that of {hidden_name} without its last "
            f"dimension), got {tuple(labels.shape)}"
        )
    check_ignore_index(ignore_index)
    labels = labels if labels.dtype == torch.int64 else labels.long()
    if labels.device.type == "cpu" and not _is_compiling() and labels.numel() > 0:
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            first = labels[bad][0].item()
            raise ValueError(
                f"{name}: expected values in [0, {vocab}) or ignore_index={ignore_index}, got {first}"
            )
    return labels
