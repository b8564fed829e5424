"""torch.compile(fullgraph=True) of the public primitives on CPU (one graph for all three)."""

import pytest
import torch
from conftest import make_head, make_labels

import fastpref as fp


@pytest.mark.compile
def test_compile_fullgraph_primitives(gen):
    torch._dynamo.reset()
    n, d, v = 12, 8, 301
    h, w, b = make_head(n, d, v, bias=True, gen=gen)
    ht, wt, _ = make_head(n, d, v, gen=gen)
    labels = make_labels(n, v, ignored=0.25, gen=gen)

    def loss_fn(h, w, b):
        lp, ent = fp.linear_logprobs(h, w, labels, b, softcap=5.0, return_entropy=True, backend="torch")
        seq = fp.sequence_logprobs(h.view(3, 4, d), w, labels.view(3, 4), b, average=True, backend="torch")
        div = fp.linear_divergence(h, w, ht, wt, labels, student_bias=b, kind="jsd", beta=0.3, backend="torch")
        return lp.sum() + 0.1 * ent.sum() + seq.sum() + div.sum()

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (h, w, b)]
        out = fn(*leaves)
        out.backward()
        return out, [t.grad for t in leaves]

    eager_out, eager_grads = run(loss_fn)
    comp_out, comp_grads = run(torch.compile(loss_fn, fullgraph=True))
    torch.testing.assert_close(comp_out, eager_out, rtol=1e-5, atol=1e-5)
    for a, e in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


def test_import_is_light():
    """``import fastpref`` must not import torch._dynamo or triton (slow, and a Triton imported
    before TRITON_INTERPRET is set would run compiled kernels)."""
    import subprocess
    import sys

    code = "import sys, fastpref; print('triton' in sys.modules, 'torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"], out
