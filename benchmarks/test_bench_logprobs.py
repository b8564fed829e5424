"""pytest-benchmark: the `logprobs` workload of fastpref.bench (cases and providers from there)."""

WORKLOAD = "logprobs"


def test_bench_logprobs(bench_case, bench_provider, run_bench):
    run_bench(bench_case, bench_provider)
