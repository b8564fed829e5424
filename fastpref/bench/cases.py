"""Benchmark cases and sweeps: which shapes each workload is measured on, per device.

A :class:`Case` is one shape of one workload; a :class:`Sweep` is a list of cases that
vary along one axis (``T`` or ``V``) and becomes one table and one plot.  Cases shared by
two sweeps (the corner point of a T-sweep and a V-sweep) are measured once.

Shapes: CPU sweeps are small enough to finish in minutes on two cores; GPU sweeps use
real LM-head shapes (Llama-3 V=128256, Qwen V=151936, Gemma-3 V=262144; hidden
2048-8192) and sequence lengths from 1k to 32k tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

WORKLOADS = ("logprobs", "dpo", "pref_distill", "jsd")

WORKLOAD_TITLES = {
    "logprobs": "linear_logprobs forward+backward (per-token log-probs of the labels)",
    "dpo": "DPO (sigmoid, beta=0.1): policy + frozen reference model, forward+backward",
    "pref_distill": "preference distillation (gamma=0.1, soft Bradley-Terry targets), forward+backward",
    "jsd": "JSD distillation (beta=0.5) student vs frozen teacher head, forward+backward",
}

# FLOPs of one forward+backward in units of N*D*V (6 = three GEMMs of N*D*V multiply-adds):
# the policy head costs 6NDV (logits, d_hidden, d_weight) if logits are kept; a frozen
# reference/teacher head only its forward GEMM, 2NDV.  Recomputing backends do more work
# than this; the count is the useful work, the same for every provider.
_FLOP_FACTOR = {"logprobs": 6, "dpo": 8, "pref_distill": 6, "jsd": 8}


@dataclass(frozen=True)
class Case:
    """One shape of one workload.  ``B`` sequences (preference workloads: chosen then
    rejected, so ``B`` is even) of ``T`` tokens, hidden size ``D``, vocabulary ``V``."""

    workload: str
    B: int
    T: int
    D: int
    V: int
    dtype: str = "float32"
    seed: int = 0

    @property
    def N(self) -> int:
        return self.B * self.T

    @property
    def key(self) -> str:
        return f"{self.workload}-B{self.B}-T{self.T}-D{self.D}-V{self.V}-{self.dtype}"

    @property
    def shape(self) -> str:
        return f"B={self.B} T={self.T} D={self.D} V={self.V} {self.dtype}"

    @property
    def flops(self) -> int:
        return _FLOP_FACTOR[self.workload] * self.N * self.D * self.V

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(N=self.N, key=self.key, flops=self.flops)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Case:
        return cls(**{k: d[k] for k in ("workload", "B", "T", "D", "V", "dtype", "seed")})


@dataclass
class Sweep:
    """Cases of one workload varying along ``axis`` ("T" or "V"): one table, one plot."""

    name: str
    workload: str
    axis: str
    cases: List[Case] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "workload": self.workload,
            "axis": self.axis,
            "note": self.note,
            "cases": [c.key for c in self.cases],
        }


def _t_sweep(workload, Ts, *, B, D, V, dtype, note=""):
    return Sweep(f"{workload}-T", workload, "T", [Case(workload, B, T, D, V, dtype) for T in Ts], note)


def _v_sweep(workload, Vs, *, B, T, D, dtype, note=""):
    return Sweep(f"{workload}-V", workload, "V", [Case(workload, B, T, D, V, dtype) for V in Vs], note)


def cpu_sweeps() -> List[Sweep]:
    """Two cores, fp32: D=512, one pair of sequences at Llama-3's V=128256 (two T), plus V=32000.

    Seven cases x the CPU providers in fresh processes: about 16 minutes on two idle cores."""
    kw = dict(B=2, D=512, dtype="float32")
    return [
        _t_sweep("logprobs", (128, 512), V=128256, **kw),
        _v_sweep("logprobs", (32000, 128256), T=128, **kw),
        _t_sweep("dpo", (128, 256), V=128256, **kw),
        _t_sweep("pref_distill", (128,), V=128256, **kw),
        _t_sweep("jsd", (64,), V=128256, **kw),
    ]


def quick_sweeps() -> List[Sweep]:
    """Tiny shapes for CI: every workload, table and plot path exercised in about a minute."""
    kw = dict(B=2, D=64, dtype="float32")
    return [
        _t_sweep("logprobs", (32, 64), V=2048, **kw),
        _v_sweep("logprobs", (1024, 2048), T=64, **kw),
        _t_sweep("dpo", (64,), V=2048, **kw),
        _t_sweep("pref_distill", (64,), V=2048, **kw),
        _t_sweep("jsd", (64,), V=2048, **kw),
    ]


# Real LM heads: (name, V, D).
GPU_MODELS = (
    ("Llama-3.2-1B", 128256, 2048),
    ("Llama-3-8B", 128256, 4096),
    ("Llama-3-70B", 128256, 8192),
    ("Qwen3-8B", 151936, 4096),
    ("Gemma-3-4B", 262144, 2560),
    ("Gemma-3-12B", 262144, 3840),
)


def gpu_sweeps() -> List[Sweep]:
    """bf16 on one GPU: T from 1k to 32k at Llama-3-8B's head, vocabularies at D=4096."""
    kw = dict(B=2, dtype="bfloat16")
    Ts = (1024, 2048, 4096, 8192, 16384)
    Vs = (32000, 128256, 151936, 262144)
    return [
        _t_sweep("logprobs", Ts + (32768,), V=128256, D=4096, **kw),
        _v_sweep("logprobs", Vs, T=4096, D=4096, **kw),
        _t_sweep("dpo", Ts + (32768,), V=128256, D=4096, **kw),
        _v_sweep("dpo", Vs, T=4096, D=4096, **kw),
        _t_sweep("pref_distill", (2048, 8192), V=128256, D=4096, **kw),
        _t_sweep("jsd", (1024, 4096, 16384), V=128256, D=4096, **kw),
        _v_sweep("jsd", (128256, 151936, 262144), T=4096, D=4096, **kw),
    ]


def parse_shapes(text: str) -> List[tuple]:
    """``"1024x1024x65536,2048x512x128256"`` -> ``[(N, D, V), ...]`` (N rows = B·T with B = 1)."""
    shapes = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--shapes: expected NxDxV items such as 1024x1024x65536, got {item.strip()!r}")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def shape_sweeps(shapes: List[tuple], dtype: str) -> List[Sweep]:
    """One single-case sweep per (workload, N x D x V): the shapes a user asked for, every workload."""
    return [Sweep(f"{w}-{n}x{d}x{v}", w, "T", [Case(w, 1, n, d, v, dtype)]) for w in WORKLOADS for n, d, v in shapes]


def sweeps_for(device_type: str, quick: bool = False, workloads: Optional[List[str]] = None,
               shapes: Optional[List[tuple]] = None) -> List[Sweep]:
    """The sweeps to run on a device type ("cpu" or "cuda"), optionally only some workloads; ``shapes``
    (``[(N, D, V)]``) replaces the device's sweep."""
    if shapes:
        sweeps = shape_sweeps(shapes, "bfloat16" if device_type == "cuda" else "float32")
    else:
        sweeps = quick_sweeps() if quick else (gpu_sweeps() if device_type == "cuda" else cpu_sweeps())
    if workloads is not None:
        sweeps = [s for s in sweeps if s.workload in workloads]
    return sweeps


def unique_cases(sweeps: List[Sweep]) -> List[Case]:
    """Every case of ``sweeps`` once, in first-seen order."""
    seen: Dict[str, Case] = {}
    for s in sweeps:
        for c in s.cases:
            seen.setdefault(c.key, c)
    return list(seen.values())
