"""The toy study of arXiv 2506.01523 ("Alignment as Distribution Learning"), in miniature, with
fastpref's own losses end to end.

Tabular world: 10 contexts x 10 single-token responses.  The logits of the target π* and of
the reference π₀ are drawn N(0, 0.1²).  Preference data: x uniform, a, b ~ π₀(x) independently,
and a ≻ b with probability σ(γ (log π*(a|x) - log π*(b|x))), γ = 0.5.  A policy is a logit table
θ (V x X): fastpref sees it as an LM head ``weight`` and the context as a one-hot ``hidden``, so
every loss below runs through ``linear_logprobs`` exactly as it would for an LLM.

Methods (each fitted by the same full-batch Adam schedule, starting from π₀):
  pmle           fastpref.pmle_loss(γ)                              -> π ∝ π*
  pref_distill   Bradley-Terry reward R̂ fitted on the pairs, then
                 fastpref.preference_distillation_loss(γ) on all response pairs  -> π ∝ exp(R̂/γ)
  reverse_kl     fastpref.reverse_kl_loss(β=0, entropy γ), exact expectation     -> π ∝ exp(R̂/γ)
  dpo            fastpref.dpo_loss(β=γ) against π₀                   -> π ∝ π₀·π*  (biased)
  rlhf           fastpref.reverse_kl_loss(β=γ, no entropy), exact    -> π ∝ π₀·exp(R̂/γ)  (biased)
and reports the forward KL(π* ‖ π̂), averaged over contexts, against the number of pairs n.

    python examples/toy_distribution_learning.py               # n = 2^5 .. 2^14, 5 seeds
    python examples/toy_distribution_learning.py --max-log2-n 16 --seeds 10 --out toy-results
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

import fastpref as fp

X, Y, GAMMA = 10, 10, 0.5
METHODS = ("pmle", "pref_distill", "reverse_kl", "dpo", "rlhf")


def make_world(seed: int):
    g = torch.Generator().manual_seed(seed)
    star = torch.log_softmax(0.1 * torch.randn(X, Y, generator=g, dtype=torch.float64), -1)
    ref = torch.log_softmax(0.1 * torch.randn(X, Y, generator=g, dtype=torch.float64), -1)
    return star, ref, g


def sample_pairs(star, ref, n, g):
    """n preference pairs: (context, preferred, dispreferred)."""
    x = torch.randint(0, X, (n,), generator=g)
    a = torch.multinomial(ref.exp()[x], 1, generator=g).squeeze(1)
    b = torch.multinomial(ref.exp()[x], 1, generator=g).squeeze(1)
    p_a = torch.sigmoid(GAMMA * (star[x, a] - star[x, b]))
    a_wins = torch.rand(n, generator=g, dtype=torch.float64) < p_a
    return x, torch.where(a_wins, a, b), torch.where(a_wins, b, a)


def as_sequences(ctx, tok):
    """One-hot contexts (B, 1, X) as hidden states, single-token labels (B, 1)."""
    return torch.nn.functional.one_hot(ctx, X).to(torch.float64).unsqueeze(1), tok.view(-1, 1)


def fit(loss_fn, init, steps, lr):
    theta = init.clone().requires_grad_()
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(theta).backward()
        opt.step()
    return theta.detach()


def forward_kl(star, theta):
    """Mean over contexts of KL(π*(·|x) ‖ π_θ(·|x)); θ is the (Y, X) head."""
    log_pi = torch.log_softmax(theta.T, -1)
    return (star.exp() * (star - log_pi)).sum(-1).mean().item()


def run_one(seed, n, steps=300, lr=0.05, methods=METHODS):
    star, ref, g = make_world(seed)
    x, win, lose = sample_pairs(star, ref, n, g)
    hidden, labels = as_sequences(torch.cat([x, x]), torch.cat([win, lose]))
    init = ref.T.clone()  # (Y, X): the head whose logits are log π₀
    # all (context, response) rows, for exact expectations under the policy
    all_ctx = torch.arange(X).repeat_interleave(Y)
    all_tok = torch.arange(Y).repeat(X)
    all_h, all_y = as_sequences(all_ctx, all_tok)
    ref_logps = ref[all_ctx, all_tok]

    out = {}
    if "pmle" in methods:
        out["pmle"] = fit(lambda th: fp.pmle_loss(hidden, th, labels, gamma=GAMMA), init, steps, lr)
    if "dpo" in methods:
        ref_seq = ref[torch.cat([x, x]), torch.cat([win, lose])]
        out["dpo"] = fit(lambda th: fp.dpo_loss(hidden, th, labels, ref_chosen_logps=ref_seq[:n],
                                                ref_rejected_logps=ref_seq[n:], beta=GAMMA), init, steps, lr)
    if not {"pref_distill", "reverse_kl", "rlhf"} & set(methods):
        return star, out
    # Bradley-Terry reward model on the same pairs: -log σ(R(a+) - R(a-)), a tabular (X, Y) reward
    reward = fit(lambda r: fp.objectives.pmle(r[x, win], r[x, lose], gamma=1.0).mean(),
                 torch.zeros(X, Y, dtype=torch.float64), steps, lr)
    if "pref_distill" in methods:
        # every ordered pair (a1, a2) of every context, weighted by μ = π₀ x π₀
        cx = torch.arange(X).repeat_interleave(Y * Y)
        a1 = torch.arange(Y).repeat_interleave(Y).repeat(X)
        a2 = torch.arange(Y).repeat(Y * X)
        h2, y2 = as_sequences(torch.cat([cx, cx]), torch.cat([a1, a2]))
        w_pairs = (ref[cx, a1] + ref[cx, a2]).exp() / X
        out["pref_distill"] = fit(lambda th: (w_pairs * fp.preference_distillation_loss(
            h2, th, y2, gamma=GAMMA, reward_a=reward[cx, a1], reward_b=reward[cx, a2], reduction="none")).sum(),
            init, steps, lr)

    def exact_policy_gradient(beta, gamma):
        def loss(th):
            per = fp.reverse_kl_loss(all_h, th, all_y, rewards=reward[all_ctx, all_tok], beta=beta, gamma=gamma,
                                     num_samples_per_prompt=1, ref_logps=ref_logps if beta else None,
                                     reduction="none")
            pi = torch.softmax(th.T, -1).detach()[all_ctx, all_tok]
            return (pi * per).sum() / X
        return loss

    if "reverse_kl" in methods:
        out["reverse_kl"] = fit(exact_policy_gradient(0.0, GAMMA), init, steps, lr)
    if "rlhf" in methods:
        out["rlhf"] = fit(exact_policy_gradient(GAMMA, 0.0), init, steps, lr)
    return star, out


def run_study(log2_ns, seeds, steps=300, lr=0.05, methods=METHODS, progress=False):
    """``{method: [mean forward KL over seeds, for each n]}`` and the ``n`` list."""
    ns = [2**k for k in log2_ns]
    table = {m: [] for m in methods}
    for n in ns:
        t0 = time.perf_counter()
        acc = {m: 0.0 for m in methods}
        for s in seeds:
            star, fitted = run_one(s, n, steps, lr, methods)
            for m in methods:
                acc[m] += forward_kl(star, fitted[m]) / len(seeds)
        for m in methods:
            table[m].append(acc[m])
        if progress:
            print(f"n=2^{int(math.log2(n)):<2d} " + "  ".join(f"{m}={acc[m]:.2e}" for m in methods)
                  + f"  ({time.perf_counter() - t0:.1f}s)", flush=True)
    return ns, table


def plot(ns, table, path, seeds):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for m in METHODS:
        ax.loglog(ns, table[m], marker="o", label=m, linestyle="--" if m in ("dpo", "rlhf") else "-")
    anchor = table["pmle"][-1] * ns[-1]  # the O(1/n) guide through PMLE's largest-n point
    ax.loglog(ns, [anchor / n for n in ns], color="gray", linewidth=0.8, label="O(1/n)")
    ax.set_xlabel("number of preference pairs n")
    ax.set_ylabel("KL(π* ‖ π̂), mean over contexts")
    ax.set_title(f"Toy study (10 contexts x 10 tokens, γ={GAMMA}, {seeds} seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print("wrote", path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--min-log2-n", type=int, default=5)
    ap.add_argument("--max-log2-n", type=int, default=14)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--out", default="toy-results")
    ap.add_argument("--replot", metavar="JSON", help="only redraw the figure from a saved toy_study.json")
    args = ap.parse_args(argv)
    if args.replot:
        with open(args.replot) as f:
            saved = json.load(f)
        plot(saved["n"], saved["forward_kl"], os.path.join(os.path.dirname(args.replot), "toy_study.png"),
             saved["seeds"])
        return
    torch.set_num_threads(1)
    ns, table = run_study(range(args.min_log2_n, args.max_log2_n + 1), range(args.seeds), args.steps, args.lr,
                          progress=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "toy_study.json"), "w") as f:
        json.dump({"n": ns, "forward_kl": table, "gamma": GAMMA, "seeds": args.seeds, "steps": args.steps}, f, indent=1)
    lines = ["| n | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    lines += [f"| 2^{int(math.log2(n))} | " + " | ".join(f"{table[m][i]:.2e}" for m in METHODS) + " |"
              for i, n in enumerate(ns)]
    with open(os.path.join(args.out, "toy_study.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(ns, table, os.path.join(args.out, "toy_study.png"), args.seeds)


if __name__ == "__main__":
    main()
