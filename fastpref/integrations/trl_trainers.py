"""The objectives of arXiv 2506.01523 ("Alignment as Distribution Learning") as TRL 1.16 trainers.

- :class:`DistributionDPOTrainer` / :class:`DistributionDPOConfig`: TRL's ``DPOTrainer`` that also
  accepts ``loss_type="pmle"`` and ``loss_type="preference_distillation"`` (alone or in a weighted
  list with any of TRL's own ``loss_type`` names), plus the paper's ``β·KL(π‖π₀)`` regulariser
  (``kl_coef``).  The per-pair formulas are :func:`fastpref.objectives.pmle` and
  :func:`fastpref.objectives.preference_distillation`, applied to the very per-sequence log-probs
  TRL computed for the batch (summed completion log-probs, no length normalisation).
- :class:`ReverseKLTrainer` / :class:`ReverseKLConfig`: TRL's ``RLOOTrainer`` (RLHF with a
  sequence-level KL penalty in the reward and a leave-one-out baseline) plus the entropy bonus of
  the paper's reverse-KL objective ``-E[R̂] - γ·H(π) + β·KL(π‖π₀)``.

Everything else (data handling, reference model, PEFT, metrics, logging) is TRL's.  Use them with
:func:`fastpref.integrations.trl.enable` so the log-probs and entropies come from fastpref.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from trl import DPOConfig, DPOTrainer, RLOOConfig, RLOOTrainer

import fastpref
from fastpref import objectives

__all__ = [
    "DISTRIBUTION_LOSS_TYPES",
    "DistributionDPOConfig",
    "DistributionDPOTrainer",
    "ReverseKLConfig",
    "ReverseKLTrainer",
]

DISTRIBUTION_LOSS_TYPES = ("pmle", "preference_distillation")
KL_ESTIMATORS = ("sampled", "token_exact")


# --------------------------------------------------------------------------- DPO + PMLE / preference distillation


@dataclass
class DistributionDPOConfig(DPOConfig):
    r"""
    [`~trl.DPOConfig`] plus the distribution-learning objectives of arXiv 2506.01523.

    `loss_type` may name, besides TRL's own types, `"pmle"` (preference MLE,
    `-log σ(γ·(ℓ(y_w) - ℓ(y_l)))`) and `"preference_distillation"`
    (`BCE_with_logits(γ·(ℓ(y_1) - ℓ(y_2)), p)` with a soft target `p` read from the dataset); several
    types combine with `loss_weights` exactly as in TRL. `ℓ` is the summed log-prob of a completion.

    Parameters:
        gamma (`float`, defaults to `0.01`):
            The preference model's γ > 0 (paper: TL;DR PMLE 1e-2, chat 5e-3, preference distillation 0.1).
        kl_coef (`float`, defaults to `0.0`):
            The paper's β of the regulariser `β·KL(π‖π₀)` (paper: TL;DR PMLE 1e-5, preference distillation 0.05).
            Distinct from TRL's `beta`, which scales the DPO-family losses. Added once to the total loss.
        kl_estimator (`str`, defaults to `"sampled"`):
            `"sampled"`: score-function estimate on the batch's completions (value `ℓ - ℓ₀`, gradient
            `(ℓ - ℓ₀)·∇ℓ`; unbiased when the completions are policy samples), from the reference log-probs TRL
            already computes (or precomputed ones). `"token_exact"`: `Σ_t KL(π(·|y<t) ‖ π₀(·|y<t))` over the full
            vocabulary along each completion, with `fastpref.linear_divergence` (one more head pass; needs the
            reference model, so not with `precompute_ref_log_probs=True`).
        target_prob_column (`str`, *optional*):
            Dataset column with `p = P(chosen ≻ rejected)` for `"preference_distillation"`. When unset, the target is
            `σ(R̂(chosen) - R̂(rejected))` from the Bradley–Terry rewards in `reward_chosen_column` and
            `reward_rejected_column`.
        reward_chosen_column (`str`, defaults to `"reward_chosen"`), reward_rejected_column (`str`, defaults to
            `"reward_rejected"`): Dataset columns with the reward-model scores of the two completions.
    """

    gamma: float = field(default=0.01, metadata={"help": "Preference-model γ of PMLE / preference distillation."})
    kl_coef: float = field(default=0.0, metadata={"help": "The paper's β of the regulariser β·KL(π‖π₀)."})
    kl_estimator: str = field(default="sampled", metadata={"help": "'sampled' or 'token_exact'."})
    target_prob_column: Optional[str] = field(default=None, metadata={"help": "Column with P(chosen ≻ rejected)."})
    reward_chosen_column: str = field(default="reward_chosen", metadata={"help": "Column with R̂(chosen)."})
    reward_rejected_column: str = field(default="reward_rejected", metadata={"help": "Column with R̂(rejected)."})


class _WithColumns:
    """A collator that adds per-example float columns to the batch of the wrapped collator."""

    def __init__(self, collator, columns: Tuple[str, ...]):
        self.collator, self.columns = collator, columns

    def __call__(self, examples: List[Dict[str, Any]]) -> Dict[str, Any]:
        batch = self.collator(examples)
        for name in self.columns:
            if name not in examples[0]:
                raise ValueError(f"{name}: the dataset has no column {name!r} (needed by preference_distillation)")
            batch[name] = torch.tensor([float(ex[name]) for ex in examples], dtype=torch.float32)
        return batch


def _head_transform(config) -> Tuple[float, Optional[float]]:
    """``(logit_scale, softcap)`` of a model's LM head, read as TRL 1.16's fused head reads them."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)
    for alias in ("output_multiplier", "lm_head_multiplier"):
        if scale is None:
            scale = getattr(text, alias, None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if getattr(text, "model_type", None) == "hyperclovax" else 1.0 / text.logits_scaling
    return (1.0 if scale is None else float(scale)), getattr(text, "final_logit_softcapping", None)


def _backbone(model):
    """The module whose output is the last hidden state TRL's fused head projects."""
    if hasattr(model, "get_base_model"):  # PEFT
        model = model.get_base_model()
    return model.base_model


def _plain(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A DTensor (FSDP2) head gathered whole, as TRL's fused head does; other tensors as they are."""
    if t is not None and type(t).__name__ == "DTensor":
        return t.full_tensor()
    return t


class DistributionDPOTrainer(DPOTrainer):
    """TRL's [`~trl.DPOTrainer`] with the `"pmle"` and `"preference_distillation"` loss types and the paper's
    `β·KL(π‖π₀)` regulariser; see [`DistributionDPOConfig`].

    The total loss is TRL's (its own loss types, weighted) plus, for each distribution-learning type with weight
    `w`, `w · mean_pairs(fastpref.objectives.<type>(ℓ_chosen, ℓ_rejected, ...))`, plus
    `kl_coef · mean_pairs(½(KL(y_chosen) + KL(y_rejected)))`. Logged as `pmle/loss`, `pmle/margin`
    (`γ·(ℓ_w - ℓ_l)`), `preference_distillation/loss`, `preference_distillation/target_prob`, `kl`.
    """

    def __init__(self, model, ref_model=None, args: Optional[DistributionDPOConfig] = None, *pos, **kwargs):
        if not isinstance(args, DistributionDPOConfig):
            raise TypeError(f"args: expected a DistributionDPOConfig, got {type(args).__name__}")
        types, given_weights = list(args.loss_type), args.loss_weights
        weights = list(given_weights) if given_weights is not None else [1.0] * len(types)
        ours = [(t, w) for t, w in zip(types, weights) if t in DISTRIBUTION_LOSS_TYPES]
        theirs = [(t, w) for t, w in zip(types, weights) if t not in DISTRIBUTION_LOSS_TYPES]
        self._fp_losses = ours
        self._fp_columns: Tuple[str, ...] = ()
        if ours or args.kl_coef:
            self._fp_validate(args, [t for t, _ in ours])
        if "preference_distillation" in [t for t, _ in ours]:
            self._fp_columns = (
                (args.target_prob_column,) if args.target_prob_column
                else (args.reward_chosen_column, args.reward_rejected_column)
            )
        # TRL's __init__ validates its own loss types only; hand it those (or a placeholder) and restore after.
        args.loss_type = [t for t, _ in theirs] or ["sigmoid"]
        args.loss_weights = [w for _, w in theirs] or [1.0]
        try:
            super().__init__(model, ref_model, args, *pos, **kwargs)
        finally:
            args.loss_type, args.loss_weights = types, given_weights
        self.loss_types = [t for t, _ in theirs]
        self.loss_weights = [w for _, w in theirs]
        if self._fp_columns:
            self.data_collator = _WithColumns(self.data_collator, self._fp_columns)

    @staticmethod
    def _fp_validate(args, ours: List[str]) -> None:
        if not (isinstance(args.gamma, (int, float)) and math.isfinite(args.gamma) and args.gamma > 0):
            raise ValueError(f"gamma: expected a finite value > 0, got {args.gamma!r}")
        if not (isinstance(args.kl_coef, (int, float)) and math.isfinite(args.kl_coef) and args.kl_coef >= 0):
            raise ValueError(f"kl_coef: expected a finite value >= 0, got {args.kl_coef!r}")
        if args.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator: expected one of {list(KL_ESTIMATORS)}, got {args.kl_estimator!r}")
        if args.kl_coef and args.kl_estimator == "token_exact" and args.precompute_ref_log_probs:
            raise ValueError(
                "kl_estimator: 'token_exact' needs the reference model's hidden states on every batch; it cannot "
                "be used with precompute_ref_log_probs=True (use kl_estimator='sampled')"
            )
        if ours and args.use_weighting:
            raise ValueError(f"use_weighting: WPO weighting is not defined for loss_type {ours}")
        if ours and args.ld_alpha is not None:
            raise ValueError(f"ld_alpha: the objectives {ours} use unnormalised summed log-probs (no LD-DPO)")

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._fp_columns and self._signature_columns is not None:
            self._signature_columns = list(self._signature_columns) + [
                c for c in self._fp_columns if c not in self._signature_columns
            ]

    @contextlib.contextmanager
    def _fp_capture(self, want_hidden: bool):
        """Record the fused-head outputs (and, for the exact KL, the backbone outputs) of this step's policy and
        reference forwards, in call order."""
        rec: Dict[str, list] = {"model": [], "ref": [], "model_hidden": [], "ref_hidden": []}
        handles = []

        def on_forward(tag):
            def hook(module, args, kwargs, output):
                if kwargs.get("fused_lm_head"):
                    rec[tag].append(output)
            return hook

        def on_backbone(tag):
            def hook(module, args, output):
                rec[tag].append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])
            return hook

        handles.append(self.model.register_forward_hook(on_forward("model"), with_kwargs=True))
        if self.ref_model is not None:
            handles.append(self.ref_model.register_forward_hook(on_forward("ref"), with_kwargs=True))
        if want_hidden:
            handles.append(_backbone(self.model).register_forward_hook(on_backbone("model_hidden")))
            if self.ref_model is not None:
                handles.append(_backbone(self.ref_model).register_forward_hook(on_backbone("ref_hidden")))
        try:
            yield rec
        finally:
            for h in handles:
                h.remove()

    def _fp_token_exact_kl(self, rec, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        """``Σ_t KL(π(·|y<t) ‖ π₀(·|y<t))`` per sequence along the batch's completions, via fastpref."""
        pol_h = rec["model_hidden"][0]
        ref_h = rec["ref_hidden"][0] if rec["ref_hidden"] else rec["model_hidden"][1]
        pol_model = self.accelerator.unwrap_model(self.model)
        ref_model = self.accelerator.unwrap_model(self.ref_model) if self.ref_model is not None else pol_model
        pol_head, ref_head = pol_model.get_output_embeddings(), ref_model.get_output_embeddings()
        (s_scale, s_cap), (t_scale, t_cap) = _head_transform(pol_model.config), _head_transform(ref_model.config)
        labels = input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, -100)
        # Prompt-learning PEFT prepends virtual tokens: keep the positions of the real tokens, as TRL does.
        seq = labels.size(1)
        pol_h, ref_h = pol_h[:, :-1][:, -seq:], ref_h[:, :-1][:, -seq:].detach()
        w_s, b_s = _plain(pol_head.weight), _plain(pol_head.bias)
        w_t, b_t = _plain(ref_head.weight).detach(), _plain(ref_head.bias)
        kw = {}
        if s_scale != 1.0:
            kw["student_logit_scale"] = s_scale
        if t_scale != 1.0:
            kw["teacher_logit_scale"] = t_scale
        kl = fastpref.linear_divergence(
            pol_h.to(w_s.dtype), w_s, ref_h.to(w_t.dtype), w_t, labels.to(pol_h.device), kind="reverse_kl",
            student_bias=b_s, teacher_bias=None if b_t is None else b_t.detach(), student_softcap=s_cap,
            teacher_softcap=t_cap, **kw,
        )
        return kl.sum(-1)

    def _compute_loss(self, model, inputs, return_outputs):
        if not self._fp_losses and not self.args.kl_coef:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        extra = {c: inputs.pop(c) for c in self._fp_columns if c in inputs}
        exact = bool(self.args.kl_coef) and self.args.kl_estimator == "token_exact"
        with self._fp_capture(want_hidden=exact) as rec:
            result = super()._compute_loss(model, inputs, return_outputs)
        loss, outputs = result if return_outputs else (result, None)

        completion_mask = inputs["completion_mask"]
        seq = completion_mask.size(1) - 1
        logps = rec["model"][0].log_probs[:, -seq:].sum(1)  # TRL's per-sequence log-probs of this step
        pairs = logps.shape[0] // 2
        chosen, rejected = logps[:pairs], logps[pairs:]
        gamma = self.args.gamma
        gather = self.accelerator.gather_for_metrics
        for loss_type, weight in self._fp_losses:
            if loss_type == "pmle":
                per_pair = objectives.pmle(chosen, rejected, gamma=gamma)
                self._metrics[mode]["pmle/margin"].append(gather(gamma * (chosen - rejected).detach()).mean().item())
            else:
                if self.args.target_prob_column:
                    target = dict(target_prob=extra[self.args.target_prob_column].to(logps.device))
                    p = target["target_prob"]
                else:
                    r_a = extra[self.args.reward_chosen_column].to(logps.device)
                    r_b = extra[self.args.reward_rejected_column].to(logps.device)
                    target = dict(reward_a=r_a, reward_b=r_b)
                    p = torch.sigmoid(r_a - r_b)
                per_pair = objectives.preference_distillation(chosen, rejected, gamma=gamma, **target)
                self._metrics[mode]["preference_distillation/target_prob"].append(gather(p.detach()).mean().item())
            self._metrics[mode][f"{loss_type}/loss"].append(gather(per_pair.detach()).mean().item())
            loss = loss + weight * per_pair.mean()

        if self.args.kl_coef:
            if exact:  # the path depends on π too: pathwise gradient plus the score term (as fastpref.policy_kl_loss)
                kl = self._fp_token_exact_kl(rec, inputs["input_ids"], completion_mask)
                kl = kl + kl.detach() * (logps - logps.detach())
            else:
                if "ref_chosen_logps" in inputs:
                    ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).to(logps.device)
                else:
                    ref_out = rec["ref"][0] if rec["ref"] else rec["model"][1]
                    ref = ref_out.log_probs[:, -seq:].sum(1)
                kl = objectives.sampled_kl(logps, ref.to(logps.dtype), num_samples_per_prompt=1)
            kl_pair = 0.5 * (kl[:pairs] + kl[pairs:])  # both completions answer the same prompt
            self._metrics[mode]["kl"].append(gather(kl_pair.detach()).mean().item())
            loss = loss + self.args.kl_coef * kl_pair.mean()
        return (loss, outputs) if return_outputs else loss


# --------------------------------------------------------------------------- RLOO + entropy bonus (reverse KL)


@dataclass
class ReverseKLConfig(RLOOConfig):
    r"""
    [`~trl.RLOOConfig`] for the reverse-KL objective of arXiv 2506.01523: `-E[R̂] - γ·H(π) + β·KL(π‖π₀)`,
    whose optimum is `π ∝ π₀^{β/(β+γ)}·exp(R̂/(β+γ))`. `beta` is RLOO's KL coefficient (paper: 0.05).

    Parameters:
        entropy_coef (`float`, defaults to `0.01`):
            The paper's γ (entropy strength, paper: 0.01).
        entropy_estimator (`str`, defaults to `"token_exact"`):
            `"token_exact"`: `H(π)` as `E_y[Σ_t H(π(·|y<t))]` with the exact full-vocabulary entropy of every
            step of the sampled completion; its gradient is the pathwise term `Σ_t ∇H_t` (added to the loss) plus
            the score-function term (`γ·Σ_t H_t` added to the reward, under RLOO's leave-one-out baseline).
            `"sequence"`: the score-function estimate `-γ·ℓ(y)` added to the reward (no extra loss term).
    """

    entropy_coef: float = field(default=0.01, metadata={"help": "The paper's γ (entropy strength)."})
    entropy_estimator: str = field(default="token_exact", metadata={"help": "'token_exact' or 'sequence'."})


class _EntropyBonus:
    """RLOO reward function: the entropy part of the shaped reward, from the rollout's own head pass."""

    def __init__(self, trainer: ReverseKLTrainer):
        self.trainer = trainer

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        stash = self.trainer._fp_rollout
        if stash is None or len(stash[0]) != len(prompts):
            raise RuntimeError("entropy_bonus: no log-probs of the current rollout were recorded")
        logps_sum, entropy_sum = stash
        gamma = self.trainer.args.entropy_coef
        if self.trainer.args.entropy_estimator == "token_exact":
            return (gamma * entropy_sum).tolist()
        return (-gamma * logps_sum).tolist()


class ReverseKLTrainer(RLOOTrainer):
    """TRL's [`~trl.RLOOTrainer`] plus the entropy bonus of the reverse-KL objective; see [`ReverseKLConfig`].

    RLOO already optimises `-E[R̂] + β·KL(π‖π₀)` (KL `ℓ - ℓ₀` in the reward, leave-one-out baseline, clipped ratio).
    This subclass adds `-γ·H(π)`: an extra reward column `entropy_bonus` (logged as `rewards/entropy_bonus/mean`)
    computed from the rollout's own no-grad head pass, and, for `entropy_estimator="token_exact"`, the pathwise term
    `-γ·mean_sequences(Σ_t H_t)` in the loss, with the differentiable entropies of the training head pass.
    """

    def __init__(self, model, reward_funcs, args: Optional[ReverseKLConfig] = None, *pos, **kwargs):
        if not isinstance(args, ReverseKLConfig):
            raise TypeError(f"args: expected a ReverseKLConfig, got {type(args).__name__}")
        gamma = args.entropy_coef
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"entropy_coef: expected a finite value >= 0, got {gamma!r}")
        if args.entropy_estimator not in ("token_exact", "sequence"):
            raise ValueError(
                f"entropy_estimator: expected 'token_exact' or 'sequence', got {args.entropy_estimator!r}"
            )
        self._fp_rollout: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._fp_phase: Optional[str] = None
        self._fp_train_entropy: Optional[torch.Tensor] = None
        super().__init__(model, reward_funcs, args, *pos, **kwargs)
        if gamma > 0:
            self.reward_funcs.append(_EntropyBonus(self))
            self.reward_func_names.append("entropy_bonus")
            self.reward_processing_classes.append(None)
            self.reward_weights = torch.cat([self.reward_weights, torch.ones(1, dtype=self.reward_weights.dtype)])

    def _generate_and_score_completions(self, inputs):
        self._fp_phase, self._fp_rollout = "rollout", None
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._fp_phase, self._fp_rollout = None, None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, **kwargs):
        exact = self.args.entropy_estimator == "token_exact"
        if self._fp_phase == "rollout" and self._fp_rollout is None:
            # The rollout's first head pass is the current policy's (RLOO's old log-probs): take the entropies
            # from the same pass.
            logps, entropies, aux = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy or exact, **kwargs
            )
            mask = attention_mask[:, -logits_to_keep:].to(logps.dtype)
            ent_sum = (entropies * mask).sum(1) if entropies is not None else torch.zeros_like(logps[:, 0])
            self._fp_rollout = ((logps * mask).sum(1).detach().cpu(), ent_sum.detach().cpu())
            return logps, (entropies if compute_entropy else None), aux
        out = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, **kwargs
        )
        if self._fp_phase == "train":
            self._fp_train_entropy = out[1]
        return out

    def _compute_loss(self, model, inputs):
        gamma = self.args.entropy_coef
        if gamma == 0 or self.args.entropy_estimator != "token_exact":
            return super()._compute_loss(model, inputs)
        self._fp_phase = "train"
        try:
            loss = super()._compute_loss(model, inputs)
        finally:
            self._fp_phase = None
        entropies, self._fp_train_entropy = self._fp_train_entropy, None
        mask = inputs["completion_mask"].to(entropies.dtype)
        bonus = (entropies * mask).sum(1).mean()
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["entropy_bonus/pathwise"].append(gamma * bonus.item())
        return loss - gamma * bonus
