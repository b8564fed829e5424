"""The oracle itself, against values computed by hand with the math module."""

import math

import torch
import torch.nn.functional as F

from fastpref import reference as ref


def test_logprobs_hand_computed():
    # logits of the single row: [1, 0, 2] (+ bias [0, 0.5, 0]) -> [1, 0.5, 2]
    hidden = torch.tensor([[1.0, 0.0]])
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    bias = torch.tensor([0.0, 0.5, 0.0])
    lse = math.log(math.e + math.exp(0.5) + math.e**2)
    for label, z in ((0, 1.0), (1, 0.5), (2, 2.0)):
        logp, ent = ref.linear_logprobs(hidden, weight, torch.tensor([label]), bias, return_entropy=True)
        assert abs(logp.item() - (z - lse)) < 1e-14
        p = [math.exp(x - lse) for x in (1.0, 0.5, 2.0)]
        assert abs(ent.item() - (-sum(q * math.log(q) for q in p))) < 1e-14


def test_logprobs_scale_softcap_temperature_hand_computed():
    """TRL's / Hugging Face's order: scale, softcap, then temperature."""
    hidden = torch.tensor([[3.0]])
    weight = torch.tensor([[1.0], [-1.0], [0.5]])
    s, c, t = 1.5, 2.0, 0.7
    z = [c * math.tanh(s * u / c) / t for u in (3.0, -3.0, 1.5)]
    lse = math.log(sum(math.exp(x) for x in z))
    out = ref.linear_logprobs(hidden, weight, torch.tensor([1]), temperature=t, softcap=c, logit_scale=s,
                              outputs=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
    p = [math.exp(x - lse) for x in z]
    assert abs(out["logp"].item() - (z[1] - lse)) < 1e-14
    assert abs(out["entropy"].item() + sum(q * math.log(q) for q in p)) < 1e-14
    assert abs(out["log_sum_sq_probs"].item() - math.log(sum(q * q for q in p))) < 1e-14
    assert abs(out["mean_logits"].item() - sum(z) / 3) < 1e-14
    assert not out["is_top1"].item()
    top = ref.linear_logprobs(hidden, weight, torch.tensor([0]), temperature=t, softcap=c, logit_scale=s,
                              outputs=("is_top1",))
    assert top["is_top1"].item()


def test_is_top1_is_the_first_argmax():
    hidden = torch.tensor([[1.0]])
    weight = torch.tensor([[0.0], [2.0], [2.0], [1.0]])  # a tie between columns 1 and 2
    labels = torch.tensor([1])
    assert ref.linear_logprobs(hidden, weight, labels, outputs=("is_top1",))["is_top1"].item()
    assert not ref.linear_logprobs(hidden, weight, torch.tensor([2]), outputs=("is_top1",))["is_top1"].item()


def test_logprobs_ignored_rows_are_zero_and_match_cross_entropy():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(9, 5, generator=g), torch.randn(11, 5, generator=g)
    labels = torch.randint(0, 11, (9,), generator=g)
    labels[[2, 7]] = -100
    logp = ref.linear_logprobs(h, w, labels)
    assert logp[2] == 0 and logp[7] == 0
    ce = F.cross_entropy(h.double() @ w.double().T, labels, reduction="none")
    assert torch.allclose(logp, -ce, atol=1e-13, rtol=0)


def test_divergences_hand_computed():
    # two tokens; student logits [0, 0] -> ps = [.5, .5]; teacher logits [log 3, 0] -> pt = [.75, .25]
    f64 = torch.float64
    hs, ws = torch.tensor([[1.0]], dtype=f64), torch.tensor([[0.0], [0.0]], dtype=f64)
    ht, wt = torch.tensor([[1.0]], dtype=f64), torch.tensor([[math.log(3.0)], [0.0]], dtype=f64)
    ps, pt = [0.5, 0.5], [0.75, 0.25]
    kl = lambda p, q: sum(a * math.log(a / b) for a, b in zip(p, q))  # noqa: E731
    got = {k: ref.linear_divergence(hs, ws, ht, wt, kind=k, beta=0.3).item() for k in ("forward_kl", "reverse_kl", "jsd")}
    assert abs(got["forward_kl"] - kl(pt, ps)) < 1e-14
    assert abs(got["reverse_kl"] - kl(ps, pt)) < 1e-14
    m = [0.3 * a + 0.7 * b for a, b in zip(pt, ps)]
    assert abs(got["jsd"] - (0.3 * kl(pt, m) + 0.7 * kl(ps, m))) < 1e-14


def test_sequence_logprobs_sum_and_mean():
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(2, 4, 3, generator=g), torch.randn(7, 3, generator=g)
    labels = torch.randint(0, 7, (2, 4), generator=g)
    labels[0, 3] = -100
    labels[1, :] = -100
    tok = ref.linear_logprobs(h, w, labels)
    total = ref.sequence_logprobs(h, w, labels)
    mean = ref.sequence_logprobs(h, w, labels, average=True)
    assert torch.allclose(total, tok.sum(-1))
    assert torch.allclose(mean[0], tok[0, :3].mean()) and mean[1] == 0
