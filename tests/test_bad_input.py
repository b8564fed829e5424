"""Bad input for the primitives: each bad input raises the right error naming the argument;
all-ignored batches give 0 with zero gradients; NaN propagates as NaN."""

import math

import pytest
import torch
from conftest import make_head, make_labels

import fastpref as fp
from fastpref.backends.contract import LogprobsOptions
from fastpref.primitives import logprobs_rows

N, D, V = 6, 4, 10


@pytest.fixture
def head(gen):
    h, w, b = make_head(N, D, V, bias=True, gen=gen)
    return h, w, b, make_labels(N, V, gen=gen)


def _raises(exc, name, fn, *a, **kw):
    with pytest.raises(exc) as info:
        fn(*a, **kw)
    assert name in str(info.value), f"message does not name {name!r}: {info.value}"
    return str(info.value)


LOGPROB_BAD = [
    ("hidden-not-tensor", TypeError, "hidden", lambda h, w, b, y: (h.tolist(), w, y, b), {}),
    ("hidden-int", TypeError, "hidden", lambda h, w, b, y: (h.long(), w, y, b), {}),
    ("hidden-D-mismatch", ValueError, "hidden", lambda h, w, b, y: (h[:, :3], w, y, b), {}),
    ("weight-1d", ValueError, "weight", lambda h, w, b, y: (h, w[0], y, b), {}),
    ("weight-dtype", TypeError, "weight", lambda h, w, b, y: (h, w.double(), y, b), {}),
    ("weight-device", ValueError, "weight", lambda h, w, b, y: (h, w.to("meta"), y, b), {}),
    ("bias-shape", ValueError, "bias", lambda h, w, b, y: (h, w, y, b[:-1]), {}),
    ("bias-dtype", TypeError, "bias", lambda h, w, b, y: (h, w, y, b.half()), {}),
    ("labels-float", TypeError, "labels", lambda h, w, b, y: (h, w, y.float(), b), {}),
    ("labels-shape", ValueError, "labels", lambda h, w, b, y: (h, w, y[:-1], b), {}),
    ("labels-too-large", ValueError, "labels", lambda h, w, b, y: (h, w, torch.full_like(y, V), b), {}),
    ("labels-negative", ValueError, "labels", lambda h, w, b, y: (h, w, torch.full_like(y, -3), b), {}),
    ("temperature-zero", ValueError, "temperature", lambda *t: (t[0], t[1], t[3], t[2]), {"temperature": 0.0}),
    ("temperature-nan", ValueError, "temperature", lambda *t: (t[0], t[1], t[3], t[2]), {"temperature": math.nan}),
    ("temperature-str", TypeError, "temperature", lambda *t: (t[0], t[1], t[3], t[2]), {"temperature": "1"}),
    ("softcap-negative", ValueError, "softcap", lambda *t: (t[0], t[1], t[3], t[2]), {"softcap": -1.0}),
    ("softcap-inf", ValueError, "softcap", lambda *t: (t[0], t[1], t[3], t[2]), {"softcap": math.inf}),
    ("ignore-index-float", TypeError, "ignore_index", lambda *t: (t[0], t[1], t[3], t[2]), {"ignore_index": -100.0}),
    ("backend-unknown", ValueError, "backend", lambda *t: (t[0], t[1], t[3], t[2]), {"backend": "numpy"}),
]


@pytest.mark.parametrize("case", LOGPROB_BAD, ids=[c[0] for c in LOGPROB_BAD])
def test_linear_logprobs_bad_input(case, head):
    _, exc, name, make_args, kw = case
    _raises(exc, name, fp.linear_logprobs, *make_args(*head), **kw)


def test_out_of_range_label_message_gives_value(head):
    h, w, b, y = head
    y = y.clone()
    y[3] = V + 5
    msg = _raises(ValueError, "labels", fp.linear_logprobs, h, w, y, b)
    assert str(V + 5) in msg and f"[0, {V})" in msg


def test_unavailable_backend_says_why(head):
    h, w, b, y = head
    msg = _raises(RuntimeError, "backend", fp.linear_logprobs, h, w, y, b, backend="cuda")
    assert "cuda" in msg and "cpu" in msg


def test_env_override_is_validated(head, monkeypatch):
    h, w, b, y = head
    monkeypatch.setenv("FASTPREF_BACKEND", "bogus")
    _raises(ValueError, "backend", fp.linear_logprobs, h, w, y, b)


def test_backend_kernel_never_reads_out_of_bounds(head):
    """Past the eager check (as on a GPU or under torch.compile), a bad label gives NaN, not a read."""
    h, w, b, y = head
    y = y.clone()
    y[0], y[1], y[2] = V, -7, -100
    logp = logprobs_rows(h, w, y, b, LogprobsOptions(), "torch").logp  # the unchecked internal call
    assert torch.isnan(logp[0]) and torch.isnan(logp[1]) and logp[2] == 0
    assert torch.isfinite(logp[3:]).all()


DIV_BAD = [
    ("teacher-vocab", ValueError, "teacher_weight", dict(teacher_weight=lambda w: w[:-1])),
    ("teacher-rows", ValueError, "teacher_hidden", dict(teacher_hidden=lambda h: h[:-1])),
    ("teacher-dtype", TypeError, "teacher_weight", dict(teacher_weight=lambda w: w.double())),
    ("student-D", ValueError, "student_hidden", dict(student_hidden=lambda h: h[:, :2])),
    ("kind", ValueError, "kind", dict(kind="tv")),
    ("beta-above-1", ValueError, "beta", dict(beta=1.5)),
    ("beta-nan", ValueError, "beta", dict(beta=math.nan)),
    ("temperature", ValueError, "temperature", dict(temperature=-2.0)),
    ("labels-shape", ValueError, "labels", dict(labels=lambda y: y[:-1])),
    ("labels-float", TypeError, "labels", dict(labels=lambda y: y.float())),
]


@pytest.mark.parametrize("case", DIV_BAD, ids=[c[0] for c in DIV_BAD])
def test_linear_divergence_bad_input(case, head):
    _, exc, name, change = case
    h, w, _, y = head
    args = dict(student_hidden=h, student_weight=w, teacher_hidden=h.clone(), teacher_weight=w.clone(), labels=y)
    kw = {}
    for key, val in change.items():
        if key in args:
            args[key] = val(args[key])
        else:
            kw[key] = val
    _raises(exc, name, fp.linear_divergence, *args.values(), **kw)


def test_all_ignored_gives_zero_and_zero_grads(head):
    h, w, b, y = head
    h, w, b = (t.clone().requires_grad_() for t in (h, w, b))
    y = torch.full_like(y, -100)
    lp, ent = fp.linear_logprobs(h, w, y, b, return_entropy=True, backend="torch")
    seq = fp.sequence_logprobs(h.view(2, 3, D), w, y.view(2, 3), b, average=True, backend="torch")
    div = fp.linear_divergence(h, w, h.detach() * 2, w.detach(), y, student_bias=b, kind="jsd", backend="torch")
    loss = lp.sum() + ent.sum() + seq.sum() + div.sum()
    loss.backward()
    assert loss.item() == 0.0 and math.isfinite(loss.item())
    for t in (h, w, b):
        assert (t.grad == 0).all()


def test_empty_batch(gen):
    h, w, _ = make_head(0, D, V, gen=gen)
    out = fp.linear_logprobs(h, w, torch.empty(0, dtype=torch.long), backend="torch")
    assert out.shape == (0,)


@pytest.mark.parametrize("where", ["hidden", "weight"])
def test_nan_propagates(where, head):
    h, w, b, y = head
    h, w = h.clone(), w.clone()
    (h if where == "hidden" else w)[1, 2] = float("nan")
    lp = fp.linear_logprobs(h, w, y, b, backend="torch")
    assert torch.isnan(lp[1])
    div = fp.linear_divergence(h, w, h.nan_to_num(), w.nan_to_num(), kind="reverse_kl", backend="torch")
    assert torch.isnan(div[1])


def test_empty_batch_gives_zero_gradients(gen, keep_logits):
    """No rows: the head's gradient is exactly zero (never uninitialised memory); both backward paths."""
    h, w, b = make_head(0, D, V, bias=True, gen=gen)
    h, w, b = h.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    fp.linear_logprobs(h, w, torch.zeros(0, dtype=torch.long), b, return_entropy=True)[0].sum().backward()
    ht, wt, _ = make_head(0, D, V, gen=gen)
    ws = w.detach().clone().requires_grad_()
    fp.linear_divergence(h.detach(), ws, ht, wt, kind="jsd").sum().backward()
    assert h.grad.shape == (0, D)
    assert (w.grad == 0).all() and (b.grad == 0).all() and (ws.grad == 0).all()
