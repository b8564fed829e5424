"""Preference MLE (or preference distillation) with TRL's DPOTrainer, its log-probs computed by fastpref.

arXiv 2506.01523 §4.1: ``L = -log σ(γ·(ℓ(y_w) - ℓ(y_l))) + β·KL(π‖π₀)`` — DPO without the reference inside the
sigmoid. ``fastpref.integrations.trl_trainers.DistributionDPOTrainer`` is TRL's ``DPOTrainer`` with
``loss_type="pmle"`` / ``"preference_distillation"`` added; ``fastpref.integrations.trl.enable()`` makes every
log-prob TRL computes (policy and reference) come from fastpref's fused head.

    python examples/trl_pmle.py --tiny                 # seconds on a CPU: a tiny random model, synthetic pairs
    python examples/trl_pmle.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/ultrafeedback_binarized \\
        --gamma 5e-3 --kl-coef 0                       # the paper's chat setting

``--loss preference_distillation`` needs soft targets: dataset columns ``reward_chosen`` / ``reward_rejected``
(Bradley–Terry reward-model scores) or ``--target-prob-column``; ``--tiny`` makes up rewards.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from datasets import Dataset

import fastpref.integrations.trl as fp_trl
from fastpref.integrations.trl_trainers import DistributionDPOConfig, DistributionDPOTrainer


def tiny_setup(n_pairs: int):
    from trl_tiny import sentence, tiny_model, tiny_tokenizer

    g = torch.Generator().manual_seed(0)
    data = Dataset.from_dict({
        "prompt": [sentence(g, 3, 6) for _ in range(n_pairs)],
        "chosen": [" " + sentence(g, 2, 5) for _ in range(n_pairs)],
        "rejected": [" " + sentence(g, 2, 5) for _ in range(n_pairs)],
        "reward_chosen": (torch.randn(n_pairs, generator=g) + 1.0).tolist(),
        "reward_rejected": torch.randn(n_pairs, generator=g).tolist(),
    })
    return tiny_model(0), tiny_model(0), tiny_tokenizer(), data


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny random model and synthetic data (no download)")
    p.add_argument("--model", help="model id or path (ignored with --tiny)")
    p.add_argument("--dataset", default="trl-lib/ultrafeedback_binarized")
    p.add_argument("--loss", default="pmle", choices=["pmle", "preference_distillation"])
    p.add_argument("--gamma", type=float, default=1e-2)
    p.add_argument("--kl-coef", type=float, default=1e-5)
    p.add_argument("--kl-estimator", default="sampled", choices=["sampled", "token_exact"])
    p.add_argument("--target-prob-column")
    p.add_argument("--max-steps", type=int, default=4)
    p.add_argument("--output-dir", help="default: a new temporary directory")
    p.add_argument("--backend", default="auto")
    a = p.parse_args(argv)
    if a.output_dir is None:
        a.output_dir = tempfile.mkdtemp(prefix="pmle-out-")

    if a.tiny:
        model, ref_model, tokenizer, data = tiny_setup(16)
    else:
        if not a.model:
            p.error("--model is required without --tiny")
        from datasets import load_dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(a.model)
        ref_model = AutoModelForCausalLM.from_pretrained(a.model)
        tokenizer = AutoTokenizer.from_pretrained(a.model)
        data = load_dataset(a.dataset, split="train")

    args = DistributionDPOConfig(
        output_dir=a.output_dir, loss_type=[a.loss], gamma=a.gamma, kl_coef=a.kl_coef, kl_estimator=a.kl_estimator,
        target_prob_column=a.target_prob_column, max_steps=a.max_steps, per_device_train_batch_size=4,
        logging_steps=1, learning_rate=1e-4 if not a.tiny else 1e-3, report_to="none", save_strategy="no",
        use_cpu=a.tiny, bf16=not a.tiny and torch.cuda.is_available(),
    )
    fp_trl.enable(backend=a.backend)  # policy and reference log-probs from fastpref
    trainer = DistributionDPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data,
                                     processing_class=tokenizer)
    trainer.train()
    fp_trl.disable()
    last = [h for h in trainer.state.log_history if f"{a.loss}/loss" in h][-1]
    print(f"{a.loss}: loss {last['loss']:.4f}, {a.loss}/loss {last[f'{a.loss}/loss']:.4f}")
    return trainer


if __name__ == "__main__":
    main()
