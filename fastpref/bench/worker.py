"""``python -m fastpref.bench.worker '<json>'``: one (case, provider) in a fresh process.

Prints one line ``FASTPREF_BENCH_RESULT {...}`` with the record of :func:`runner.run_case`.
"""

from __future__ import annotations

import json
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    from .cases import Case
    from .runner import MARKER, run_case

    rec = run_case(
        Case.from_dict(spec["case"]),
        spec["provider"],
        torch.device(spec["device"]),
        repeats=int(spec["repeats"]),
        warmup=int(spec["warmup"]),
    )
    sys.stdout.write(MARKER + json.dumps(rec) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
