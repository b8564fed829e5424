"""The reverse-KL objective (RLHF + exact token-entropy bonus) on TRL's RLOOTrainer, with fastpref's fused head.

arXiv 2506.01523 §4.3: ``-E[R̂] - γ·H(π) + β·KL(π‖π₀)``, optimum ``π ∝ π₀^{β/(β+γ)}·exp(R̂/(β+γ))``.
``fastpref.integrations.trl_trainers.ReverseKLTrainer`` is TRL's ``RLOOTrainer`` (sequence-level KL in the reward,
leave-one-out baseline) plus the entropy bonus, with the exact full-vocabulary entropy of every sampled step.

    python examples/trl_reverse_kl.py --tiny           # seconds on a CPU: a tiny random model, a toy reward
    python examples/trl_reverse_kl.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/tldr

The toy reward (``--tiny``) is the fraction of generated words with an even index; with a real model, pass your
reward function or reward model the way RLOOTrainer takes them (edit ``reward_funcs`` below).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from datasets import Dataset

import fastpref.integrations.trl as fp_trl
from fastpref.integrations.trl_trainers import ReverseKLConfig, ReverseKLTrainer


def even_words(completions, **kwargs):
    """Toy reward: the fraction of words ``w<i>`` with an even ``i``."""
    out = []
    for c in completions:
        words = [w for w in c.split() if w.startswith("w") and w[1:].isdigit()]
        out.append(sum(int(w[1:]) % 2 == 0 for w in words) / max(len(words), 1))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny random model and synthetic prompts (no download)")
    p.add_argument("--model")
    p.add_argument("--dataset", default="trl-lib/tldr")
    p.add_argument("--beta", type=float, default=0.05, help="KL strength (paper: 0.05)")
    p.add_argument("--gamma", type=float, default=0.01, help="entropy strength (paper: 0.01)")
    p.add_argument("--entropy-estimator", default="token_exact", choices=["token_exact", "sequence"])
    p.add_argument("--max-steps", type=int, default=3)
    p.add_argument("--output-dir", help="default: a new temporary directory")
    a = p.parse_args(argv)
    if a.output_dir is None:
        a.output_dir = tempfile.mkdtemp(prefix="rkl-out-")

    if a.tiny:
        from trl_tiny import sentence, tiny_model, tiny_tokenizer

        model, tokenizer = tiny_model(0), tiny_tokenizer()
        # RLOO loads its reference model from the policy's path: save the initial weights locally.
        init_dir = tempfile.mkdtemp(prefix="rkl-init-")
        model.save_pretrained(init_dir)
        model.config._name_or_path = init_dir
        g = torch.Generator().manual_seed(0)
        data = Dataset.from_dict({"prompt": [sentence(g, 3, 6) for _ in range(16)]})
    else:
        if not a.model:
            p.error("--model is required without --tiny")
        from datasets import load_dataset

        model, tokenizer, data = a.model, None, load_dataset(a.dataset, split="train")

    args = ReverseKLConfig(
        output_dir=a.output_dir, beta=a.beta, entropy_coef=a.gamma, entropy_estimator=a.entropy_estimator,
        num_generations=4, max_completion_length=8 if a.tiny else 64, per_device_train_batch_size=4,
        max_steps=a.max_steps, logging_steps=1, report_to="none", save_strategy="no", use_cpu=a.tiny,
        bf16=not a.tiny and torch.cuda.is_available(), learning_rate=1e-3 if a.tiny else 1e-6,
    )
    with fp_trl.enabled():
        trainer = ReverseKLTrainer(model=model, reward_funcs=even_words, args=args, train_dataset=data,
                                   processing_class=tokenizer)
        trainer.train()
    last = [h for h in trainer.state.log_history if "rewards/entropy_bonus/mean" in h][-1]
    print(f"reward {last['rewards/even_words/mean']:.3f}, entropy bonus {last['rewards/entropy_bonus/mean']:.4f}, "
          f"kl {last.get('kl', float('nan')):.4f}")
    return trainer


if __name__ == "__main__":
    main()
