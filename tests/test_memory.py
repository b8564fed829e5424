"""The torch backend's extra memory is bounded by its workspace, flat in the vocabulary.

Each case runs in a fresh subprocess and reports the peak-RSS increment of a forward+backward
(frozen head, gradient for hidden only) over the inputs; no timing is involved."""

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, resource, sys, torch
import fastpref as fp
n, d, v, ws_mb, provider = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(1)
fp.set_workspace_bytes(ws_mb * 2**20)
g = torch.Generator().manual_seed(0)
h = torch.randn(n, d, generator=g).requires_grad_()
w = torch.randn(v, d, generator=g) * 0.1
y = torch.randint(0, v, (n,), generator=g)
up = torch.randn(n, generator=g)
# warm-up on a tiny case: one-time costs (op registration, lazy imports) are not the op's memory
hw = torch.randn(4, d, requires_grad=True)
if provider == "fastpref":
    fp.linear_logprobs(hw, w[:16], y[:4] % 16, backend="torch").sum().backward()
else:
    from fastpref import reference
    reference.linear_logprobs(hw, w[:16], y[:4] % 16, precision="native").sum().backward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if provider == "fastpref":
    out = fp.linear_logprobs(h, w, y, backend="torch")
else:
    from fastpref import reference
    out = reference.linear_logprobs(h, w, y, precision="native")
(out * up).sum().backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"increment_mib": (after - before) / 1024}))
"""


def _peak(n, d, v, ws_mb, provider="fastpref"):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(n), str(d), str(v), str(ws_mb), provider],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["increment_mib"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB is Linux behaviour")
def test_peak_memory_flat_in_vocabulary():
    n, d, ws = 1024, 64, 8
    small = _peak(n, d, 8192, ws)
    large = _peak(n, d, 131072, ws)
    naive_large = _peak(n, d, 131072, ws, provider="naive")
    logits_mib = n * 131072 * 4 / 2**20
    print(f"fastpref V=8192: {small:.1f} MiB, V=131072: {large:.1f} MiB; naive V=131072: {naive_large:.1f} MiB "
          f"(one fp32 logits tensor: {logits_mib:.0f} MiB)")
    assert large < 4 * ws + 8, f"peak increment {large:.1f} MiB exceeds the {ws} MiB workspace bound"
    assert large - small < ws, f"peak grew with V: {small:.1f} -> {large:.1f} MiB"
    assert naive_large > logits_mib  # the naive reference does materialise the logits
