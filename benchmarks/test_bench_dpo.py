"""pytest-benchmark: the `dpo` workload of fastpref.bench (cases and providers from there)."""

WORKLOAD = "dpo"


def test_bench_dpo(bench_case, bench_provider, run_bench):
    run_bench(bench_case, bench_provider)
