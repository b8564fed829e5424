"""fastpref's benchmark suite: cases, providers, measurement and reports.

Shared by the ``fastpref-bench`` CLI (``python -m fastpref.bench``) and the pytest-benchmark
suite in ``benchmarks/``.  Layers: :mod:`.cases` (shapes and sweeps), :mod:`.workloads`
(inputs and the loss of each provider), :mod:`.measure` (timing, peak memory),
:mod:`.runner` (one case, in-process or in a fresh process), :mod:`.report` (JSON,
markdown, plots).
"""

from .cases import WORKLOADS, Case, Sweep, sweeps_for, unique_cases
from .measure import make_step, measure_call, time_calls
from .runner import prepare, run_case, run_isolated
from .workloads import PROVIDERS, Skip, provider_skip_reason

__all__ = [
    "PROVIDERS",
    "WORKLOADS",
    "Case",
    "Skip",
    "Sweep",
    "make_step",
    "measure_call",
    "prepare",
    "provider_skip_reason",
    "run_case",
    "run_isolated",
    "sweeps_for",
    "time_calls",
    "unique_cases",
]
