"""fastpref's losses against TRL 1.16's own loss code, on the same inputs, in float64.

TRL's trainers compute their losses inside methods that also run the model.  Each trainer is made
with ``__new__`` (no ``__init__``: no tokenizer, dataset or download) and given by hand the few
attributes its loss method reads; the "model" is a stand-in whose hidden states are a token
embedding plus a position embedding, projected by an LM head.  For ``DPOTrainer`` and ``KTOTrainer``
the stand-in also plays TRL's fused LM head (per-token log-probs, entropy, mean logits, top-1 flags,
log Σp² — computed here in float64 from the materialised logits); ``CPOTrainer``, ``ORPOTrainer`` get
plain logits.  Everything after that is TRL's code.  fastpref gets the same hidden states (the
positions TRL scores, shifted) and head.  Both losses are differentiated with respect to the
embeddings and the head and compared value by value and gradient by gradient.

Each test prints ``TRL <family> <case>: |loss diff| ... |grad diff| ...``; run with ``-s`` to see them.
Where TRL computes in float32 even for float64 inputs (ORPO's odds, its chunked distillation head,
α-divergence which has no float64 branch), the bound is float32's, and says so.
"""

from __future__ import annotations

import math
import types
import warnings
from collections import defaultdict

import pytest
import torch

import fastpref as fp

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.gkd import GKDTrainer
    from trl.experimental.orpo import ORPOTrainer
    from trl.trainer.distillation_trainer import _chunked_divergence_loss
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.kto_trainer import KTOTrainer

F64 = torch.float64
P, T_IN, D, V = 3, 10, 8, 41  # TRL sees T_IN input ids; fastpref sees the T_IN - 1 scored positions


class StandInModel(torch.nn.Module):
    """hidden[b, t] = emb[ids[b, t]] + pos[t]; logits = hidden @ weight.T.  With ``fused_lm_head=True``
    returns what TRL's fused head returns for position t: statistics of the label ``labels[:, t+1]``."""

    def __init__(self, emb, pos, weight):
        super().__init__()
        self.emb, self.pos, self.weight = emb, pos, weight
        self.is_gradient_checkpointing = False

    def hidden(self, ids):
        return self.emb[ids] + self.pos[: ids.shape[1]]

    def forward(self, input_ids, attention_mask=None, labels=None, fused_lm_head=False, use_cache=None, **_):
        z = self.hidden(input_ids) @ self.weight.T
        if not fused_lm_head:
            return types.SimpleNamespace(logits=z, aux_loss=None)
        z, y = z[:, :-1], labels[:, 1:]
        keep = y != -100
        lsm = z.log_softmax(-1)
        lp = lsm.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
        return types.SimpleNamespace(
            log_probs=lp, entropy=-(lsm.exp() * lsm).sum(-1), mean_logits=z.mean(-1), is_top1=z.argmax(-1) == y,
            log_sum_sq_probs=torch.logsumexp(2 * lsm, -1), aux_loss=None,
        )


class StandInAccelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x

    def unwrap_model(self, m):
        return m


def _trainer(cls, **attrs):
    """The trainer class without ``__init__``, holding only what its loss method reads."""
    obj = cls.__new__(cls)
    base = dict(accelerator=StandInAccelerator(), aux_loss_enabled=False, _tp_size=1, _total_train_tokens=0,
                _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, precompute_ref_logps=False,
                is_encoder_decoder=False, pad_token_id=0)
    for k, v in {**base, **attrs}.items():
        setattr(obj, k, v)
    return obj


def _make(gen, dtype=F64, rows=2 * P):
    """Policy and reference stand-ins, input ids, attention and completion masks (prompts of 2-4 tokens,
    0-2 padding tokens at the end)."""
    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=F64) * scale
    pol = [r(V, D), r(T_IN, D, scale=0.5), r(V, D, scale=1.2 / D**0.5)]
    ref = [pol[0] + r(V, D, scale=0.2), pol[1], pol[2] + r(V, D, scale=0.1 / D**0.5)]
    pol = [t.to(dtype).requires_grad_() for t in pol]
    ref = [t.to(dtype) for t in ref]
    ids = torch.randint(0, V, (rows, T_IN), generator=gen)
    am = torch.ones(rows, T_IN, dtype=torch.long)
    cm = torch.ones(rows, T_IN, dtype=torch.long)
    for i in range(rows):
        prompt = int(torch.randint(2, 5, (1,), generator=gen))
        pad = int(torch.randint(0, 3, (1,), generator=gen))
        cm[i, :prompt] = 0
        if pad:
            am[i, T_IN - pad:] = 0
            cm[i, T_IN - pad:] = 0
    return StandInModel(*pol), StandInModel(*ref), ids, am, cm


def _fastpref_inputs(model, ref, ids, cm):
    """What fastpref sees: the hidden states of the scored positions and the shifted labels."""
    labels = ids[:, 1:].masked_fill(cm[:, 1:] == 0, -100)
    return model.hidden(ids)[:, :-1], labels, ref.hidden(ids)[:, :-1]


def _compare(family, case, trl_loss, ours, model, *, rtol=1e-10, grad_rtol=1e-9):
    params = [model.emb, model.pos, model.weight]
    g_trl = torch.autograd.grad(trl_loss, params, allow_unused=True, retain_graph=True)
    g_ours = torch.autograd.grad(ours, params, allow_unused=True)
    trl_loss, ours = trl_loss.detach(), ours.detach()
    loss_diff = abs(float(trl_loss) - float(ours))
    grad_diff, grad_scale = 0.0, 0.0
    for a, b in zip(g_trl, g_ours):
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        grad_diff = max(grad_diff, (a.double() - b.double()).abs().max().item())
        grad_scale = max(grad_scale, a.double().abs().max().item())
    print(f"TRL {family} {case}: |loss diff| {loss_diff:.2e} (loss {float(trl_loss):.4f}), "
          f"|grad diff| {grad_diff:.2e} (grad scale {grad_scale:.2e})")
    assert math.isfinite(float(ours))
    assert loss_diff <= rtol * max(1.0, abs(float(trl_loss))), (family, case, loss_diff)
    assert grad_diff <= grad_rtol * max(1.0, grad_scale), (family, case, grad_diff)


# ----------------------------------------------------------------------------- DPO


def _dpo_trainer(model, ref, *, loss_type, loss_weights=None, beta=0.1, label_smoothing=0.0, f_divergence="reverse_kl",
                 f_alpha=0.5, ld_alpha=None, use_weighting=False, discopop_tau=0.05):
    types_ = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    return _trainer(
        DPOTrainer, model=model, ref_model=ref, beta=beta, loss_types=types_, loss_weights=loss_weights or [1.0] * len(types_),
        label_smoothing=label_smoothing, f_divergence_type=f_divergence, f_alpha_divergence_coef=f_alpha,
        ld_alpha=ld_alpha, use_weighting=use_weighting,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None, discopop_tau=discopop_tau),
    )


_EPS = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.05, "aot_unpaired": 0.05}
DPO_CASES = {f"{lt}": dict(loss_type=lt, beta=0.3, label_smoothing=_EPS.get(lt, 0.0)) for lt in fp.objectives.DPO_LOSS_TYPES}
for _lt in fp.objectives.F_DIVERGENCE_LOSS_TYPES:
    for _f in ("forward_kl", "js_divergence"):
        DPO_CASES[f"{_lt}-{_f}"] = dict(loss_type=_lt, beta=0.3, f_divergence=_f, label_smoothing=_EPS.get(_lt, 0.0))
DPO_CASES.update({
    "discopop-tau0.2": dict(loss_type="discopop", beta=0.5, discopop_tau=0.2),
    "sigmoid-ld0.5": dict(loss_type="sigmoid", ld_alpha=0.5),
    "rpo-ld0.5": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7], ld_alpha=0.5),
    "mpo-list": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),
    "wpo-sigmoid": dict(loss_type="sigmoid", use_weighting=True),
    # (TRL 1.16 cannot weight its "sft" term: it multiplies the expanded batch NLL in place and raises)
    "wpo-ipo-bco": dict(loss_type=["ipo", "bco_pair"], loss_weights=[1.0, 0.5], use_weighting=True),
})


def _fastpref_dpo_kwargs(cfg):
    kw = dict(cfg)
    kw["f_alpha"] = kw.pop("f_alpha", 0.5)
    return kw


@pytest.mark.parametrize("case", list(DPO_CASES))
def test_dpo_matches_trl(case, gen):
    cfg = DPO_CASES[case]
    model, ref, ids, am, cm = _make(gen)
    trainer = _dpo_trainer(model, ref, **cfg)
    trl_loss = DPOTrainer._compute_loss(trainer, model, dict(input_ids=ids, attention_mask=am, completion_mask=cm),
                                        return_outputs=False)
    h, labels, rh = _fastpref_inputs(model, ref, ids, cm)
    ours = fp.dpo_loss(h, model.weight, labels, ref_hidden=rh, ref_weight=ref.weight, backend="torch",
                       **_fastpref_dpo_kwargs(cfg))
    # TRL builds EXO's ε as a float32 tensor, so log(ε) and log(1 - ε) carry float32 rounding
    tol = dict(rtol=1e-7, grad_rtol=1e-7) if cfg["loss_type"] == "exo_pair" else {}
    _compare("DPO", case, trl_loss, ours, model, **tol)


def test_rpo_alpha_is_trl_sigmoid_plus_sft(gen):
    model, ref, ids, am, cm = _make(gen)
    trainer = _dpo_trainer(model, ref, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.4], ld_alpha=0.3)
    trl_loss = DPOTrainer._compute_loss(trainer, model, dict(input_ids=ids, attention_mask=am, completion_mask=cm),
                                        return_outputs=False)
    h, labels, rh = _fastpref_inputs(model, ref, ids, cm)
    ours = fp.dpo_loss(h, model.weight, labels, ref_hidden=rh, ref_weight=ref.weight, rpo_alpha=0.4, ld_alpha=0.3,
                       backend="torch")
    _compare("DPO", "rpo_alpha0.4-ld0.3", trl_loss, ours, model)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "sigmoid_norm", "hinge"])
def test_dpo_alpha_divergence_matches_trl_fp32(loss_type, gen):
    """TRL 1.16's α-divergence branch has no float64 case (its clamp table stops at float32): compared in fp32."""
    model, ref, ids, am, cm = _make(gen, dtype=torch.float32)
    cfg = dict(loss_type=loss_type, beta=0.3, f_divergence="alpha_divergence", f_alpha=0.3)
    trainer = _dpo_trainer(model, ref, **cfg)
    trl_loss = DPOTrainer._compute_loss(trainer, model, dict(input_ids=ids, attention_mask=am, completion_mask=cm),
                                        return_outputs=False)
    h, labels, rh = _fastpref_inputs(model, ref, ids, cm)
    ours = fp.dpo_loss(h, model.weight, labels, ref_hidden=rh, ref_weight=ref.weight, backend="torch", **cfg)
    _compare("DPO", f"{loss_type}-alpha_divergence-fp32", trl_loss, ours, model, rtol=2e-6, grad_rtol=2e-5)


# ----------------------------------------------------------------------------- KTO


KTO_CASES = {
    "kto-kl-completions": dict(loss_type="kto", calculate_kl=True, desirable_weight=1.3, undesirable_weight=0.7),
    "kto-no-kl-completions": dict(loss_type="kto", calculate_kl=False, beta=0.5),
    "apo_zero_unpaired": dict(loss_type="apo_zero_unpaired", calculate_kl=False, undesirable_weight=0.6),
}


@pytest.mark.parametrize("case", list(KTO_CASES))
def test_kto_matches_trl(case, gen):
    cfg = dict(KTO_CASES[case])
    calc = cfg.pop("calculate_kl")
    beta, lam_d, lam_u = cfg.get("beta", 0.1), cfg.get("desirable_weight", 1.0), cfg.get("undesirable_weight", 1.0)
    model, ref, ids, am, cm = _make(gen, rows=6)
    kl_ids = torch.roll(ids, 1, dims=0)  # mismatched prompt/completion pairs (TRL cycles completions)
    kl_cm = torch.roll(cm, 1, dims=0)
    desirable = torch.tensor([True, False, True, True, False, False])
    trainer = _trainer(KTOTrainer, model=model, ref_model=ref, loss_type=cfg["loss_type"], beta=beta,
                       desirable_weight=lam_d, undesirable_weight=lam_u, calculate_KL=calc,
                       args=types.SimpleNamespace(gradient_checkpointing_kwargs=None))
    inputs = dict(input_ids=ids, attention_mask=am, completion_mask=cm, label=desirable)
    if calc:
        inputs.update(KL_input_ids=kl_ids, KL_attention_mask=torch.ones_like(am), KL_completion_mask=kl_cm)
    trl_loss = KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    h, labels, rh = _fastpref_inputs(model, ref, ids, cm)
    kw = {}
    if calc:
        with torch.no_grad():
            kh, kl_labels, krh = _fastpref_inputs(model, ref, kl_ids, kl_cm)
            kw = dict(kl_logps=fp.sequence_logprobs(kh, model.weight, kl_labels, backend="torch"),
                      ref_kl_logps=fp.sequence_logprobs(krh, ref.weight, kl_labels, backend="torch"))
    ours = fp.kto_loss(h, model.weight, labels, desirable=desirable, ref_hidden=rh, ref_weight=ref.weight,
                       backend="torch", **cfg, **kw)
    _compare("KTO", case, trl_loss, ours, model)


# ----------------------------------------------------------------------------- CPO, SimPO (CPO's simpo), ORPO


def _paired_batch(ids, am, cm):
    """TRL's CPO/ORPO batch: chosen/rejected input ids, attention masks and (unshifted) labels."""
    labels = ids.masked_fill(cm == 0, -100)
    return {f"{side}_{k}": v[sl] for side, sl in (("chosen", slice(0, P)), ("rejected", slice(P, 2 * P)))
            for k, v in (("input_ids", ids), ("attention_mask", am), ("labels", labels))}


CPO_CASES = {
    "sigmoid": dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.1, cpo_alpha=1.0, alpha=0.0),
    "hinge": dict(loss_type="hinge", beta=0.05, cpo_alpha=0.5, alpha=0.0),
    "ipo": dict(loss_type="ipo", beta=0.5, cpo_alpha=1.0, alpha=0.0),
    "simpo": dict(loss_type="simpo", beta=2.0, simpo_gamma=0.7, cpo_alpha=1.0, alpha=0.0),
    "simpo-no-nll": dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0, alpha=0.0),
    "alphapo": dict(loss_type="alphapo", beta=2.0, simpo_gamma=0.5, alpha=0.25),
    "sigmoid-alphapo": dict(loss_type="sigmoid", beta=0.1, cpo_alpha=1.0, alpha=0.05),
}


@pytest.mark.parametrize("case", list(CPO_CASES))
def test_cpo_matches_trl(case, gen):
    cfg = dict(CPO_CASES[case])
    model, ref, ids, am, cm = _make(gen)
    trl_type, cpo_alpha = cfg["loss_type"], cfg.get("cpo_alpha")
    if trl_type == "alphapo":  # what CPOConfig.__post_init__ turns "alphapo" into
        trl_type, cpo_alpha = "simpo", 0.0
    trainer = _trainer(CPOTrainer, beta=cfg["beta"], label_smoothing=cfg.get("label_smoothing", 0.0),
                       loss_type=trl_type, cpo_alpha=cpo_alpha, simpo_gamma=cfg.get("simpo_gamma", 0.5),
                       alpha=cfg["alpha"])
    trl_loss, _ = CPOTrainer.get_batch_loss_metrics(trainer, model, _paired_batch(ids, am, cm))
    h, labels, _ = _fastpref_inputs(model, ref, ids, cm)
    ours = fp.cpo_loss(h, model.weight, labels, beta=cfg["beta"], loss_type=cfg["loss_type"],
                       label_smoothing=cfg.get("label_smoothing", 0.0), simpo_gamma=cfg.get("simpo_gamma", 0.5),
                       alphapo_alpha=cfg["alpha"], cpo_alpha=cfg.get("cpo_alpha"), backend="torch")
    _compare("CPO", case, trl_loss, ours, model)


@pytest.mark.parametrize("case", ["simpo", "simpo-no-nll"])
def test_simpo_loss_is_trl_cpo_simpo(case, gen):
    """TRL has SimPO only as CPOTrainer(loss_type="simpo"): fastpref.simpo_loss with nll_weight = cpo_alpha."""
    cfg = CPO_CASES[case]
    model, ref, ids, am, cm = _make(gen)
    trainer = _trainer(CPOTrainer, beta=cfg["beta"], label_smoothing=0.0, loss_type="simpo", cpo_alpha=cfg["cpo_alpha"],
                       simpo_gamma=cfg["simpo_gamma"], alpha=0.0)
    trl_loss, _ = CPOTrainer.get_batch_loss_metrics(trainer, model, _paired_batch(ids, am, cm))
    h, labels, _ = _fastpref_inputs(model, ref, ids, cm)
    ours = fp.simpo_loss(h, model.weight, labels, beta=cfg["beta"], gamma_margin=cfg["simpo_gamma"],
                         nll_weight=cfg["cpo_alpha"], backend="torch")
    _compare("SimPO", case, trl_loss, ours, model)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_matches_trl(beta, gen):
    """TRL's ORPO scores the prompt tokens in its NLL (fastpref's nll_labels) and casts the mean log-probs to
    float32 before the odds: the bound is float32's."""
    model, ref, ids, am, cm = _make(gen)
    trainer = _trainer(ORPOTrainer, beta=beta, padding_value=0)
    trl_loss, _ = ORPOTrainer.get_batch_loss_metrics(trainer, model, _paired_batch(ids, am, cm))
    h, labels, _ = _fastpref_inputs(model, ref, ids, cm)
    nll_labels = ids[:P, 1:].masked_fill(am[:P, 1:] == 0, -100)
    ours = fp.orpo_loss(h, model.weight, labels, nll_labels=nll_labels, beta=beta, backend="torch")
    _compare("ORPO", f"beta{beta}", trl_loss, ours, model, rtol=1e-6, grad_rtol=1e-6)


# ----------------------------------------------------------------------------- distillation (GKD's generalised JSD)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "num_items"])
def test_distill_jsd_matches_trl_gkd(beta, reduction, gen):
    model, ref, ids, am, cm = _make(gen)
    h, labels, rh = _fastpref_inputs(model, ref, ids, cm)
    temp = 1.7
    kw = dict(num_items_in_batch=11) if reduction == "num_items" else {}
    trl_loss = GKDTrainer.generalized_jsd_loss(h @ model.weight.T, (rh @ ref.weight.T).detach(), labels=labels,
                                               beta=beta, temperature=temp,
                                               reduction="sum" if reduction == "sum" else "batchmean", **kw)
    ours = fp.distill_loss(h, model.weight, rh, ref.weight, labels, kind="jsd", beta=beta, temperature=temp,
                           reduction="sum" if reduction == "sum" else "mean", backend="torch", **kw)
    _compare("distill", f"gkd-jsd-beta{beta}-{reduction}", trl_loss, ours, model)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distill_matches_trl_chunked_head(beta, gen):
    """TRL 1.16's DistillationTrainer head (hidden states in, fused): float32 internally."""
    model, ref, ids, am, cm = _make(gen)
    h, labels, rh = _fastpref_inputs(model, ref, ids, cm)
    out = _chunked_divergence_loss(h, rh, model.weight, ref.weight, (labels != -100).long(), beta, temperature=1.3)
    ours = fp.distill_loss(h, model.weight, rh, ref.weight, labels, kind="jsd", beta=beta, temperature=1.3,
                           backend="torch")
    _compare("distill", f"trl-chunked-head-beta{beta}", out[0], ours, model, rtol=2e-6, grad_rtol=2e-6)


def test_distill_softcap_then_temperature_matches_trl(gen):
    model, ref, ids, am, cm = _make(gen)
    h, labels, rh = _fastpref_inputs(model, ref, ids, cm)
    out = _chunked_divergence_loss(h, rh, model.weight, ref.weight, (labels != -100).long(), 0.5, temperature=2.0,
                                   student_final_logit_softcapping=1.5, teacher_final_logit_softcapping=1.5)
    ours = fp.distill_loss(h, model.weight, rh, ref.weight, labels, kind="jsd", beta=0.5, temperature=2.0,
                           student_softcap=1.5, teacher_softcap=1.5, backend="torch")
    _compare("distill", "trl-chunked-head-softcap-temperature", out[0], ours, model, rtol=2e-6, grad_rtol=2e-6)
