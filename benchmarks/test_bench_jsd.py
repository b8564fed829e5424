"""pytest-benchmark: the `jsd` workload of fastpref.bench (cases and providers from there)."""

WORKLOAD = "jsd"


def test_bench_jsd(bench_case, bench_provider, run_bench):
    run_bench(bench_case, bench_provider)
