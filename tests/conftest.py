"""Shared test helpers, used by every backend's tests: seeded generators, the workspace / logits-cache
settings, inputs, and the accuracy rule of docs/design.md §6.

Accuracy rule: ``|out - truth| <= 2 * |naive - truth| + floor``, where ``truth`` is the fp64
oracle and ``naive`` is plain PyTorch in the inputs' own dtype (the oracle with
``precision="native"``).  The floor (a few fp32 ulps of the largest true value, or fp64
ulps for fp64 inputs) only guards against the naive version being right by luck.
"""

from __future__ import annotations

import contextlib
import math
import os
import zlib

import torch

# Without a GPU the Triton kernels run under the interpreter, which Triton picks when a kernel is
# decorated: set it before any test module (or a library it imports) imports triton.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

FLOOR_ULPS = 8
HALF_DTYPES = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- seeds


def seeded_generator(request, device="cpu") -> torch.Generator:
    """A generator on ``device`` seeded from the test id, so a failing id reproduces on its own."""
    return torch.Generator(device=device).manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the test id."""
    return seeded_generator(request)


# --------------------------------------------------------------------------- workspace and logits cache


@contextlib.contextmanager
def settings(*, workspace=None, keep_logits=None):
    """The workspace budget (bytes; ``fastpref.set_workspace_bytes``, default from FASTPREF_WORKSPACE_MB)
    and the logits-cache switch (``fastpref.set_keep_logits``) for one block; ``None`` leaves a setting
    as it is.  Both are restored afterwards."""
    import fastpref  # not at import time: conftest must not import anything that imports triton

    old = fastpref.get_workspace_bytes(), fastpref.get_keep_logits()
    try:
        if workspace is not None:
            fastpref.set_workspace_bytes(workspace)
        if keep_logits is not None:
            fastpref.set_keep_logits(keep_logits)
        yield
    finally:
        fastpref.set_workspace_bytes(old[0])
        fastpref.set_keep_logits(old[1])


@pytest.fixture(params=[True, False], ids=["keep-logits", "recompute"])
def keep_logits(request):
    """Both backward paths: logits kept from the forward (when they fit the budget), and recomputed."""
    with settings(keep_logits=request.param):
        yield request.param


@pytest.fixture
def narrow_tiles(monkeypatch):
    """Vocabulary tiles of 64+ columns in the planner, so small budgets split V=300..1000 over several
    tiles (and let a small budget keep the logits while the backward's dz takes several chunks)."""
    from fastpref.backends import tiling

    monkeypatch.setattr(tiling, "_MIN_TILE_COLS", 64)


# --------------------------------------------------------------------------- inputs


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


# --------------------------------------------------------------------------- the accuracy rule


def floor_for(truth: torch.Tensor, dtype: torch.dtype) -> float:
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    scale = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    return FLOOR_ULPS * eps * scale


def output_ulp(out: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype) -> float:
    """One ulp of a 16-bit ``out``'s own dtype at the magnitude of the largest true value (0 for any
    other output): a correctly rounded 16-bit result may sit a full ulp from the truth."""
    if out.dtype not in HALF_DTYPES or out.dtype != dtype or not truth.numel():
        return 0.0
    scale = truth.abs().max().item()
    return torch.finfo(out.dtype).eps * 2.0 ** math.floor(math.log2(max(scale, 1e-30)))


def assert_accurate(name: str, out: torch.Tensor, naive: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype,
                    *, out_ulps: int = 0):
    """The accuracy rule; prints both errors so the headroom shows in the log.

    ``dtype`` is the inputs' dtype (it picks the floor's ulp: fp64 for fp64 inputs, else fp32).
    ``out_ulps``: that many ulps of a 16-bit output's own dtype (:func:`output_ulp`) are added to the
    bound — the CUDA backend's tests take 1, because its 16-bit gradients are rounded once from fp32
    where naive PyTorch may round luckily; every other caller keeps the plain rule (0).
    """
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)} != {tuple(truth.shape)}"
    out, naive, truth = out.detach(), naive.detach(), truth.detach().double()
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    err = (out.double() - truth).abs().max().item() if truth.numel() else 0.0
    err_naive = (naive.double() - truth).abs().max().item() if truth.numel() else 0.0
    ulp = out_ulps * output_ulp(out, truth, dtype) if out_ulps else 0.0
    bound = 2 * err_naive + floor_for(truth, dtype) + ulp
    extra = f" (incl. {out_ulps} {out.dtype} ulp)" if ulp else ""
    print(f"{name}: err={err:.3e} naive_err={err_naive:.3e} bound={bound:.3e}{extra}")
    assert err <= bound, f"{name}: err {err:.3e} > bound {bound:.3e} (naive err {err_naive:.3e})"


def load_pyproject() -> dict:
    """The repository's pyproject.toml, parsed."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


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
