"""The public surface: names, docstrings, ``__all__``, the module twins' signatures and values, lazy
submodules, the size of ``help(fastpref)``, and one version everywhere."""

from __future__ import annotations

import importlib
import inspect
import pydoc
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import load_pyproject

import fastpref as fp
import fastpref.modules

ROOT = Path(__file__).resolve().parents[1]

PUBLIC_MODULES = [
    "fastpref", "fastpref.losses", "fastpref.objectives", "fastpref.modules", "fastpref.primitives",
    "fastpref.reference", "fastpref.reference.losses", "fastpref.reference.primitives", "fastpref.distributed",
    "fastpref.integrations", "fastpref.integrations.trl", "fastpref.integrations.trl_trainers",
]
NEEDS_TRL = {"fastpref.integrations.trl_trainers"}

# twin -> the function it must twin (written out here, not read from the twin)
TWINS = {
    "LinearLogprobs": fp.linear_logprobs, "SequenceLogprobs": fp.sequence_logprobs,
    "LinearDivergence": fp.linear_divergence, "DPOLoss": fp.dpo_loss, "PMLELoss": fp.pmle_loss,
    "PreferenceDistillationLoss": fp.preference_distillation_loss, "ReverseKLLoss": fp.reverse_kl_loss,
    "PolicyKLLoss": fp.policy_kl_loss, "SimPOLoss": fp.simpo_loss, "CPOLoss": fp.cpo_loss, "ORPOLoss": fp.orpo_loss,
    "KTOLoss": fp.kto_loss, "NPOLoss": fp.npo_loss, "NLLLoss": fp.nll_loss, "DistillLoss": fp.distill_loss,
}


def _import(name: str) -> types.ModuleType:
    if name in NEEDS_TRL:
        pytest.importorskip("trl", reason="fastpref.integrations.trl_trainers needs TRL")
    return importlib.import_module(name)


def _own_doc(obj) -> str:
    """The object's own docstring (``inspect.getdoc`` would fall back to a base class's)."""
    return (obj.__doc__ or "").strip()


# ----------------------------------------------------------------------------- names and docstrings


def test_every_public_module_is_listed():
    """A new public module (no leading underscore, outside backends/ops/bench) must be added above."""
    found = {"fastpref"}
    for path in (ROOT / "fastpref").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if any(p.startswith("_") for p in parts) or parts[1:2] in (("backends",), ("ops",), ("bench",)):
            continue
        if parts[1:2] == ("losses",) and len(parts) > 2:  # one file per family; the package is the API
            continue
        found.add(".".join(parts))
    assert found == set(PUBLIC_MODULES)


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_module_has_all_and_docstrings(name):
    mod = _import(name)
    assert _own_doc(mod), f"{name} has no docstring"
    assert isinstance(getattr(mod, "__all__", None), list), f"{name} has no __all__ list"
    assert len(mod.__all__) == len(set(mod.__all__)), f"{name}.__all__ has duplicates"
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"{name}.__all__ names missing attributes: {missing}"
    undocumented = [
        n for n in mod.__all__
        if (inspect.isfunction(getattr(mod, n)) or inspect.isclass(getattr(mod, n)) or inspect.ismodule(getattr(mod, n)))
        and not _own_doc(getattr(mod, n))
    ]
    assert not undocumented, f"{name}: no docstring on {undocumented}"


def test_package_names():
    for name in fp.__all__:
        obj = getattr(fp, name)
        assert _own_doc(obj), f"fastpref.{name} has no docstring"
    for name in ("get_workspace_bytes", "set_workspace_bytes", "get_keep_logits", "set_keep_logits",
                 "available_backends", "linear_logprobs", "sequence_logprobs", "linear_divergence", "dpo_loss"):
        assert name in fp.__all__
    # the twins are public attributes of the package, documented in fastpref.modules
    for name in TWINS:
        assert getattr(fp, name) is getattr(fastpref.modules, name)
        assert name in fastpref.modules.__all__
        assert _own_doc(getattr(fp, name).forward) and _own_doc(getattr(fp, name).__init__)
    # twins' old homes still resolve
    assert fp.losses.DPOLoss is fp.DPOLoss and fp.primitives.LinearLogprobs is fp.LinearLogprobs
    with pytest.raises(AttributeError):
        fp.losses.NoSuchLoss  # noqa: B018


def test_help_is_short():
    text = pydoc.render_doc(fp, renderer=pydoc.plaintext)
    lines = len(text.splitlines())
    print(f"help(fastpref): {lines} lines")
    assert lines < 1500
    assert "Methods inherited from torch.nn.modules.module.Module" not in text
    for name in ("dpo_loss", "linear_logprobs", "set_keep_logits", "DPOLoss", "fastpref.reference"):
        assert name in text


def test_lazy_submodules_in_a_fresh_interpreter():
    code = (
        "import sys, fastpref\n"
        "lazy = ('fastpref.reference', 'fastpref.integrations', 'fastpref.integrations.trl', 'trl')\n"
        "assert not [m for m in lazy if m in sys.modules], [m for m in lazy if m in sys.modules]\n"
        "assert 'reference' in dir(fastpref) and 'integrations' in dir(fastpref)\n"
        "fastpref.reference.losses.dpo, fastpref.reference.linear_logprobs\n"
        "assert fastpref.integrations.__name__ == 'fastpref.integrations'\n"
        "assert 'trl' not in sys.modules\n"
        "fastpref.objectives.dpo, fastpref.distributed.is_dtensor, fastpref.modules.DPOLoss\n"
        "try:\n    fastpref.no_such_name\nexcept AttributeError as e:\n    assert 'no_such_name' in str(e)\n"
        "else:\n    raise SystemExit('no AttributeError')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


# ----------------------------------------------------------------------------- module twins


def _is_per_call(p: inspect.Parameter) -> bool:
    return p.kind is not p.KEYWORD_ONLY or p.name == "num_items_in_batch" or "Tensor" in str(p.annotation)


@pytest.mark.parametrize("name", sorted(TWINS))
def test_twin_signatures(name):
    cls, fn = getattr(fp, name), TWINS[name]
    init = inspect.signature(cls)
    forward = inspect.signature(cls.forward)
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    assert not [p for p in init.parameters.values() if p.kind in variadic], init
    assert not [p for p in forward.parameters.values() if p.kind in variadic], forward
    assert all(p.kind is p.KEYWORD_ONLY for p in init.parameters.values())
    assert list(forward.parameters)[0] == "self"

    fn_params = inspect.signature(fn).parameters
    options = [p for p in fn_params.values() if not _is_per_call(p)]
    tensors = [p for p in fn_params.values() if _is_per_call(p)]
    assert list(init.parameters.values()) == options  # names, kinds, defaults and annotations
    assert list(forward.parameters.values())[1:] == tensors
    assert inspect.signature(cls.__init__).parameters.keys() == {"self", *init.parameters}
    # every positional argument of the function is a forward argument, and no hyper-parameter is
    assert {"backend"} <= set(init.parameters) and not {"backend", "beta", "temperature"} & set(forward.parameters)
    assert cls.function is fn

    doc = cls.__doc__
    assert doc.startswith(f"``nn.Module`` twin of :func:`fastpref.{fn.__name__}`:")
    first_sentence = " ".join(inspect.cleandoc(fn.__doc__).split("\n\n")[0].split())
    assert first_sentence in " ".join(doc.split())
    assert inspect.cleandoc(fn.__doc__) in doc  # the function's whole documentation follows


def test_twin_construction_errors():
    with pytest.raises(TypeError, match="betta"):
        fp.DPOLoss(betta=0.1)
    with pytest.raises(TypeError, match="gamma"):
        fp.PMLELoss()
    with pytest.raises(TypeError, match=r"\['beta', 'gamma', 'num_samples_per_prompt'\]"):
        fp.ReverseKLLoss()
    with pytest.raises(TypeError, match="keyword-only"):
        fp.DPOLoss(0.1)
    assert repr(fp.DPOLoss(beta=0.2, loss_type="ipo")) == "DPOLoss(beta=0.2, loss_type='ipo')"


P, T, D, V = 2, 5, 8, 13


def _case(name: str, g: torch.Generator):
    """(options, positional tensors, keyword tensors) for a small random case of each twin."""
    B = 2 * P
    h = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.1
    y = torch.randint(0, V, (B, T), generator=g)
    y[:, :2] = -100  # a prompt
    th = torch.randn(B, T, 6, generator=g, dtype=torch.float64)
    tw = torch.randn(V, 6, generator=g, dtype=torch.float64) / 6**0.5
    ref = torch.randn(B, generator=g, dtype=torch.float64) - 8.0
    rew = torch.randn(B, generator=g, dtype=torch.float64)
    head = (h, w, y, b)
    cases = {
        "LinearLogprobs": (dict(temperature=0.7, outputs=("entropy", "is_top1")), head, {}),
        "SequenceLogprobs": (dict(average=True, softcap=3.0), head, {}),
        "LinearDivergence": (dict(kind="jsd", beta=0.3), (h, w, th, tw, y), dict(student_bias=b)),
        "DPOLoss": (dict(beta=0.3, loss_type="ipo", return_metrics=True), head,
                    dict(ref_chosen_logps=ref[:P], ref_rejected_logps=ref[P:])),
        "PMLELoss": (dict(gamma=0.2, reduction="sum"), head, {}),
        "PreferenceDistillationLoss": (dict(gamma=0.3, softcap=2.0), head, dict(reward_a=rew[:P], reward_b=rew[P:])),
        "ReverseKLLoss": (dict(beta=0.1, gamma=0.05, num_samples_per_prompt=2, entropy="token_exact"), head,
                          dict(rewards=rew, ref_logps=ref)),
        "PolicyKLLoss": (dict(num_samples_per_prompt=2, reduction="none"), head, dict(ref_logps=ref)),
        "SimPOLoss": (dict(beta=2.5, nll_weight=0.2), head, {}),
        "CPOLoss": (dict(loss_type="hinge"), head, {}),
        "ORPOLoss": (dict(beta=0.25), head, {}),
        "KTOLoss": (dict(beta=0.2), head, dict(desirable=torch.tensor([True, False, True, True]), ref_logps=ref)),
        "NPOLoss": (dict(beta=0.4, reduction="none"), head, dict(ref_logps=ref)),
        "NLLLoss": (dict(temperature=0.8), head, dict(num_items_in_batch=7)),
        "DistillLoss": (dict(kind="reverse_kl"), (h, w, th, tw, y), dict(student_bias=b)),
    }
    options, args, kwargs = cases[name]
    return dict(options, backend="torch"), args, kwargs


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), (a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


@pytest.mark.parametrize("name", sorted(TWINS))
def test_twin_value_is_the_function_value(name, gen):
    options, args, kwargs = _case(name, gen)
    leaves = [t.clone().requires_grad_() for t in args[:2]]
    args = (*leaves, *args[2:])
    got = getattr(fp, name)(**options)(*args, **kwargs)
    want = TWINS[name](*args, **kwargs, **options)
    _assert_same(got, want)
    # the options reached the function: with the function's defaults (where an option has one) the
    # value differs
    first = lambda out: out[0] if isinstance(out, tuple) else out  # noqa: E731
    params = inspect.signature(getattr(fp, name)).parameters
    required = {k: options[k] for k, p in params.items() if p.default is p.empty}
    if set(options) - set(required) - {"backend"}:
        other = TWINS[name](*args, **kwargs, **required, backend="torch")
        assert not torch.equal(first(got), first(other)), f"{name}: the options had no effect"
    # gradients are the function's too
    grads = torch.autograd.grad(first(got).sum(), leaves, allow_unused=True)
    want_grads = torch.autograd.grad(first(want).sum(), leaves, allow_unused=True)
    _assert_same(tuple(grads), tuple(want_grads))


def test_twin_forward_option_override(gen):
    """An option passed to forward overrides the constructor's for that call (as in fastpref 0.1)."""
    _, (h, w, y, b), _ = _case("SimPOLoss", gen)
    twin = fp.SimPOLoss(beta=2.5, backend="torch")
    _assert_same(twin(h, w, y, b, beta=1.5), fp.simpo_loss(h, w, y, b, beta=1.5, backend="torch"))
    _assert_same(twin(h, w, y, b), fp.simpo_loss(h, w, y, b, beta=2.5, backend="torch"))


# ----------------------------------------------------------------------------- version


def test_one_version():
    project = load_pyproject()
    from packaging.version import Version

    version = fp.__version__
    assert str(Version(version)) == version
    if "version" in project["project"]:
        assert project["project"]["version"] == version
    else:
        assert "version" in project["project"]["dynamic"]
        attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
        module, _, name = attr.rpartition(".")
        assert getattr(importlib.import_module(module), name) == version
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## {re.escape(version)}\b", changelog, re.M), f"CHANGELOG.md has no '## {version}' entry"
