"""Shared test helpers: seeded inputs and the accuracy rule of docs/design.md §6.

Accuracy rule: ``|out - truth| <= 2 * |naive - truth| + floor``, where ``truth`` is the fp64
oracle and ``naive`` is plain PyTorch in the inputs' own dtype (the oracle with
``precision="native"``).  The floor (a few fp32 ulps of the largest true value, or fp64
ulps for fp64 inputs) only guards against the naive version being right by luck.
"""

from __future__ import annotations

import os
import zlib

import torch

# Without a GPU the Triton kernels run under the interpreter, which Triton picks when a kernel is
# decorated: set it before any test module (or a library it imports) imports triton.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

FLOOR_ULPS = 8


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test id, so a failing id reproduces on its own."""
    g = torch.Generator()
    g.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    return g


def make_head(n, d, v, *, dtype=torch.float32, bias=False, gen=None, logit_scale=3.0):
    """Random hidden (n, d), head (v, d) and optional bias whose logits have std ~ ``logit_scale``."""
    h = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) * (logit_scale / d**0.5)
    b = torch.randn(v, generator=gen, dtype=torch.float64) * 0.5 if bias else None
    def cast(t):
        return (None if t is None else t.to(dtype))
    return cast(h), cast(w), cast(b)


def make_labels(n, v, *, ignored=0.0, gen=None, ignore_index=-100):
    labels = torch.randint(0, v, (n,), generator=gen)
    if ignored >= 1.0:
        labels[:] = ignore_index
    elif ignored > 0:
        drop = torch.rand(n, generator=gen) < ignored
        labels[drop] = ignore_index
    return labels


def floor_for(truth: torch.Tensor, dtype: torch.dtype) -> float:
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    scale = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    return FLOOR_ULPS * eps * scale


def assert_accurate(name: str, out: torch.Tensor, naive: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype):
    """The accuracy rule; prints both errors so the headroom shows in the log."""
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    truth = truth.double()
    err = (out.double() - truth).abs().max().item() if truth.numel() else 0.0
    err_naive = (naive.double() - truth).abs().max().item() if truth.numel() else 0.0
    bound = 2 * err_naive + floor_for(truth, dtype)
    print(f"{name}: err={err:.3e} naive_err={err_naive:.3e} bound={bound:.3e}")
    assert err <= bound, f"{name}: err {err:.3e} > bound {bound:.3e} (naive err {err_naive:.3e})"


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (realistic vocabularies, long cases)")


def pytest_collection_modifyitems(config, items):
    """Slow tests are skipped unless ``--run-slow`` adds them (or ``-m`` names the marker)."""
    if config.getoption("--run-slow") or "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: add --run-slow to run it")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
