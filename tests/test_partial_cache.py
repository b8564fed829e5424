"""The torch backend's partial logits cache: when the whole logits do not fit the budget, the forward
keeps the vocabulary chunks that do and the backward recomputes only the rest (docs/design.md §4).
Values and every gradient against the fp64 oracle under the accuracy rule, with the plan checked to
really be partial (some chunks kept, some recomputed)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_accurate, make_head, make_labels

import fastpref as fp
import fastpref.reference as ref
from fastpref.backends import torch_backend

MiB = 1 << 20


@pytest.fixture
def budget():
    before_ws, before_keep = fp.get_workspace_bytes(), fp.get_keep_logits()
    yield lambda nbytes: fp.set_workspace_bytes(nbytes)
    fp.set_workspace_bytes(before_ws)
    fp.set_keep_logits(before_keep)


def _grads(loss, leaves):
    return torch.autograd.grad(loss, [t for t in leaves if t is not None and t.requires_grad])


def test_plan_keeps_what_fits_beside_the_tiles(budget):
    budget(4 * MiB)  # log-probs: tiles of all 64 rows x 2048 columns (3 scratch tiles, 1.5 MiB)
    rows, cols, kept = torch_backend._plan(64, 20000, 4, heads=1, slots=torch_backend._LP_SLOTS, cache=True)
    assert (rows, cols, kept) == (64, 2048, 5)  # 5 of 10 chunks in the 2.5 MiB the tiles leave
    assert 3 * rows * cols * 4 + kept * rows * cols * 4 <= 4 * MiB
    assert torch_backend._plan(64, 8000, 4, heads=1, slots=torch_backend._LP_SLOTS, cache=True)[2] == 4  # all
    budget(8 * MiB)  # a divergence: 7 scratch tiles, and two heads per kept chunk
    rows, cols, kept = torch_backend._plan(64, 20000, 4, heads=2, slots=torch_backend._DV_SLOTS, cache=True)
    assert (rows, cols, kept) == (64, 2048, 4)
    assert 7 * rows * cols * 4 + 2 * kept * rows * cols * 4 <= 8 * MiB
    fp.set_keep_logits(False)
    assert torch_backend._plan(64, 20000, 4, heads=1, slots=torch_backend._LP_SLOTS, cache=True)[2] == 0


@pytest.mark.parametrize("opts", [dict(), dict(softcap=5.0, temperature=0.8, bias=True, entropy=True)],
                         ids=["plain", "bias-softcap-temp-entropy"])
def test_logprobs_with_a_partial_cache_match_the_oracle(opts, gen, budget):
    n, d, v = 64, 32, 20000
    h, w, b = make_head(n, d, v, bias=opts.get("bias", False), gen=gen)
    labels = make_labels(n, v, ignored=0.2, gen=gen)
    g_lp, g_ent = torch.randn(n, generator=gen, dtype=torch.float64), torch.randn(n, generator=gen, dtype=torch.float64)
    kw = dict(temperature=opts.get("temperature", 1.0), softcap=opts.get("softcap"), return_entropy=True)

    def run(fn, cast, **extra):
        leaves = [None if t is None else cast(t).detach().requires_grad_() for t in (h, w, b)]
        lp, ent = fn(leaves[0], leaves[1], labels, leaves[2], **kw, **extra)
        loss = (lp.double() * g_lp).sum() + ((ent.double() * g_ent).sum() if opts.get("entropy") else 0)
        return (lp, ent), _grads(loss, leaves)

    truth, t_grads = run(ref.linear_logprobs, lambda t: t.double(), precision="fp64")
    naive, n_grads = run(ref.linear_logprobs, lambda t: t, precision="native")
    budget(4 * MiB)
    from fastpref.backends.contract import LogprobsOptions
    shape = torch_backend.logprobs_cache_shape(n, v, torch.float32, LogprobsOptions(cache=True))
    assert shape[0] == 1 and 0 < shape[1] < -(-v // shape[3]), f"not a partial cache: {shape}"
    out, o_grads = run(fp.linear_logprobs, lambda t: t, backend="torch")
    for name, o, nv, t in zip(("logp", "entropy"), out, naive, truth):
        assert_accurate(name, o, nv, t, torch.float32)
    for name, o, nv, t in zip(("d_hidden", "d_weight", "d_bias"), o_grads, n_grads, t_grads):
        assert_accurate(name, o, nv, t, torch.float32)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_divergence_with_a_partial_cache_matches_the_oracle(kind, gen, budget):
    n, d, v = 64, 32, 20000
    hs, ws, bs = make_head(n, d, v, bias=True, gen=gen)
    ht, wt, _ = make_head(n, d, v, gen=gen)
    labels = make_labels(n, v, ignored=0.2, gen=gen)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    kw = dict(kind=kind, beta=0.3, temperature=0.9, student_softcap=6.0)

    def run(fn, cast, **extra):
        leaves = [cast(t).detach().requires_grad_() for t in (hs, ws, bs)]
        div = fn(leaves[0], leaves[1], cast(ht), cast(wt), labels, student_bias=leaves[2], **kw, **extra)
        return div, _grads((div.double() * g).sum(), leaves)

    truth, t_grads = run(ref.linear_divergence, lambda t: t.double(), precision="fp64")
    naive, n_grads = run(ref.linear_divergence, lambda t: t, precision="native")
    budget(8 * MiB)  # two heads: 4 of 10 chunks kept
    assert torch_backend._plan(n, v, 4, heads=2, slots=torch_backend._DV_SLOTS, cache=True) == (n, 2048, 4)
    out, o_grads = run(fp.linear_divergence, lambda t: t, backend="torch")
    assert_accurate(kind, out, naive, truth, torch.float32)
    for name, o, nv, t in zip(("d_hidden", "d_weight", "d_bias"), o_grads, n_grads, t_grads):
        assert_accurate(name, o, nv, t, torch.float32)


def _backward_gemms(keep: bool, budget_bytes: int) -> int:
    from torch.profiler import profile

    fp.set_workspace_bytes(budget_bytes)
    fp.set_keep_logits(keep)
    h = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(20000, 32, requires_grad=True)
    out = fp.linear_logprobs(h, w, torch.randint(0, 20000, (64,)), backend="torch")
    with profile() as p:
        out.sum().backward()
    return sum(e.count for e in p.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::addmm_"))


def test_the_backward_recomputes_only_the_chunks_not_kept(budget):
    # 10 vocabulary chunks of all 64 rows: d hidden and d W are 2 GEMMs per chunk; the logits of the
    # 5 chunks that did not fit are recomputed (1 GEMM each), the 5 kept ones are read
    assert _backward_gemms(keep=True, budget_bytes=4 * MiB) == 2 * 10 + 5
    assert _backward_gemms(keep=False, budget_bytes=4 * MiB) == 3 * 10
