"""Split heads on torch.distributed (gloo, spawned CPU ranks): vocabulary-parallel primitives (a DTensor
head, sequence-sharded hidden states, the explicit process-group form), DTensor heads gathered for
data-parallel rows, a DPO loss on a vocabulary-parallel head, and DDP / FSDP2 training steps.

Every value and gradient is judged against the fp64 oracle by the accuracy rule (tests/conftest.py);
the shards of each weight gradient are reassembled in rank order first.  Each world size runs all its
cases in one spawn (the ranks' start-up dominates the time).
"""

from __future__ import annotations

import zlib

import pytest
import torch
import torch.distributed as dist
from conftest import assert_accurate, make_head, make_labels

import fastpref as fp
from fastpref import reference as ref
from fastpref.reference import losses as oracle

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLDS = (2, 3)
N, D, DT, V = 24, 16, 12, 37  # V=37 splits unevenly over 2 and 3 ranks (19+18, 13+13+11)
EXPLICIT_SIZES = {2: [30, 7], 3: [5, 20, 12]}  # any consecutive split, not only torch.chunk's
LP_OUTPUTS = ("logp", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _gen(name: str, world: int) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{name}-{world}".encode()))


def _chunk_sizes(v: int, world: int) -> list:
    return [c.shape[0] for c in torch.arange(v).chunk(world)] + [0] * (world - len(torch.arange(v).chunk(world)))


def _upstream(shape, g, differentiable=(True,)):
    return [torch.randn(shape, generator=g, dtype=torch.float64) if d else None for d in differentiable]


# --------------------------------------------------------------------------- cases


def _lp_case(name, world, *, form="dtensor", dtype=torch.float32, bias=None, ignored=0.2, v=V, kw=None,
             labels_in_first_shard=False, rank_all_ignored=False):
    g = _gen(name, world)
    kw = dict(kw or {})
    lead = (world, N) if form == "gather" else ((2, N // 2) if form == "seqshard" else (N,))
    h = torch.randn(*lead, D, generator=g, dtype=torch.float64).to(dtype)
    _, w, b = make_head(1, D, v, dtype=dtype, bias=bias is not None, gen=g)
    labels = make_labels(torch.Size(lead).numel(), v, ignored=ignored, gen=g).reshape(lead)
    if labels_in_first_shard:  # every label inside rank 0's slice: the other ranks hold no target column
        first = _chunk_sizes(v, world)[0]
        labels = torch.where(labels >= 0, labels % first, labels)
    if rank_all_ignored:
        labels[1] = -100
    if "outputs" in kw:
        diff = [n in ("logp", "entropy") for n in ("logp", *kw["outputs"])]
    else:
        diff = [True, True] if kw.get("return_entropy") else [True]
    return dict(op="logprobs", form=form, dtype=dtype, kw=kw, bias_placement=bias,
                sizes=EXPLICIT_SIZES[world], x=dict(hidden=h, weight=w, bias=b, labels=labels),
                upstream=_upstream(lead, g, diff))


def _dv_case(name, world, kind, *, form="dtensor", dtype=torch.float32, bias="shard", kw=None):
    g = _gen(name, world)
    lead = (world, N) if form == "gather" else (N,)
    hs = torch.randn(*lead, D, generator=g, dtype=torch.float64).to(dtype)
    ht = torch.randn(*lead, DT, generator=g, dtype=torch.float64).to(dtype)
    _, ws, bs = make_head(1, D, V, dtype=dtype, bias=bias is not None, gen=g)
    _, wt, bt = make_head(1, DT, V, dtype=dtype, bias=bias is not None, gen=g)
    labels = make_labels(torch.Size(lead).numel(), V, ignored=0.2, gen=g).reshape(lead)
    kw = {"kind": kind, "beta": 0.3, **(kw or {})}
    diff = [True, False] if kw.get("return_entropy") else [True]
    return dict(op="divergence", form=form, dtype=dtype, kw=kw, bias_placement=bias, sizes=EXPLICIT_SIZES[world],
                x=dict(hidden=hs, weight=ws, bias=bs, teacher_hidden=ht, teacher_weight=wt, teacher_bias=bt,
                       labels=labels), upstream=_upstream(lead, g, diff))


def _loss_case(name, world, loss, kw, out_shape, *, bias="shard"):
    """A loss on a vocabulary-parallel policy / student head with a vocabulary-parallel reference / teacher."""
    g = _gen(name, world)
    b, t = 4, 6
    h = torch.randn(b, t, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) * (2.0 / D**0.5)
    bias_t = torch.randn(V, generator=g, dtype=torch.float64) * 0.3 if bias else None
    labels = torch.randint(0, V, (b, t), generator=g)
    labels[:, :2] = -100
    labels[1, -2:] = -100
    rh = h if loss != "distill" else torch.randn(b, t, DT, generator=g, dtype=torch.float64)
    rw = w if loss != "distill" else torch.randn(V, DT, generator=g, dtype=torch.float64) / DT**0.5
    x = dict(hidden=h.float(), weight=w.float(), bias=None if bias_t is None else bias_t.float(), labels=labels,
             ref_hidden=(rh + 0.3 * torch.randn(rh.shape, generator=g, dtype=torch.float64)).float(),
             ref_weight=(rw + 0.05 * torch.randn(rw.shape, generator=g, dtype=torch.float64)).float())
    return dict(op="loss", loss=loss, form="dtensor", dtype=torch.float32, kw=kw, bias_placement=bias, x=x,
                upstream=_upstream(out_shape, g))


def cases_for(world):
    c = {
        "lp-fp32-all-outputs-sharded-bias": _lp_case(
            "a", world, bias="shard", kw=dict(outputs=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"),
                                              temperature=0.8, softcap=6.0, logit_scale=1.3)),
        "lp-bf16-entropy-replicated-bias": _lp_case("b", world, dtype=torch.bfloat16, bias="replicate",
                                                    kw=dict(return_entropy=True)),
        "lp-fp32-labels-in-one-shard": _lp_case("c", world, bias="shard", ignored=0.5, labels_in_first_shard=True,
                                                kw=dict(return_entropy=True)),
        "lp-fp32-all-rows-ignored": _lp_case("d", world, ignored=1.0, kw=dict(return_entropy=True)),
        "lp-fp32-explicit-group": _lp_case("e", world, form="explicit", bias="shard",
                                           kw=dict(return_entropy=True, temperature=1.2)),
        "lp-fp32-sequence-sharded-hidden": _lp_case("f", world, form="seqshard", kw=dict(return_entropy=True)),
        "lp-fp32-tiny-vocab": _lp_case("g", world, v=world + 1, bias="shard", ignored=0.0,
                                       kw=dict(return_entropy=True)),
        "lp-fp32-gathered-rows": _lp_case("h", world, form="gather", bias="shard", rank_all_ignored=True,
                                          kw=dict(return_entropy=True)),
        "lp-bf16-gathered-rows": _lp_case("i", world, form="gather", dtype=torch.bfloat16),
        "dv-jsd-bf16-replicated-bias": _dv_case("m", world, "jsd", dtype=torch.bfloat16, bias="replicate"),
        "dv-jsd-explicit-group": _dv_case("n", world, "jsd", form="explicit", kw=dict(beta=0.7)),
        "dv-jsd-group-of-one": dict(_dv_case("s", world, "jsd", form="explicit", kw=dict(beta=0.6)), sizes=None,
                                    group_of_one=True),
        "dv-reverse_kl-gathered-rows": _dv_case("o", world, "reverse_kl", form="gather"),
        "loss-dpo-ref-head": _loss_case("p", world, "dpo", dict(beta=0.5), (2,)),
        "loss-pmle-exact-kl": _loss_case("q", world, "pmle", dict(gamma=0.5, beta=0.1), (2,), bias=None),
        "loss-distill-jsd-hard": _loss_case("r", world, "distill", dict(
            kind="jsd", beta=0.3, hard_weight=0.5, soft_weight=0.7, temperature=1.2), (4, 6)),
    }
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        c[f"dv-{kind}-fp32"] = _dv_case(f"k-{kind}", world, kind, kw=dict(
            temperature=1.3, student_softcap=5.0, teacher_logit_scale=0.9, return_entropy=True))
    return c


# --------------------------------------------------------------------------- oracle


def _leaves(x, names, cast, rank=None):
    out = []
    for n in names:
        t = x.get(n)
        if t is not None:
            t = cast(t[rank] if (rank is not None and n.endswith("hidden")) else t).detach().requires_grad_()
        out.append(t)
    return out


def _oracle_values(case, leaves, labels, precision):
    kw = dict(case["kw"])
    if case["op"] == "logprobs":
        h, w, b = leaves
        out = ref.linear_logprobs(h, w, labels, b, **kw, precision=precision)
        if isinstance(out, dict):
            return [out[k] for k in ("logp", *kw["outputs"])]
        return list(out) if isinstance(out, tuple) else [out]
    if case["op"] == "divergence":
        h, w, b = leaves
        x = case["x"]
        c = (lambda t: t.double()) if precision == "fp64" else (lambda t: t)
        th = x["teacher_hidden"]
        th = c(th if case["form"] != "gather" else th[case["_rank"]])
        tb = None if x["teacher_bias"] is None else c(x["teacher_bias"])
        out = ref.linear_divergence(h, w, th, c(x["teacher_weight"]), labels, student_bias=b, teacher_bias=tb,
                                    **kw, precision=precision)
        return list(out) if isinstance(out, tuple) else [out]
    h, w, b = leaves
    x = case["x"]
    c = (lambda t: t.double()) if precision == "fp64" else (lambda t: t)
    if case["loss"] == "distill":
        return [oracle.distill(h, w, c(x["ref_hidden"]), c(x["ref_weight"]), labels, student_bias=b, **kw,
                               precision=precision)]
    fn = getattr(oracle, case["loss"])
    return [fn(h, w, labels, b, ref_hidden=c(x["ref_hidden"]), ref_weight=c(x["ref_weight"]), **kw,
               precision=precision)]


def oracle_run(case, precision, world):
    """Values and full gradients of the single-process call (per rank's rows for the gathered form, the
    weight's gradient then averaged over the ranks, as DDP / FSDP2 average)."""
    cast = (lambda t: t.double()) if precision == "fp64" else (lambda t: t)
    x = case["x"]
    ranks = range(world) if case["form"] == "gather" else [None]
    per = []
    for r in ranks:
        case["_rank"] = r
        leaves = _leaves(x, ("hidden", "weight", "bias"), cast, r)
        labels = x["labels"] if r is None else x["labels"][r]
        values = _oracle_values(case, leaves, labels, precision)
        loss = sum((v.double() * (u if r is None else u[r])).sum() for v, u in zip(values, case["upstream"])
                   if u is not None)
        want = [t for t in leaves if t is not None]
        grads = dict(zip([n for n, t in zip(("hidden", "weight", "bias"), leaves) if t is not None],
                         torch.autograd.grad(loss, want)))
        per.append(([v.detach() for v in values], grads))
    if len(per) == 1:
        return per[0]
    values = [torch.stack([p[0][i] for p in per]) for i in range(len(per[0][0]))]
    grads = {"hidden": torch.stack([p[1]["hidden"] for p in per])}
    for k in ("weight", "bias"):
        if k in per[0][1]:
            grads[k] = torch.stack([p[1][k] for p in per]).mean(0)
    return values, grads


# --------------------------------------------------------------------------- running the ranks


# --------------------------------------------------------------------------- DDP / FSDP2 runs

WRAPPERS = {  # wrapper -> what model.lm_head.weight is when the loss reads it, after the forward
    "ddp": "Parameter",  # DDP does not shard: the plain parameter; its gradient hook all-reduces
    "fsdp2-root": "Parameter",  # lm_head in the root's group: FSDP2 keeps it unsharded after the forward
    "fsdp2-head-unit": "DTensor",  # lm_head its own unit, never called: a sharded DTensor, gathered by fastpref
}
DP = dict(vocab=V, dim=16, steps=2, lr=0.5, beta=0.5, B=2, T=5)


def data_parallel_spec(world):
    """Initial parameters, and each step's batch per rank (rank 1's second batch entirely ignored)."""
    from dist_workers import Tiny

    g = _gen("data-parallel", world)
    torch.manual_seed(0)
    model = Tiny(DP["vocab"], DP["dim"])
    state = {k: torch.randn(v.shape, generator=g) * (0.5 if k != "emb.weight" else 1.0)
             for k, v in model.state_dict().items()}
    ids, labels, refs = [], [], []
    for step in range(DP["steps"]):
        ids.append(torch.randint(0, V, (world, DP["B"], DP["T"]), generator=g))
        y = torch.randint(0, V, (world, DP["B"], DP["T"]), generator=g)
        y[:, :, :1] = -100
        if step == 1:
            y[1] = -100
        labels.append(y)
        refs.append(-10.0 + torch.randn(world, 2, 1, generator=g))
    return dict(DP, state=state, ids=ids, labels=labels, ref_logps=refs)


def data_parallel_oracle(spec, world, precision):
    """The single-process run: the mean over ranks of each rank's DPO loss (what DDP / FSDP2 average),
    oracle log-probs, plain SGD."""
    from dist_workers import Tiny

    dtype = torch.float64 if precision == "fp64" else torch.float32
    model = Tiny(spec["vocab"], spec["dim"]).to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in spec["state"].items()})
    for step in range(spec["steps"]):
        model.zero_grad()
        losses = []
        for r in range(world):
            rc, rr = spec["ref_logps"][step][r]
            hidden = model(spec["ids"][step][r])
            losses.append(oracle.dpo(hidden, model.lm_head.weight, spec["labels"][step][r], ref_chosen_logps=rc.to(dtype),
                                     ref_rejected_logps=rr.to(dtype), beta=spec["beta"], precision=precision).mean())
        torch.stack(losses).mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= spec["lr"] * p.grad
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module", params=WORLDS, ids=[f"world{w}" for w in WORLDS])
def spawned(request, tmp_path_factory):
    """One spawn per world size runs every case (the ranks' start-up dominates)."""
    from dist_workers import launch

    world = request.param
    cases = cases_for(world)
    spec = data_parallel_spec(world)
    inputs = dict(cases=cases, errors=ERRORS_INPUT(world), data_parallel={w: spec for w in WRAPPERS})
    results = launch("suite_job", world, tmp_path_factory.mktemp(f"world{world}"), inputs)
    for r, res in enumerate(results):
        print(f"rank {r}: start-up {res['__seconds__'][0]:.1f} s, work {res['__seconds__'][1]:.1f} s")
    return world, cases, [res["cases"] for res in results], results


def _assemble(case, name, results, world):
    """Values and gradients as one process would hold them: shards concatenated in rank order."""
    per_rank = [r[name] for r in results]
    gathered = case["form"] == "gather"
    if gathered:
        values = [None if v is None else torch.stack([p["values"][i] for p in per_rank])
                  for i, v in enumerate(per_rank[0]["values"])]
    else:
        values = per_rank[0]["values"]
        for p in per_rank[1:]:  # every rank holds the same (merged) values
            for a, b in zip(values, p["values"]):
                assert torch.equal(a, b), f"{name}: ranks disagree on an output"
    grads = {}
    for k in ("hidden", "weight", "bias"):
        gs = [p["grads"][k] for p in per_rank]
        if gs[0] is None:
            continue
        sharded = k == "weight" or (k == "bias" and case.get("bias_placement") != "replicate")
        if gathered and k == "hidden":  # each rank's own rows
            grads[k] = torch.stack(gs)
        elif sharded and not case.get("group_of_one"):  # each rank's slice of the vocabulary
            grads[k] = torch.cat(gs)
        else:  # replicated: every rank must hold the same gradient
            for other in gs[1:]:
                assert torch.equal(gs[0], other), f"{name}: ranks disagree on d {k}"
            grads[k] = gs[0]
    return values, grads


@pytest.mark.parametrize("name", list(cases_for(2)))
def test_split_head_matches_single_process(spawned, name):
    world, cases, results, _ = spawned
    case = cases[name]
    dtype = case["dtype"]
    values, grads = _assemble(case, name, results, world)
    t_values, t_grads = oracle_run(case, "fp64", world)
    n_values, n_grads = oracle_run(case, "native", world)
    labels = case["x"]["labels"]
    for i, (o, nv, t) in enumerate(zip(values, n_values, t_values)):
        if o.dtype == torch.bool:  # is_top1: exact
            assert torch.equal(o, t), f"{name}: is_top1 differs on {(o != t).sum().item()} rows"
            continue
        assert o.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        if case["op"] != "loss":
            assert (o[labels == -100] == 0).all(), f"{name}: output {i} not 0 on ignored rows"
        assert_accurate(f"{name}[{i}]", o, nv, t, dtype)
    assert set(grads) == set(t_grads), f"{name}: gradients of {sorted(grads)} != {sorted(t_grads)}"
    for k in t_grads:
        assert grads[k].dtype == dtype, f"{name}: d {k} dtype {grads[k].dtype}"
        assert_accurate(f"{name} d_{k}", grads[k], n_grads[k], t_grads[k], dtype)


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_data_parallel_two_steps_match_single_process(spawned, wrapper):
    world, _, _, results = spawned
    spec = data_parallel_spec(world)
    for r, res in enumerate(results):
        assert res[wrapper]["weight_types"] == [WRAPPERS[wrapper]] * spec["steps"], f"rank {r}"
    states = [res[wrapper]["state"] for res in results]
    for r, st in enumerate(states[1:], 1):  # synchronised: every rank ends with the same parameters
        for k in st:
            assert torch.equal(st[k], states[0][k]), f"rank {r} and rank 0 differ on {k}"
    truth = data_parallel_oracle(spec, world, "fp64")
    naive = data_parallel_oracle(spec, world, "native")
    for k, t in truth.items():
        moved = (t - spec["state"][k].double()).abs().max().item()
        assert moved > 1e-3, f"{k} barely moved ({moved:.1e}): the test would not see a missing gradient"
        assert_accurate(f"{wrapper} {k}", states[0][k], naive[k], t, torch.float32)


# --------------------------------------------------------------------------- bad input

ERRORS = {  # case -> (exception, the argument its message must name first)
    "hidden-dtensor-plain-weight": (TypeError, "hidden"),
    "weight-replicated-with-dtensor-hidden": (ValueError, "weight"),
    "bias-plain-with-vocab-parallel": (ValueError, "bias"),
    "labels-dtensor": (TypeError, "labels"),
    "process-group-with-dtensor": (TypeError, "weight"),
    "process-group-not-a-group": (TypeError, "process_group"),
    "teacher-plain-vocab-parallel": (ValueError, "teacher_weight"),
    "teacher-hidden-dtensor-gathered": (TypeError, "teacher_hidden"),
    "explicit-rows-differ": (ValueError, "hidden"),
    "label-out-of-range-explicit": (ValueError, "labels"),
}


def ERRORS_INPUT(world):
    g = _gen("errors", world)
    h, w, b = make_head(N, D, V, bias=True, gen=g)
    return dict(x=dict(hidden=h, weight=w, bias=b, labels=make_labels(N, V, gen=g)), sizes=EXPLICIT_SIZES[world])


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_distributed_input(spawned, case):
    world, _, _, results = spawned
    exc, arg = ERRORS[case]
    for r, res in enumerate(results):
        got = res["errors"][case]
        assert got is not None, f"rank {r}: {case} did not raise"
        assert got[0] == exc.__name__, f"rank {r}: {case} raised {got[0]}: {got[1]}"
        assert got[1].startswith(f"{arg}:"), f"rank {r}: {case}: message does not name {arg!r}: {got[1]}"


# --------------------------------------------------------------------------- without spawning


def test_import_does_not_load_dtensor():
    """DTensor support costs nothing until DTensors exist: ``import fastpref`` leaves
    torch.distributed.tensor unimported (about 2 s)."""
    import subprocess
    import sys

    code = "import sys, fastpref; print('torch.distributed.tensor' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False"], out


def test_zero3_partitioned_weight_is_named(gen):
    """A DeepSpeed ZeRO-3 parameter outside its module's forward is an empty tensor with ``ds_shape``."""
    h, w, _ = make_head(4, D, V, gen=gen)
    labels = make_labels(4, V, gen=gen)
    partitioned = torch.nn.Parameter(torch.empty(0))
    partitioned.ds_shape = w.shape
    with pytest.raises(ValueError, match=r"^weight: a DeepSpeed ZeRO-3 partitioned parameter \(full shape \(37, 16\)\)"):
        fp.linear_logprobs(h, partitioned, labels)
    with pytest.raises(ValueError, match=r"^student_weight: a DeepSpeed ZeRO-3"):
        fp.linear_divergence(h, partitioned, h, w, labels)


@pytest.mark.slow
def test_bench_distributed_quick(tmp_path):
    """``fastpref-bench --distributed --quick``: files written, the bytes each collective moved as designed."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastpref.bench", "--distributed", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp_path / "distributed.json").read_text())
    assert (tmp_path / "distributed.md").read_text().count("\n| ") >= 8
    n, d, v = (data["config"][k] for k in ("N", "D", "V"))
    rows = {(s["workload"], s["world"], s["mode"]): s for s in data["summary"]}
    vp = rows[("logprobs", 2, "vocab-parallel")]
    assert vp["fwd_payload_bytes"] == 7 * n * 4 and vp["bwd_payload_bytes"] == n * d * 4
    jsd = rows[("jsd", 2, "vocab-parallel")]
    assert jsd["fwd_calls"] == 3 and jsd["fwd_payload_bytes"] == (2 + 6 + 2) * n * 4
    gathered = rows[("logprobs", 2, "gathered")]
    assert gathered["fwd_ops"] == ["all_gather"] and gathered["bwd_ops"] == ["reduce_scatter"]
    assert gathered["bwd_payload_bytes"] == -(-v // 2) * 2 * d * 4  # the padded full gradient
    assert rows[("logprobs", 1, "single")]["fwd_calls"] == 0
