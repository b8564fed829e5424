"""pytest-benchmark: the `pref_distill` workload of fastpref.bench (cases and providers from there)."""

WORKLOAD = "pref_distill"


def test_bench_pref_distill(bench_case, bench_provider, run_bench):
    run_bench(bench_case, bench_provider)
