"""The paper's toy study in miniature (examples/toy_distribution_learning.py): with enough pairs,
the forward KL of PMLE and preference distillation to π* falls as n grows."""

import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "toy_distribution_learning.py"


@pytest.fixture(scope="module")
def toy():
    spec = importlib.util.spec_from_file_location("toy_distribution_learning", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kl_falls_with_n_for_pmle_and_distillation(toy):
    ns, table = toy.run_study([9, 12], seeds=[0], steps=300, methods=("pmle", "pref_distill"))
    for method in ("pmle", "pref_distill"):
        small, large = table[method]
        print(f"{method}: KL at n={ns[0]}: {small:.3e}, at n={ns[1]}: {large:.3e}")
        assert large < small / 4, f"{method}: KL did not fall with n ({small:.3e} -> {large:.3e})"
