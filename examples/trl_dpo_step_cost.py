"""Cost of one TRL DPO training step (policy + reference model), stock TRL vs TRL with fastpref's fused head.

A tiny Llama body (2 layers, hidden 64) under a Llama-3-sized vocabulary (V = 128256), so the LM head dominates:
each step runs the policy forward + backward and the reference forward through TRL's fused head, then SGD.
Each mode runs in fresh processes (``--repeats`` each, interleaved); a process times ``--steps`` steps after one
warm-up step and reports the median step time and its peak resident memory (``ru_maxrss``, whole process) and
the peak's rise above the resident memory before training (what the steps added).

    python examples/trl_dpo_step_cost.py                     # writes a markdown table to stdout
    python examples/trl_dpo_step_cost.py --pairs 4 --seq 512 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(a) -> dict:
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(a.threads)
    words = [f"w{i}" for i in range(a.vocab - 3)]
    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    g = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=g).tolist())

    half = a.seq // 2
    n = a.pairs * (a.steps + 1)
    data = Dataset.from_dict({"prompt": [text(half) for _ in range(n)], "chosen": [" " + text(half - 1) for _ in range(n)],
                              "rejected": [" " + text(half - 1) for _ in range(n)]})
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=2 * a.hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2 * a.seq, pad_token_id=0,
                      eos_token_id=1, bos_token_id=1)
    model, ref_model = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    ref_model.load_state_dict(model.state_dict())
    if a.mode == "fastpref":
        import fastpref.integrations.trl as fp_trl

        fp_trl.enable()
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.pairs, max_steps=a.steps + 1,
                     optim="sgd", learning_rate=1e-3, logging_steps=1, report_to="none", save_strategy="no",
                     use_cpu=True, bf16=False, disable_tqdm=True, max_length=None, dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=data, processing_class=tokenizer)

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    trainer.add_callback(Clock())
    before = _rss_mib()
    trainer.train()
    steps = times[1:]  # the first step warms up
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return dict(mode=a.mode, step_s=statistics.median(steps), steps_s=steps, peak_rss_mib=_peak_mib(),
                rss_before_mib=before, peak_rise_mib=_peak_mib() - before, losses=losses,
                tokens=int(trainer.state.num_input_tokens_seen) if trainer.state.num_input_tokens_seen else None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--pairs", type=int, default=2, help="preference pairs per step (2x sequences)")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence (half prompt, half completion)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (after one warm-up step)")
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per mode")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["stock", "fastpref"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(worker(a)))
        return None

    base = [sys.executable, __file__, "--worker", "--vocab", str(a.vocab), "--hidden", str(a.hidden), "--pairs",
            str(a.pairs), "--seq", str(a.seq), "--steps", str(a.steps), "--threads", str(a.threads)]
    results = {"stock": [], "fastpref": []}
    for r in range(a.repeats):
        for mode in ("stock", "fastpref"):
            proc = subprocess.run(base + ["--mode", mode], capture_output=True, text=True,
                                  env={**os.environ, "TQDM_DISABLE": "1"})
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not line:
                raise RuntimeError(f"{mode} worker failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            results[mode].append(json.loads(line[0][len("RESULT "):]))
            print(f"[{r + 1}/{a.repeats}] {mode:8s} step {results[mode][-1]['step_s']:.3f} s  "
                  f"peak {results[mode][-1]['peak_rss_mib']:.0f} MiB", file=sys.stderr)

    def med(mode, key):
        return statistics.median(x[key] for x in results[mode])

    print(f"One DPO training step (policy fwd+bwd, reference fwd, SGD), tiny Llama body (2 layers, hidden "
          f"{a.hidden}), V = {a.vocab}, {a.pairs} pairs x {a.seq} tokens, fp32, {a.threads} threads; median of "
          f"{a.repeats} fresh processes x {a.steps} steps.\n")
    print("| | step time (s) | peak RSS (MiB) | peak rise during training (MiB) |")
    print("|---|---|---|---|")
    for mode, label in (("stock", "stock TRL 1.16"), ("fastpref", "TRL + fastpref")):
        print(f"| {label} | {med(mode, 'step_s'):.3f} | {med(mode, 'peak_rss_mib'):.0f} | "
              f"{med(mode, 'peak_rise_mib'):.0f} |")
    ratio = med("stock", "step_s") / med("fastpref", "step_s")
    print(f"\nspeed-up {ratio:.2f}x; first-step loss stock {results['stock'][0]['losses'][0]:.6f}, "
          f"fastpref {results['fastpref'][0]['losses'][0]:.6f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(config=vars(a), results=results), f, indent=1)
    return results


if __name__ == "__main__":
    main()
