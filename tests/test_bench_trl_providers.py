"""The ``trl`` and ``torch-lce`` benchmark providers do the same useful work as the others: the same loss and
gradients as the naive provider, judged against the fp64 computation by the accuracy rule."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_accurate

from fastpref.bench import workloads as W
from fastpref.bench.cases import Case

CPU = torch.device("cpu")


def _loss_and_grads(fn, case, dtype=None):
    x = W.make_inputs(case, CPU)
    if dtype is not None:
        for name in W.TRAINABLE:
            x[name] = x[name].detach().to(dtype).requires_grad_(True)
        for name in ("ref_hidden", "ref_weight", "teacher_hidden", "teacher_weight", "grad_out"):
            if name in x:
                x[name] = x[name].to(dtype)
    loss = fn(*W.args_of(case, x))
    loss.backward()
    return [loss.detach()] + [t.grad for t in W.trainable(x)]


@pytest.mark.parametrize("provider", ["trl", "torch-lce"])
@pytest.mark.parametrize("workload", ["logprobs", "dpo", "pref_distill", "jsd"])
def test_provider_matches_naive(provider, workload):
    case = Case(workload, B=4, T=9, D=24, V=1031)
    reason = W.provider_skip_reason(workload, provider, CPU)
    if reason is not None:
        if provider == "torch-lce" and workload == "jsd":
            assert "cross-entropy only" in reason
        pytest.skip(reason)
    out = _loss_and_grads(W.loss_fn(workload, provider, CPU), case)
    naive = _loss_and_grads(W.NAIVE[workload], case)
    truth = _loss_and_grads(W.NAIVE[workload], case, dtype=torch.float64)
    for name, o, n, t in zip(("loss", "d_hidden", "d_weight"), out, naive, truth):
        assert_accurate(f"{provider}/{workload}/{name}", o.reshape(-1), n.reshape(-1), t.reshape(-1), torch.float32)


def test_providers_listed_with_reasons():
    assert {"trl", "torch-lce"} <= set(W.PROVIDERS)
    reason = W.provider_skip_reason("jsd", "torch-lce", CPU)
    assert reason is not None and "cross-entropy" in reason
