"""pytest-benchmark suite over the cases of ``fastpref.bench`` (shared with ``fastpref-bench``).

    pytest benchmarks/ --benchmark-only                 # the device's sweep (CPU: ~15 min)
    pytest benchmarks/ --bench-quick                    # tiny shapes
    pytest benchmarks/ --bench-providers naive,fastpref-torch,liger --benchmark-group-by=group

Each test is one (case, provider); ``group`` = (op, mode, shape) so providers sit side by
side; peak memory (MiB, increment over the inputs, gradients included) goes to
``benchmark.extra_info``.  Memory here is measured in-process; ``fastpref-bench`` measures
it in a fresh process per case.
"""

from __future__ import annotations

import pytest
import torch

from fastpref.bench import PROVIDERS, measure, provider_skip_reason, sweeps_for, unique_cases
from fastpref.bench.runner import prepare


def pytest_addoption(parser):
    g = parser.getgroup("fastpref-bench")
    g.addoption("--bench-quick", action="store_true", help="tiny shapes (as fastpref-bench --quick)")
    g.addoption("--bench-device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.addoption("--bench-providers", default=None, help=f"comma list of {', '.join(PROVIDERS)}")
    g.addoption("--bench-rounds", type=int, default=None, help="timed rounds (default: CPU 3, GPU 10)")


def _device(config) -> torch.device:
    name = config.getoption("--bench-device")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pytest_generate_tests(metafunc):
    """Parametrise ``bench_case, bench_provider`` from the module's ``WORKLOAD``."""
    if "bench_case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = _device(config)
    workload = metafunc.module.WORKLOAD
    cases = unique_cases(sweeps_for(device.type, quick=config.getoption("--bench-quick"), workloads=[workload]))
    provs = config.getoption("--bench-providers")
    provs = [p.strip() for p in provs.split(",")] if provs else list(PROVIDERS)
    params = [(c, p) for c in cases for p in provs]
    metafunc.parametrize(
        "bench_case,bench_provider", params, ids=[f"{c.workload}-T{c.T}-D{c.D}-V{c.V}-{c.dtype}-{p}" for c, p in params]
    )


@pytest.fixture
def bench_device(request) -> torch.device:
    return _device(request.config)


@pytest.fixture
def run_bench(benchmark, request, bench_device):
    """``run_bench(case, provider)``: warm up, one peak-memory call, then ``benchmark.pedantic``."""
    gpu = bench_device.type == "cuda"
    rounds = request.config.getoption("--bench-rounds") or (10 if gpu else 3)

    def run(case, provider):
        reason = provider_skip_reason(case.workload, provider, bench_device)
        if reason is not None:
            pytest.skip(reason)
        if bench_device.type == "cpu":
            measure.configure_malloc()
        try:
            _, params, step = prepare(case, provider, bench_device)
            for _ in range(3 if gpu else 1):  # warm-up: compilation, autotuning, allocator
                step()
            for p in params:
                p.grad = None
            mem = measure.measure_call(step, bench_device)
        except Exception as exc:
            if measure.is_oom(exc):
                pytest.skip(f"OOM: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            raise
        benchmark.group = f"{case.workload} fwd+bwd {case.shape}"
        benchmark.extra_info.update(
            provider=provider,
            peak_mib=round(mem["peak_bytes"] / measure.MiB, 2),
            grad_mib=round(sum(p.numel() * p.element_size() for p in params) / measure.MiB, 2),
            mem_method=mem["mem_method"],
            loss=float(mem["loss"]),
            flops=case.flops,
        )
        benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=0)

    return run
