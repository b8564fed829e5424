"""What every loss shares: argument checks (once, at the loss's boundary, with the names the user
passed), per-sequence log-probs from the fused primitive, reference log-probs (precomputed or from a
frozen head in the same call), the exact token-level KL, the two reductions, and the metrics.

Signatures.  Every loss takes ``(hidden, weight, labels, bias=None, *, ...)`` (``distill_loss``:
the student head, the teacher head, then ``labels``), then keyword-only, in this order: per-batch
tensors (``ref_*``, ``rewards``, ``desirable``, ...), the loss's hyper-parameters, then the common
options ``ignore_index, temperature, softcap, reduction, [num_items_in_batch,] return_metrics,
backend``.

Metrics (``return_metrics=True``): one schema for every loss; all values are detached.

=================== ======= ==================================================================
key                 shape   meaning
=================== ======= ==================================================================
chosen_logps        (P,)    summed log-prob ``ℓ`` of each first (chosen) response   [paired]
rejected_logps      (P,)    summed log-prob ``ℓ`` of each second (rejected) response [paired]
chosen_rewards      (P,)    the loss's implicit reward of each first response        [paired]
rejected_rewards    (P,)    the same for each second response                        [paired]
logps               (B,)    summed log-prob ``ℓ`` of each sequence                   [unpaired]
rewards             (B,)    the loss's implicit reward of each sequence              [kto, npo]
reward_margin       ()      mean of chosen minus rejected reward (KTO: mean desirable reward
                            minus mean undesirable reward)
reward_accuracy     ()      fraction of pairs whose chosen reward is the larger       [paired]
preference_loss     ()      mean over pairs of the loss without its NLL and KL terms  [paired]
nll                 ()      the NLL term before its weight, when the loss has one
kl                  ()      mean per-sequence ``KL(π‖π₀)`` estimate, when one is computed
                            (KTO: its reference point ``z₀``)
entropy             ()      mean per-sequence entropy estimate                       [reverse_kl]
score               ()      mean reward-model score ``R̂``                            [reverse_kl]
objective           ()      mean of ``R̂ + γ H - β KL``, what reverse_kl_loss maximises
=================== ======= ==================================================================

Scalars are 0 on an empty batch.  Rewards: DPO ``β ρ``; SimPO, ORPO, CPO-simpo/ipo ``β ℓ/n``;
CPO ``β ℓ`` (AlphaPO: ``β r``); PMLE and preference distillation ``γ ℓ``; KTO, NPO ``β ρ``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import _validate as V
from ..backends.contract import DivergenceOptions, Kind, LogprobsOptions, Transform
from ..objectives import _mean0, _vector
from ..primitives import divergence_rows, logprobs_rows

REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "torch", "triton", "cuda")


class Common(NamedTuple):
    """The options every loss passes to the primitives, checked once."""

    ignore_index: int
    temperature: float
    softcap: Optional[float]
    backend: str

    def kw(self) -> dict:
        return dict(ignore_index=self.ignore_index, temperature=self.temperature, softcap=self.softcap,
                    backend=self.backend)

    @property
    def transform(self) -> Transform:
        return Transform(self.temperature, self.softcap)

    def logprobs_options(self, **outputs: bool) -> LogprobsOptions:
        """Options of the unchecked primitive (the loss has validated everything already)."""
        return LogprobsOptions(ignore_index=self.ignore_index, transform=self.transform, **outputs)


def check_common(*, ignore_index, temperature, softcap, backend, reduction=None, return_metrics=False) -> Common:
    V.check_ignore_index(ignore_index)
    out = Common(ignore_index, V.check_positive(temperature, "temperature"),
                 V.check_optional_positive(softcap, "softcap"), V.check_choice(backend, "backend", BACKENDS))
    if reduction is not None:
        V.check_choice(reduction, "reduction", REDUCTIONS)
    check_bool(return_metrics, "return_metrics")
    return out


def check_bool(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def check_sequences(hidden, weight, labels, bias, opts: Common, *, paired: bool) -> torch.Tensor:
    """hidden ``(B, T, D)``, labels ``(B, T)`` in ``[0, V)`` or ``ignore_index``; ``B`` even for
    paired losses.  Returns the labels as int64."""
    V.check_head(hidden, weight, bias)
    if hidden.dim() != 3:
        raise ValueError(f"hidden: expected shape (B, T, D), got {tuple(hidden.shape)}")
    labels = V.check_labels(labels, hidden, weight.shape[0], opts.ignore_index)
    if paired and hidden.shape[0] % 2:
        raise ValueError(
            f"hidden: expected an even number of sequences (first half chosen/first responses, "
            f"second half rejected/second responses), got {hidden.shape[0]}"
        )
    return labels


def check_reference_head(ref_hidden, ref_weight, ref_bias, hidden, weight, *, names=("ref_hidden", "ref_weight",
                         "ref_bias"), of=("hidden", "weight")) -> bool:
    """The frozen reference (or teacher) head, if given, checked with the names the user passed:
    same device as ``hidden``, same vocabulary as ``weight``, same leading shape as ``hidden`` (the
    hidden size and dtype may differ).  Returns whether it is given."""
    h_name, w_name, b_name = names
    if ref_hidden is None and ref_weight is None:
        if ref_bias is not None:
            raise ValueError(f"{b_name}: given without {h_name} and {w_name}")
        return False
    if ref_hidden is None or ref_weight is None:
        raise ValueError(f"{w_name}: {h_name} and {w_name} must be given together")
    V.check_float_tensor(ref_hidden, h_name)
    V.check_same_device(hidden, of[0], ref_hidden, h_name)
    V.check_head(ref_hidden, ref_weight, ref_bias, hidden_name=h_name, weight_name=w_name, bias_name=b_name)
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"{w_name}: expected vocabulary V={weight.shape[0]} (that of {of[1]}), got shape {tuple(ref_weight.shape)}"
        )
    if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"{h_name}: expected leading shape {tuple(hidden.shape[:-1])} (that of {of[0]}), got "
            f"{tuple(ref_hidden.shape)}"
        )
    return True


def check_logps_vector(t, name: str, n: int, hidden: torch.Tensor) -> Optional[torch.Tensor]:
    """A per-sequence tensor option: ``(n,)`` on ``hidden``'s device (or None)."""
    return None if t is None else _vector(t, name, n=n, like=hidden, like_name="hidden")


# ----------------------------------------------------------------------------- log-probs


class SeqLogps(NamedTuple):
    """Per-sequence summed log-probs ``logps (B,)`` (LD-DPO-weighted when asked), the plain sums
    ``plain (B,)``, completion lengths ``lengths (B,)``, the token-level values ``token_logps (B, T)``,
    the mask of counted tokens and, when asked, ``token_entropy (B, T)`` and
    ``token_log_sum_sq (B, T)`` (``log Σ_v p_v²``, no gradient)."""

    logps: torch.Tensor
    plain: torch.Tensor
    lengths: torch.Tensor
    token_logps: torch.Tensor
    mask: torch.Tensor
    token_entropy: Optional[torch.Tensor]
    token_log_sum_sq: Optional[torch.Tensor] = None


def sequence_logps(hidden, weight, labels, bias, opts: Common, *, ld_alpha: Optional[float] = None,
                   return_entropy: bool = False, return_log_sum_sq: bool = False) -> SeqLogps:
    """One fused pass over already-validated inputs (labels int64)."""
    out = logprobs_rows(hidden, weight, labels, bias,
                        opts.logprobs_options(entropy=return_entropy, log_sum_sq_probs=return_log_sum_sq),
                        opts.backend)
    tok, ent = out.logp, out.entropy
    mask = labels != opts.ignore_index
    lengths = mask.sum(-1)
    plain = tok.sum(-1)
    logps = plain
    if ld_alpha is not None:  # LD-DPO: tokens past the shorter response of the pair count ld_alpha times
        half = labels.shape[0] // 2
        public = torch.minimum(lengths[:half], lengths[half:]).repeat(2)
        rank = mask.cumsum(-1)  # 1-based position among the counted tokens
        rear = mask & (rank > public.unsqueeze(-1))
        logps = torch.where(rear, tok * ld_alpha, tok).sum(-1)
    return SeqLogps(logps, plain, lengths.to(tok.dtype), tok, mask, ent, out.log_sum_sq_probs)


def reference_logps(labels, opts: Common, *, have_head: bool, ref_hidden, ref_weight, ref_bias,
                    precomputed: Optional[torch.Tensor], ld_alpha: Optional[float] = None) -> Optional[torch.Tensor]:
    """``ℓ₀ (B,)``: the (already checked) precomputed tensor, or a no-grad fused pass over the reference head."""
    if have_head:
        with torch.no_grad():
            return sequence_logps(ref_hidden.detach(), ref_weight.detach(), labels,
                                  None if ref_bias is None else ref_bias.detach(), opts, ld_alpha=ld_alpha).logps
    if precomputed is None:
        return None
    return precomputed.detach()


def one_reference(*, ref_logps, have_head: bool, name: str = "ref_logps") -> None:
    if ref_logps is not None and have_head:
        raise ValueError(f"{name}: give precomputed reference log-probs or ref_hidden/ref_weight, not both")


def token_exact_kl(hidden, weight, labels, bias, opts: Common, *, ref_hidden, ref_weight, ref_bias) -> torch.Tensor:
    """``Σ_t KL(π(·|y<t) ‖ π₀(·|y<t))`` along each sequence's path (B,), exact over the vocabulary.
    The reference head must have been checked (:func:`check_reference_head`)."""
    div_opts = DivergenceOptions(kind=Kind.REVERSE_KL, ignore_index=opts.ignore_index, student=opts.transform,
                                 teacher=opts.transform)
    kl, _ = divergence_rows(hidden, weight, ref_hidden, ref_weight, labels, bias, ref_bias, div_opts, opts.backend)
    return kl.sum(-1)


# ----------------------------------------------------------------------------- reductions


def reduce(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    """Sequence-level reduction over pairs (or sequences): mean (0 when empty), sum, or none."""
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return _mean0(losses)


def check_num_items(num_items_in_batch):
    if num_items_in_batch is None or isinstance(num_items_in_batch, torch.Tensor):
        return num_items_in_batch
    if V.check_int(num_items_in_batch, "num_items_in_batch") < 1:
        raise ValueError(f"num_items_in_batch: expected an int >= 1, got {num_items_in_batch}")
    return num_items_in_batch


def reduce_tokens(per_token: torch.Tensor, mask: Optional[torch.Tensor], reduction: str,
                  num_items_in_batch=None) -> torch.Tensor:
    """Token-level reduction: ``"none"`` the per-token values; ``"sum"``; ``"mean"`` over the counted
    tokens (``mask``; every token when None; 0 when none count).  A given ``num_items_in_batch``
    (gradient accumulation) divides the sum instead, whatever the reduction."""
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            return total / num_items_in_batch.to(total.device, total.dtype).clamp(min=1)
        return total / num_items_in_batch
    if reduction == "sum":
        return total
    count = per_token.numel() if mask is None else mask.sum()
    if isinstance(count, int):
        return total / max(count, 1)
    return total / count.clamp(min=1).to(total.dtype)


# ----------------------------------------------------------------------------- metrics


def pair_metrics(logps: torch.Tensor, rewards: torch.Tensor, preference_losses: torch.Tensor, **extra) -> dict:
    """The paired part of the schema; ``extra`` scalars (``nll``, ``kl``) are added when not None."""
    half = logps.shape[0] // 2
    rw, rl = rewards[:half].detach(), rewards[half:].detach()
    out = {
        "chosen_logps": logps[:half].detach(),
        "rejected_logps": logps[half:].detach(),
        "chosen_rewards": rw,
        "rejected_rewards": rl,
        "reward_margin": _mean0(rw - rl),
        "reward_accuracy": _mean0((rw > rl).to(rw.dtype)),
        "preference_loss": _mean0(preference_losses.detach()),
    }
    out.update({k: v.detach() for k, v in extra.items() if v is not None})
    return out
