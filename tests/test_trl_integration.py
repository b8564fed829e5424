"""fastpref inside TRL 1.16: the drop-ins against TRL's own functions and an fp64 oracle, and real trainers
(DPO, KTO, GRPO, RLOO, SFT, distillation) run a few optimizer steps with stock TRL, with fastpref enabled, and
with an fp64 oracle head, from the same seed.

Trainer accuracy rule (docs/design.md §6, applied to whole runs): the oracle run is the ground truth (TRL with its head
replaced by materialised fp64 logits, everything else fp32), stock TRL is the "naive" fp32 run, and every logged
metric and every final parameter of the fastpref run must satisfy
``|fastpref - oracle| <= 2 * |stock - oracle| + 8 fp32 ulps of the largest value``.  The log prints both errors
and the direct ``|fastpref - stock|``.
"""

from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

if tuple(int(x) for x in trl.__version__.split(".")[:2]) < (1, 16):
    pytest.skip(f"needs trl >= 1.16, found {trl.__version__}", allow_module_level=True)

from conftest import assert_accurate  # noqa: E402

import fastpref  # noqa: E402
import fastpref.integrations.trl as fp_trl  # noqa: E402
from fastpref import objectives  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")

HAS_EXTRAS = "outputs" in fastpref.linear_logprobs.__code__.co_varnames
needs_extras = pytest.mark.skipif(not HAS_EXTRAS, reason="fastpref.linear_logprobs has no `outputs` (issue 11 item 1)")

VOCAB = 1024
HIDDEN = 32
WORDS = [f"w{i}" for i in range(VOCAB - 3)]
STEPS = 3


# --------------------------------------------------------------------------- toys: tokenizer, model, data


def make_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def make_model(seed=0, *, bias=False, head_scale=2.0, hidden=HIDDEN):
    """A 2-layer Llama with random weights; the head is rescaled so the logits have std ~ head_scale."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
        eos_token_id=1, bos_token_id=1, mlp_bias=False,
    )
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, head_scale / hidden**0.5)
        if bias:
            model.lm_head.bias = torch.nn.Parameter(torch.randn(VOCAB) * 0.5)
    return model


def _sentence(g, lo, hi):
    n = int(torch.randint(lo, hi + 1, (1,), generator=g))
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist())


def preference_data(n=8, seed=1, extra=None):
    g = torch.Generator().manual_seed(seed)
    rows = {
        "prompt": [_sentence(g, 3, 6) for _ in range(n)],
        "chosen": [" " + _sentence(g, 2, 5) for _ in range(n)],
        "rejected": [" " + _sentence(g, 2, 5) for _ in range(n)],
    }
    rows.update(extra or {})
    return datasets.Dataset.from_dict(rows)


def kto_data(n=8, seed=2):
    g = torch.Generator().manual_seed(seed)
    return datasets.Dataset.from_dict({
        "prompt": [_sentence(g, 3, 6) for _ in range(n)],
        "completion": [" " + _sentence(g, 2, 5) for _ in range(n)],
        "label": [bool(i % 2) for i in range(n)],
    })


def prompt_data(n=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    return datasets.Dataset.from_dict({"prompt": [_sentence(g, 3, 6) for _ in range(n)]})


def text_data(n=8, seed=4):
    g = torch.Generator().manual_seed(seed)
    return datasets.Dataset.from_dict({"text": [_sentence(g, 6, 12) for _ in range(n)]})


def toy_reward(completions, **kwargs):
    """Fraction of completion words with an even index: a reward the tiny model can move."""
    return [sum(int(w[1:]) % 2 == 0 for w in c.split() if w.startswith("w")) / max(len(c.split()), 1)
            for c in completions]


def common_args(tmp_path, **kw):
    """Plain SGD: the final parameters then differ between runs only as much as the gradients do (Adam's first
    steps are ~lr * sign(gradient), which turns rounding noise on near-zero gradients into lr-sized steps).  fp32:
    TRL's configs default to bf16 autocast, which the oracle does not model (bf16 is checked at the unit level)."""
    base = dict(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, logging_steps=1,
        optim="sgd", learning_rate=1e-2, save_strategy="no", report_to="none", use_cpu=True, seed=0, data_seed=0,
        disable_tqdm=True, lr_scheduler_type="constant", bf16=False,
    )
    base.update(kw)
    return base


# --------------------------------------------------------------------------- oracle head (fp64, materialised)


def _oracle_logits(hidden, weight, bias, scale, softcap, temperature):
    """fp64 logits of the inputs as TRL's head sees them: rounded to the autocast dtype when autocast is on."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        low = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(low), weight.to(low)
        bias = None if bias is None else bias.to(low)
    with torch.autocast(device, enabled=False):  # the fp64 math itself must not be autocast
        z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


class OracleLogProb:
    """TRL's fused-head contract, computed from the whole fp64 logits (written for the tests)."""

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=fp_trl.TRL_OPTIONAL_OUTPUTS):
        z = _oracle_logits(hidden, weight, bias, logit_scale, final_logit_softcapping, temperature)
        logsm = torch.log_softmax(z, -1)
        logp = logsm.gather(-1, targets.clamp(min=0)[:, None])[:, 0].float()
        ent = -(logsm.exp() * logsm).sum(-1).float() if "entropy" in outputs else None
        lssp = torch.logsumexp(2 * logsm, -1).float().detach() if "log_sum_sq_probs" in outputs else None
        mean = z.mean(-1).float().detach() if "mean_logits" in outputs else None
        top1 = (z.argmax(-1) == targets) if "is_top1" in outputs else None  # argmax: first maximum
        return logp, ent, lssp, mean, top1


class OracleDivergence:
    @staticmethod
    def apply(sh, sw, sb, th, tw, tb, beta, temperature=1.0, s_scale=1.0, s_cap=None, t_scale=1.0, t_cap=None):
        ls = torch.log_softmax(_oracle_logits(sh, sw, sb, s_scale, s_cap, temperature), -1)
        with torch.no_grad():
            lt = torch.log_softmax(_oracle_logits(th, tw, tb, t_scale, t_cap, temperature), -1)
        ps, pt = ls.exp(), lt.exp()
        if beta == 0.0:
            div = (pt * (lt - ls)).sum(-1)
        elif beta == 1.0:
            div = (ps * (ls - lt)).sum(-1)
        else:
            lm = torch.log(beta * pt + (1 - beta) * ps)
            div = beta * (pt * (lt - lm)).sum(-1) + (1 - beta) * (ps * (ls - lm)).sum(-1)
        return div.float(), (-(ps * ls).sum(-1)).float().detach()


@contextlib.contextmanager
def head(mode):
    """The head the trainers use: TRL's own ("stock"), fastpref ("fastpref") or the fp64 oracle ("oracle")."""
    if mode == "stock":
        yield
    elif mode == "fastpref":
        with fp_trl.enabled():
            yield
    else:
        import trl.trainer.distillation_trainer as dt
        import trl.trainer.utils as tu

        saved = (tu._ChunkedLogProbFunction, dt.ChunkedDivergenceFunction)
        tu._ChunkedLogProbFunction, dt.ChunkedDivergenceFunction = OracleLogProb, OracleDivergence
        try:
            yield
        finally:
            tu._ChunkedLogProbFunction, dt.ChunkedDivergenceFunction = saved


SKIP_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "step_time", "epoch", "step",
             "total_flos", "learning_rate", "train_loss"}


def _metrics(history):
    steps = [h for h in history if "train_runtime" not in h]
    out = {}
    for key in steps[0]:
        if key in SKIP_KEYS:
            continue
        vals = [h.get(key) for h in steps]
        if all(isinstance(v, (int, float)) and v is not None for v in vals):
            out[key] = torch.tensor(vals, dtype=torch.float64)
    return out


def compare_runs(name, runs):
    """Accuracy rule over every logged metric and every final parameter; returns the max |fastpref - stock|."""
    (m_o, p_o), (m_s, p_s), (m_f, p_f) = runs["oracle"], runs["stock"], runs["fastpref"]
    assert set(m_f) == set(m_s), f"{name}: logged keys differ: {sorted(set(m_f) ^ set(m_s))}"
    worst = 0.0
    for key in sorted(m_o):
        o, s, f = m_o[key], m_s[key], m_f[key]
        if torch.isnan(o).any() or torch.isnan(s).any():
            assert torch.equal(torch.isnan(f), torch.isnan(s)), f"{name}/{key}: NaN pattern differs"
            keep = ~torch.isnan(o) & ~torch.isnan(s)
            o, s, f = o[keep], s[keep], f[keep]
        assert_accurate(f"{name}/{key}", f, s, o, torch.float32)
        worst = max(worst, (f - s).abs().max().item() if f.numel() else 0.0)
    params_o = torch.cat([p_o[k].flatten() for k in sorted(p_o)]).double()
    params_s = torch.cat([p_s[k].flatten() for k in sorted(p_o)]).double()
    params_f = torch.cat([p_f[k].flatten() for k in sorted(p_o)]).double()
    assert_accurate(f"{name}/parameters", params_f, params_s, params_o, torch.float32)
    param_diff = (params_f - params_s).abs().max().item()
    print(f"{name}: max |fastpref - stock| metrics={worst:.3e} parameters={param_diff:.3e}")
    return worst, param_diff


def three_runs(build):
    """``build()`` -> a trainer; train it under each head, from the same seed."""
    runs = {}
    for mode in ("oracle", "stock", "fastpref"):
        with head(mode):
            trainer = build()
            trainer.train()
        params = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
        runs[mode] = (_metrics(trainer.state.log_history), params)
    return runs


# --------------------------------------------------------------------------- drop-ins, unit level


def _inputs(gen, n=37, d=24, v=1000, bias=False, scale=3.0):
    h = torch.randn(n, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) * (scale / d**0.5)
    b = torch.randn(v, generator=gen, dtype=torch.float64) * 0.5 if bias else None
    y = torch.randint(0, v, (n,), generator=gen)
    z = h @ w.T + (0 if b is None else b)  # every transform used here keeps the argmax
    y[::3] = z.argmax(-1)[::3]  # some labels are the top-1 token
    return h, w, b, y


def _leaf(t, dtype):
    return t.detach().to(dtype).clone().requires_grad_(True)


def _run_logprob(fn, h, w, b, y, gl, ge, dtype, outputs, autocast=None, **kw):
    hh, ww = _leaf(h, dtype), _leaf(w, dtype)
    bb = None if b is None else _leaf(b, dtype)
    # Forward under autocast when asked, backward outside it: what HF's Trainer does.
    with torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext():
        out = fn.apply(hh, ww, bb, y, kw.get("temperature", 1.0), 256, kw.get("softcap"),
                       kw.get("logit_scale", 1.0), outputs)
    loss = (out[0] * gl).sum() + ((out[1] * ge).sum() if out[1] is not None else 0.0)
    loss.backward()
    grads = (hh.grad, ww.grad) + ((bb.grad,) if bb is not None else ())
    return out, grads


LOGPROB_CASES = [
    pytest.param(dict(outputs=()), id="logp-only"),
    pytest.param(dict(outputs=("log_probs", "entropy")), id="entropy"),
    pytest.param(dict(outputs=("entropy",), temperature=0.7, bias=True), id="entropy-temp-bias"),
    pytest.param(dict(outputs=fp_trl.TRL_OPTIONAL_OUTPUTS), marks=needs_extras, id="all-extras"),
    pytest.param(dict(outputs=("entropy", "is_top1"), softcap=4.0, logit_scale=0.5, temperature=1.3),
                 marks=needs_extras, id="softcap-scale-temp"),
]


@pytest.mark.parametrize("case", LOGPROB_CASES)
def test_logprob_dropin_matches_oracle_and_trl(case, gen):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction as TRLFunction

    h, w, b, y = _inputs(gen, bias=case.get("bias", False))
    gl, ge = torch.randn(len(y), generator=gen), torch.randn(len(y), generator=gen)
    kw = {k: case[k] for k in ("temperature", "softcap", "logit_scale") if k in case}
    outputs = case["outputs"]
    truth, g_truth = _run_logprob(OracleLogProb, h, w, b, y, gl.double(), ge.double(), torch.float64, outputs, **kw)
    stock, g_stock = _run_logprob(TRLFunction, h, w, b, y, gl, ge, torch.float32, outputs, **kw)
    ours, g_ours = _run_logprob(fp_trl.ChunkedLogProbFunction, h, w, b, y, gl, ge, torch.float32, outputs, **kw)
    names = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
    for name, t, s, o in zip(names, truth, stock, ours):
        assert (o is None) == (s is None), f"{name}: fastpref gives {o is not None}, TRL gives {s is not None}"
        if o is None:
            continue
        if name == "is_top1":
            assert o.dtype == torch.bool and torch.equal(o, s) and torch.equal(o, t)
            assert o.any(), "test inputs should make some labels the argmax"
            continue
        assert o.dtype == torch.float32
        assert_accurate(name, o, s, t, torch.float32)
        if name in ("log_sum_sq_probs", "mean_logits"):
            assert not o.requires_grad
    for name, t, s, o in zip(("d_hidden", "d_weight", "d_bias"), g_truth, g_stock, g_ours):
        assert_accurate(name, o, s, t, torch.float32)


def test_logprob_dropin_autocast_bf16(gen):
    """Under autocast the head runs in the autocast dtype, as TRL's does; outputs fp32, grads in the input dtype."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction as TRLFunction

    h, w, b, y = _inputs(gen, n=64, d=32, v=1500)
    gl, ge = torch.randn(len(y), generator=gen), torch.randn(len(y), generator=gen)
    hb, wb = h.to(torch.bfloat16).double(), w.to(torch.bfloat16).double()  # what both compute on
    truth, g_truth = _run_logprob(OracleLogProb, hb, wb, None, y, gl.double(), ge.double(), torch.float64, ("entropy",))
    bf16 = dict(autocast=torch.bfloat16)
    stock, g_stock = _run_logprob(TRLFunction, h, w, None, y, gl, ge, torch.float32, ("entropy",), **bf16)
    ours, g_ours = _run_logprob(fp_trl.ChunkedLogProbFunction, h, w, None, y, gl, ge, torch.float32, ("entropy",), **bf16)
    for name, t, s, o in zip(("log_probs", "entropy"), truth, stock, ours):
        assert o.dtype == torch.float32
        assert_accurate(f"bf16/{name}", o, s, t, torch.bfloat16)
    for name, t, s, o in zip(("d_hidden", "d_weight"), g_truth, g_stock, g_ours):
        assert o.dtype == torch.float32  # the parameters' dtype, as with TRL
        assert_accurate(f"bf16/{name}", o, s, t, torch.bfloat16)


def _run_div(fn, sh, sw, th, tw, beta, dtype, g, **kw):
    s_h, s_w = _leaf(sh, dtype), _leaf(sw, dtype)
    div, ent = fn.apply(s_h, s_w, None, th.to(dtype), tw.to(dtype), None, beta, kw.get("temperature", 1.0),
                        kw.get("s_scale", 1.0), kw.get("s_cap"), kw.get("t_scale", 1.0), kw.get("t_cap"))
    (div * g).sum().backward()
    return (div, ent), (s_h.grad, s_w.grad)


DIV_CASES = [
    pytest.param(0.0, {}, id="forward_kl"),
    pytest.param(1.0, {}, id="reverse_kl"),
    pytest.param(0.5, dict(temperature=0.8), id="jsd-temp"),
    pytest.param(0.3, dict(s_cap=5.0, t_cap=3.0, s_scale=0.7, t_scale=1.2), id="jsd-softcap-scale"),
]


@pytest.mark.parametrize("beta,kw", DIV_CASES)
def test_divergence_dropin_matches_oracle_and_trl(beta, kw, gen):
    if not HAS_EXTRAS:
        pytest.skip("fastpref.linear_divergence has no return_entropy (issue 11 item 1)")
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction as TRLFunction

    sh, sw, _, _ = _inputs(gen, d=24)
    th, tw, _, _ = _inputs(gen, d=40)  # teacher of another width, same vocabulary
    g = torch.randn(sh.shape[0], generator=gen)
    truth, g_truth = _run_div(OracleDivergence, sh, sw, th, tw, beta, torch.float64, g.double(), **kw)
    stock, g_stock = _run_div(TRLFunction, sh, sw, th, tw, beta, torch.float32, g, **kw)
    ours, g_ours = _run_div(fp_trl.ChunkedDivergenceFunction, sh, sw, th, tw, beta, torch.float32, g, **kw)
    for name, t, s, o in zip(("divergence", "entropy"), truth, stock, ours):
        assert_accurate(name, o, s, t, torch.float32)
    assert not ours[1].requires_grad
    for name, t, s, o in zip(("d_hidden", "d_weight"), g_truth, g_stock, g_ours):
        assert_accurate(name, o, s, t, torch.float32)


@pytest.mark.parametrize("which", ["logprobs", pytest.param("divergence", marks=needs_extras)])
def test_zero3_path_recomputes_inside_the_gather(which, gen, monkeypatch):
    """Under ZeRO-3 the backward recomputes inside TRL's gather context and gives the direct path's results."""
    import trl.trainer.utils as tu

    h, w, _, y = _inputs(gen)
    th, tw, _, _ = _inputs(gen, d=40)
    gl, ge = torch.randn(len(y), generator=gen), torch.randn(len(y), generator=gen)

    def run():
        if which == "logprobs":
            out, grads = _run_logprob(fp_trl.ChunkedLogProbFunction, h, w, None, y, gl, ge, torch.float32, ("entropy",))
        else:
            out, grads = _run_div(fp_trl.ChunkedDivergenceFunction, h, w, th, tw, 0.4, torch.float32, gl)
        return out[:2], grads

    direct, g_direct = run()
    entered = []

    @contextlib.contextmanager
    def recording_gather(*params):
        entered.append(torch.is_grad_enabled())
        yield

    monkeypatch.setattr(fp_trl, "_zero3_enabled", lambda: True)
    monkeypatch.setattr(tu, "maybe_gather_lm_head_ctx", recording_gather)
    recomputed, g_rec = run()
    assert entered == [False, True], "expected one gather in forward (no graph) and one in backward (with a graph)"
    for a, b in zip(direct, recomputed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(g_direct, g_rec):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_enable_disable_and_bad_options():
    import trl.kernels as tk
    import trl.kernels.chunked_divergence as kd
    import trl.kernels.chunked_logprob as kl
    import trl.trainer.distillation_trainer as dt
    import trl.trainer.utils as tu

    original = (kl.ChunkedLogProbFunction, tk.ChunkedLogProbFunction, tu._ChunkedLogProbFunction,
                kd.ChunkedDivergenceFunction, dt.ChunkedDivergenceFunction)
    assert not fp_trl.is_enabled()
    fp_trl.enable()
    fp_trl.enable(backend="torch")  # idempotent; changes the backend
    try:
        assert fp_trl.is_enabled()
        for mod, attr in ((kl, "ChunkedLogProbFunction"), (tk, "ChunkedLogProbFunction"),
                          (tu, "_ChunkedLogProbFunction")):
            assert getattr(mod, attr) is fp_trl.ChunkedLogProbFunction
        for mod in (kd, dt):
            assert mod.ChunkedDivergenceFunction is fp_trl.ChunkedDivergenceFunction
        with fp_trl.enabled(backend="auto"):
            assert tu._ChunkedLogProbFunction is fp_trl.ChunkedLogProbFunction
        assert fp_trl.is_enabled(), "leaving a nested enabled() keeps the outer enable()"
    finally:
        fp_trl.disable()
    assert (kl.ChunkedLogProbFunction, tk.ChunkedLogProbFunction, tu._ChunkedLogProbFunction,
            kd.ChunkedDivergenceFunction, dt.ChunkedDivergenceFunction) == original
    with fp_trl.enabled():
        # a TRL module imported while enabled binds the drop-in by name; disable() restores it there too
        import sys
        import types

        late = types.ModuleType("trl._late_import_for_test")
        late.ChunkedLogProbFunction = kl.ChunkedLogProbFunction
        sys.modules[late.__name__] = late
    try:
        assert late.ChunkedLogProbFunction is original[0]
    finally:
        del sys.modules[late.__name__]
    assert tu._ChunkedLogProbFunction is original[2] and not fp_trl.is_enabled()

    with pytest.raises(ValueError, match="backend"):
        fp_trl.enable(backend="cupy")
    h, w = torch.randn(4, 8), torch.randn(50, 8)
    y = torch.randint(0, 50, (4,))
    with pytest.raises(ValueError, match="outputs"):
        fp_trl.ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 64, None, 1.0, ("log_probs", "top5"))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        fp_trl.ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 64, 0.0, 1.0, ())
    with pytest.raises(ValueError, match="temperature"):
        fp_trl.ChunkedLogProbFunction.apply(h, w, None, y, 0.0, 64, None, 1.0, ())
    with pytest.raises(ValueError, match="beta"):
        fp_trl.ChunkedDivergenceFunction.apply(h, w, None, h, w, None, 1.5)


# --------------------------------------------------------------------------- real trainers: stock vs fastpref


def _dpo_builder(tmp_path, tok, **cfg):
    def build():
        model = make_model(0)
        args = trl.DPOConfig(**common_args(tmp_path, **cfg))
        return trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                              train_dataset=preference_data(), processing_class=tok)
    return build


DPO_CASES = [
    pytest.param(dict(loss_type=["sigmoid"]), id="sigmoid"),
    pytest.param(dict(loss_type=["sigmoid", "ipo", "bco_pair"], loss_weights=[1.0, 0.5, 0.2]), id="weighted-list"),
    pytest.param(dict(loss_type=["sigmoid"], precompute_ref_log_probs=True), id="precompute-ref"),
    pytest.param(dict(loss_type=["sigmoid"], bf16=True), id="sigmoid-bf16-autocast"),
    pytest.param(dict(loss_type=["robust", "exo_pair"], label_smoothing=0.1, use_weighting=True),
                 marks=pytest.mark.slow, id="robust-exo-wpo"),
    pytest.param(dict(loss_type=["apo_zero", "sppo_hard", "nca_pair", "discopop", "sft"]),
                 marks=pytest.mark.slow, id="five-more"),
]


@needs_extras
@pytest.mark.parametrize("cfg", DPO_CASES)
def test_dpo_same_as_stock(cfg, tmp_path, request):
    runs = three_runs(_dpo_builder(tmp_path, make_tokenizer(), **cfg))
    compare_runs(f"dpo[{request.node.callspec.id}]", runs)


@needs_extras
def test_kto_same_as_stock(tmp_path):
    tok = make_tokenizer()

    def build():
        model = make_model(0)
        args = trl.KTOConfig(**common_args(tmp_path))
        return trl.KTOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=kto_data(),
                              processing_class=tok)

    compare_runs("kto", three_runs(build))


@needs_extras
def test_sft_same_as_stock(tmp_path):
    tok = make_tokenizer()

    def build():
        args = trl.SFTConfig(**common_args(tmp_path, max_length=32))
        return trl.SFTTrainer(model=make_model(0), args=args, train_dataset=text_data(), processing_class=tok)

    compare_runs("sft", three_runs(build))


def _grpo_like(trainer_cls, config_cls, tmp_path, tok, **cfg):
    # These trainers load their reference model from the policy's path: save the initial weights locally.
    init_dir = tmp_path / "init"
    make_model(0).save_pretrained(init_dir)

    def build():
        model = make_model(0)
        model.config._name_or_path = str(init_dir)
        args = config_cls(**common_args(tmp_path, num_generations=4, max_completion_length=6, **cfg))
        return trainer_cls(model=model, reward_funcs=toy_reward, args=args, train_dataset=prompt_data(),
                           processing_class=tok)
    return build


@pytest.mark.parametrize("bf16", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["fp32", "bf16-autocast"])
def test_grpo_same_as_stock(bf16, tmp_path):
    """bf16: TRL's default autocast; the oracle is fp64 on the bf16-rounded head inputs (stock TRL also rounds its
    logits tiles to bf16, fastpref keeps them in fp32, so its error is far below the bound there)."""
    runs = three_runs(_grpo_like(trl.GRPOTrainer, trl.GRPOConfig, tmp_path, make_tokenizer(), beta=0.04, bf16=bf16))
    compare_runs(f"grpo[{'bf16' if bf16 else 'fp32'}]", runs)


@pytest.mark.slow
def test_rloo_same_as_stock(tmp_path):
    runs = three_runs(_grpo_like(trl.RLOOTrainer, trl.RLOOConfig, tmp_path, make_tokenizer()))
    compare_runs("rloo", runs)


DISTILL_BETAS = [pytest.param(0.5, id="jsd"), pytest.param(0.0, marks=pytest.mark.slow, id="forward_kl"),
                 pytest.param(1.0, marks=pytest.mark.slow, id="reverse_kl")]


@pytest.mark.parametrize("beta", DISTILL_BETAS)
def test_distillation_same_as_stock(beta, tmp_path):
    if not HAS_EXTRAS:
        pytest.skip("fastpref.linear_divergence has no return_entropy (issue 11 item 1)")
    tok = make_tokenizer()

    def build():
        args = trl.DistillationConfig(**common_args(tmp_path, beta=beta, max_completion_length=6,
                                                    gradient_checkpointing=False))
        return trl.DistillationTrainer(model=make_model(0), teacher_model=make_model(7, hidden=48), args=args,
                                       train_dataset=prompt_data(), processing_class=tok)

    compare_runs(f"distillation[beta={beta}]", three_runs(build))


# --------------------------------------------------------------------------- the paper's objectives as TRL trainers

from fastpref.integrations.trl_trainers import (  # noqa: E402
    DistributionDPOConfig,
    DistributionDPOTrainer,
    ReverseKLConfig,
    ReverseKLTrainer,
)


def _batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def _full_logits(model, batch, dtype):
    """Materialised logits of a copy of ``model`` in ``dtype`` (the oracle for sequence log-probs)."""
    m = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        return m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].to(dtype)


def _seq_logps(model, batch, dtype):
    logsm = torch.log_softmax(_full_logits(model, batch, dtype), -1)
    tok = logsm.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (tok * batch["completion_mask"][:, 1:]).sum(1)


def _seq_kl(model, ref_model, batch, dtype):
    ls = torch.log_softmax(_full_logits(model, batch, dtype), -1)
    lr = torch.log_softmax(_full_logits(ref_model, batch, dtype), -1)
    return ((ls.exp() * (ls - lr)).sum(-1) * batch["completion_mask"][:, 1:]).sum(1)


def _distribution_trainer(tmp_path, data, policy_seed=0, ref_seed=5, **cfg):
    args = DistributionDPOConfig(**common_args(tmp_path, **cfg))
    return DistributionDPOTrainer(model=make_model(policy_seed), ref_model=make_model(ref_seed), args=args,
                                  train_dataset=data, processing_class=make_tokenizer())


def _expected(loss_type, lw, ll, gamma, batch):
    if loss_type == "pmle":
        return objectives.pmle(lw, ll, gamma=gamma).mean()
    if "target_prob" in batch:
        return objectives.preference_distillation(lw, ll, gamma=gamma, target_prob=batch["target_prob"].double()).mean()
    return objectives.preference_distillation(lw, ll, gamma=gamma, reward_a=batch["reward_chosen"].double(),
                                              reward_b=batch["reward_rejected"].double()).mean()


OBJECTIVE_CASES = [
    pytest.param("pmle", {}, dict(kl_coef=0.0), id="pmle"),
    pytest.param("pmle", {}, dict(kl_coef=0.3), id="pmle-kl-sampled"),
    pytest.param("pmle", {}, dict(kl_coef=0.3, kl_estimator="token_exact"), id="pmle-kl-token-exact"),
    pytest.param("preference_distillation", "rewards", dict(kl_coef=0.05), id="pd-rewards"),
    pytest.param("preference_distillation", "target_prob", dict(target_prob_column="target_prob"), id="pd-target"),
]


@pytest.mark.parametrize("loss_type,columns,cfg", OBJECTIVE_CASES)
def test_distribution_trainer_loss_equals_objectives(loss_type, columns, cfg, tmp_path):
    g = torch.Generator().manual_seed(11)
    extra = {}
    if columns == "rewards":
        extra = {"reward_chosen": torch.randn(8, generator=g).tolist(), "reward_rejected": torch.randn(8, generator=g).tolist()}
    elif columns == "target_prob":
        extra = {"target_prob": torch.rand(8, generator=g).tolist()}
    gamma = 0.5
    trainer = _distribution_trainer(tmp_path, preference_data(extra=extra), loss_type=[loss_type], gamma=gamma, **cfg)
    batch = _batch(trainer)
    loss = trainer.compute_loss(trainer.model, dict(batch))

    def expected(dtype):
        logps = _seq_logps(trainer.model, batch, dtype)
        p = logps.shape[0] // 2
        total = _expected(loss_type, logps[:p], logps[p:], gamma, batch)
        if cfg.get("kl_coef"):
            if cfg.get("kl_estimator") == "token_exact":
                kl = _seq_kl(trainer.model, trainer.ref_model, batch, dtype)
            else:
                kl = logps - _seq_logps(trainer.ref_model, batch, dtype)
            total = total + cfg["kl_coef"] * (0.5 * (kl[:p] + kl[p:])).mean()
        return total

    assert_accurate(f"{loss_type}/loss", loss.detach().reshape(1), expected(torch.float32).reshape(1),
                    expected(torch.float64).reshape(1), torch.float32)
    assert loss.requires_grad
    mode_metrics = trainer._metrics["train"]
    assert f"{loss_type}/loss" in mode_metrics and ("kl" in mode_metrics) == bool(cfg.get("kl_coef"))


def test_distribution_trainer_combines_with_trl_losses(tmp_path):
    """A weighted list mixing TRL's types and the paper's: TRL's part is exactly what DPOTrainer computes."""
    data = preference_data()
    gamma, kl_coef = 0.2, 0.1
    mixed = _distribution_trainer(tmp_path, data, loss_type=["sigmoid", "pmle", "ipo"], loss_weights=[1.0, 0.7, 0.3],
                                  gamma=gamma, kl_coef=kl_coef)
    stock = trl.DPOTrainer(model=make_model(0), ref_model=make_model(5), train_dataset=data,
                           processing_class=make_tokenizer(),
                           args=trl.DPOConfig(**common_args(tmp_path, loss_type=["sigmoid", "ipo"],
                                                            loss_weights=[1.0, 0.3])))
    batch = _batch(mixed)
    got = mixed.compute_loss(mixed.model, dict(batch)).detach()
    trl_part = stock.compute_loss(stock.model, dict(batch)).detach()
    logps = _seq_logps(mixed.model, batch, torch.float64)
    ref = _seq_logps(mixed.ref_model, batch, torch.float64)
    p = logps.shape[0] // 2
    ours = 0.7 * objectives.pmle(logps[:p], logps[p:], gamma=gamma).mean()
    ours = ours + kl_coef * (0.5 * ((logps - ref)[:p] + (logps - ref)[p:])).mean()
    torch.testing.assert_close(got.double(), trl_part.double() + ours, rtol=2e-6, atol=2e-6)
    assert mixed.args.loss_type == ["sigmoid", "pmle", "ipo"], "the user's config is left as given"


def test_distribution_trainer_bad_options(tmp_path):
    with pytest.raises(ValueError, match="gamma"):
        _distribution_trainer(tmp_path, preference_data(), loss_type=["pmle"], gamma=0.0)
    with pytest.raises(ValueError, match="kl_estimator"):
        _distribution_trainer(tmp_path, preference_data(), loss_type=["pmle"], kl_coef=0.1, kl_estimator="exact")
    with pytest.raises(ValueError, match="kl_estimator"):
        _distribution_trainer(tmp_path, preference_data(), loss_type=["pmle"], kl_coef=0.1,
                              kl_estimator="token_exact", precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="use_weighting"):
        _distribution_trainer(tmp_path, preference_data(), loss_type=["pmle"], use_weighting=True)
    trainer = _distribution_trainer(tmp_path, preference_data(), loss_type=["preference_distillation"])
    with pytest.raises(ValueError, match="reward_chosen"):
        _batch(trainer)


def _two_answer_data(n, p_star):
    """One prompt, two one-word answers A and B; 'A over B' in a fraction p_star of the pairs (exactly)."""
    a_wins = [i < round(p_star * n) for i in range(n)]
    return datasets.Dataset.from_dict({
        "prompt": ["w10 w11 w12"] * n,
        "chosen": [" w20" if w else " w30" for w in a_wins],
        "rejected": [" w30" if w else " w20" for w in a_wins],
        "target_prob": [p_star if w else 1 - p_star for w in a_wins],
    })


def _preference_prob(model, tok, gamma):
    """σ(γ (ℓ(A) - ℓ(B))) under ``model`` (ℓ includes the EOS the trainer appends)."""
    ids = [tok("w10 w11 w12 w20<eos>".replace("<eos>", " <eos>"))["input_ids"],
           tok("w10 w11 w12 w30 <eos>")["input_ids"]]
    x = torch.tensor(ids)
    with torch.no_grad():
        logsm = torch.log_softmax(model(input_ids=x).logits[:, :-1].double(), -1)
    tok_lp = logsm.gather(-1, x[:, 1:, None])[..., 0][:, 2:]  # the answer and EOS
    la, lb = tok_lp.sum(1)
    return torch.sigmoid(gamma * (la - lb)).item()


@needs_extras
@pytest.mark.parametrize("loss_type", ["pmle", pytest.param("preference_distillation", marks=pytest.mark.slow)])
def test_distribution_trainer_moves_policy_toward_target(loss_type, tmp_path):
    """Pairs with P(A ≻ B) = 0.25: both objectives' optimum has σ(γ(ℓ(A) - ℓ(B))) = 0.25 (the start is ~0.78)."""
    p_star, gamma = 0.25, 0.5
    data = _two_answer_data(8, p_star)
    # Full batches (every pair in every step: no sampling noise), AdamW, 24 steps.
    cfg = dict(loss_type=[loss_type], gamma=gamma, max_steps=24, learning_rate=3e-3, optim="adamw_torch",
               per_device_train_batch_size=8)
    if loss_type == "preference_distillation":
        cfg["target_prob_column"] = "target_prob"
    trainer = _distribution_trainer(tmp_path, data, **cfg)
    tok = make_tokenizer()
    before = _preference_prob(trainer.model, tok, gamma)
    with fp_trl.enabled():
        trainer.train()
    after = _preference_prob(trainer.model, tok, gamma)
    print(f"{loss_type}: P(A > B) {before:.3f} -> {after:.3f} (target {p_star})")
    assert abs(after - p_star) < 0.5 * abs(before - p_star), (before, after)
    assert abs(after - p_star) < 0.1


# --------------------------------------------------------------------------- reverse KL on RLOO


def _entropy_sums(model, prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Σ_t H(π(·|y<t)) over each completion, from the materialised fp64 logits."""
    ids = torch.cat([prompt_ids, completion_ids], 1)
    att = torch.cat([prompt_mask, completion_mask], 1)
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        logits = m(input_ids=ids, attention_mask=att).logits[:, -completion_ids.size(1) - 1:-1]
    logsm = torch.log_softmax(logits, -1)
    return (-(logsm.exp() * logsm).sum(-1) * completion_mask).sum(1)


@pytest.mark.parametrize("estimator", ["token_exact", "sequence"])
def test_reverse_kl_trainer(estimator, tmp_path):
    gamma = 0.05
    init_dir = tmp_path / "init"
    make_model(0).save_pretrained(init_dir)
    model = make_model(0)
    model.config._name_or_path = str(init_dir)
    initial = copy.deepcopy(model)
    args = ReverseKLConfig(**common_args(tmp_path, num_generations=4, max_completion_length=6, max_steps=1,
                                         entropy_coef=gamma, entropy_estimator=estimator))
    trainer = ReverseKLTrainer(model=model, reward_funcs=toy_reward, args=args, train_dataset=prompt_data(),
                               processing_class=make_tokenizer())
    seen = {}
    calc, gen, loss_fn = trainer._calculate_rewards, trainer._generate_and_score_completions, trainer._compute_loss

    def spy_rewards(*a, **k):
        seen["rewards"] = calc(*a, **k)
        return seen["rewards"]

    def spy_gen(*a, **k):
        seen["rollout"] = gen(*a, **k)
        return seen["rollout"]

    def spy_loss(model, inputs):
        seen["inputs"] = inputs
        return loss_fn(model, inputs)

    trainer._calculate_rewards, trainer._generate_and_score_completions = spy_rewards, spy_gen
    trainer._compute_loss = spy_loss
    with fp_trl.enabled():
        trainer.train()
    assert trainer.reward_func_names == ["toy_reward", "entropy_bonus"]
    r = seen["rollout"]
    bonus = seen["rewards"][:, 1].double()
    if estimator == "token_exact":
        expected = gamma * _entropy_sums(initial, r["prompt_ids"], r["prompt_mask"], r["completion_ids"],
                                         r["completion_mask"])
    else:
        expected = -gamma * r["old_logps"].double()
    torch.testing.assert_close(bonus, expected, rtol=1e-5, atol=1e-6)
    assert "rewards/entropy_bonus/mean" in trainer.state.log_history[0]

    # The training loss: RLOO's own minus γ·mean(Σ_t H_t) for token_exact, RLOO's own for sequence.
    inputs = seen["inputs"]
    with fp_trl.enabled():
        got = trainer._compute_loss(trainer.model, inputs)
        base = trl.RLOOTrainer._compute_loss(trainer, trainer.model, inputs)
    if estimator == "token_exact":
        ent = _entropy_sums(trainer.model, inputs["prompt_ids"], inputs["prompt_mask"], inputs["completion_ids"],
                            inputs["completion_mask"])
        torch.testing.assert_close(got.double(), base.double() - gamma * ent.mean(), rtol=1e-5, atol=1e-6)
        got.backward()  # the pathwise entropy term reaches the head
        assert trainer.model.lm_head.weight.grad is not None
    else:
        torch.testing.assert_close(got, base)


# --------------------------------------------------------------------------- the examples, in their --tiny mode


@contextlib.contextmanager
def example(name):
    """The example script ``examples/<name>.py`` as a module, with examples/ importable (its trl_tiny helper)."""
    import importlib.util
    import pathlib
    import sys

    examples = str(pathlib.Path(__file__).resolve().parents[1] / "examples")
    sys.path.insert(0, examples)
    try:
        spec = importlib.util.spec_from_file_location(f"example_{name}", f"{examples}/{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(examples)


@needs_extras
@pytest.mark.parametrize("loss", ["pmle", "preference_distillation"])
def test_example_trl_pmle(loss, tmp_path):
    with example("trl_pmle") as module:
        trainer = module.main(["--tiny", "--loss", loss, "--max-steps", "2", "--output-dir", str(tmp_path)])
    assert any(f"{loss}/loss" in h for h in trainer.state.log_history)
    assert not fp_trl.is_enabled()


def test_example_trl_reverse_kl(tmp_path):
    with example("trl_reverse_kl") as module:
        trainer = module.main(["--tiny", "--max-steps", "1", "--output-dir", str(tmp_path)])
    assert "rewards/entropy_bonus/mean" in trainer.state.log_history[0]
    assert not fp_trl.is_enabled()


# --------------------------------------------------------------------------- FSDP2-style DTensor head (2 gloo ranks)


def _dtensor_rank(rank, world, port, queue):
    import sys

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sys.path.insert(0, os.path.dirname(__file__))
    import test_trl_integration as T
    from trl.trainer.utils import add_fused_lm_head

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for mode in ("oracle", "stock", "fastpref"):
        model = T.make_model(0)
        sharded = distribute_tensor(model.lm_head.weight.detach(), mesh, [Shard(0)])  # vocabulary-sharded head
        model.lm_head.weight = torch.nn.Parameter(sharded)
        add_fused_lm_head(model, temperature=0.9, outputs=("log_probs", "entropy"))
        g = torch.Generator().manual_seed(5)
        ids = torch.randint(3, VOCAB, (2, 12), generator=g)
        labels = ids.masked_fill(torch.arange(12) < 4, -100)
        with T.head(mode):
            res = model(input_ids=ids, labels=labels, fused_lm_head=True)
            (res.log_probs.sum() + 0.3 * res.entropy.sum()).backward()
        assert type(model.lm_head.weight.grad).__name__ == "DTensor"
        out[mode] = [t.numpy().copy() for t in (res.log_probs.detach(), res.entropy.detach(),
                                                model.lm_head.weight.grad.full_tensor(),
                                                model.model.embed_tokens.weight.grad)]
    queue.put((rank, out))  # numpy arrays travel by value (tensors would be shared memory of an exiting process)
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_dtensor_head_two_ranks():
    """TRL gathers a vocabulary-sharded DTensor head before the fused call: with fastpref enabled the outputs and
    the (DTensor) head gradient match stock TRL by the accuracy rule, on 2 gloo ranks."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_dtensor_rank, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, out in results.items():
        for i, name in enumerate(("log_probs", "entropy", "d_lm_head", "d_embed")):
            o, s_, t = (torch.from_numpy(out[m][i]) for m in ("fastpref", "stock", "oracle"))
            assert_accurate(f"rank{rank}/{name}", o, s_, t, torch.float32)
