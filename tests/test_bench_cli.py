"""The benchmark CLI: files written and well formed, the GEMM floor provider and the ×floor ratios, plot
colours and legends, one-line messages for missing packages (no timings judged)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("matplotlib")

from fastpref.bench import __main__ as cli  # noqa: E402
from fastpref.bench import report, runner, workloads  # noqa: E402
from fastpref.bench.cases import Case, Sweep, quick_sweeps  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STATUSES = {"ok", "OOM", "skipped", "timeout", "error"}
CPU = torch.device("cpu")
# Tiny shapes: the floor, naive and fastpref on the quick logprobs sweep (3 cases), in-process.
QUICK_ARGS = ["--quick", "--device", "cpu", "--workloads", "logprobs", "--providers", "naive,fastpref-torch"]


def _clean_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # set by conftest for kernel tests


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "fastpref.bench", *QUICK_ARGS, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=_clean_env(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout, proc.stderr


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _main_output(argv) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(argv) == 0
    return buf.getvalue()


# --------------------------------------------------------------------------- the CLI end to end


def test_progress_lines(quick_run):
    _, stdout, stderr = quick_run
    lines = [ln for ln in stdout.splitlines() if re.match(r"\[\s*\d+/\d+\]", ln)]
    assert lines, stdout
    assert "wrote" in stdout
    assert "Traceback" not in stdout + stderr
    floor_lines = [ln for ln in lines if " floor " in ln]
    assert len(floor_lines) == 3 and all("3 GEMMs" in ln for ln in floor_lines), stdout
    assert all("×floor" in ln for ln in lines if "fastpref-torch" in ln), stdout


def test_results_json(quick_run):
    out, _, _ = quick_run
    doc = json.loads((out / "results.json").read_text())
    assert {"meta", "workloads", "providers", "sweeps", "results"} <= set(doc)
    assert {"date", "torch", "device", "device_name", "repeats", "memory_method"} <= set(doc["meta"])
    assert doc["providers"][0] == "floor"  # always measured, first
    assert doc["sweeps"] and doc["results"]
    keys = {r["key"] for r in doc["results"]}
    for s in doc["sweeps"]:
        assert {"name", "workload", "axis", "cases"} <= set(s)
        assert s["axis"] in ("T", "V")
        assert set(s["cases"]) <= keys
    for r in doc["results"]:
        assert {"key", "workload", "provider", "status", "case"} <= set(r)
        assert r["status"] in STATUSES
        if r["status"] == "ok":
            assert r["time_ms"] > 0 and r["peak_mib"] >= 0 and r["times_ms"]
        else:
            assert r["reason"]
    # every (case, provider) pair is accounted for: nothing silently dropped
    assert len(doc["results"]) == len(keys) * len(doc["providers"])
    ok = {(r["workload"], r["provider"]) for r in doc["results"] if r["status"] == "ok"}
    assert {("logprobs", "floor"), ("logprobs", "naive"), ("logprobs", "fastpref-torch")} <= ok
    # the fused path computes the same loss as the naive reference
    for r in doc["results"]:
        if r["status"] == "ok" and r.get("loss_rel_diff_vs_naive") is not None:
            assert r["loss_rel_diff_vs_naive"] < 1e-3, r


def test_floor_ratio_from_the_same_case(quick_run):
    """Every ×floor in the JSON is that record's time over the floor time of its own case."""
    out, _, _ = quick_run
    doc = json.loads((out / "results.json").read_text())
    floors = {r["key"]: r for r in doc["results"] if r["provider"] == "floor"}
    assert len(floors) == len({r["key"] for r in doc["results"]}) == 3
    for f in floors.values():
        assert f["status"] == "ok" and f["gemms"] == 3
        assert f["peak_mib"] == pytest.approx(f["grad_mib"])  # the gradient floor, not the GEMMs' workspace
        c = f["case"]
        assert f["grad_mib"] == pytest.approx((c["N"] * c["D"] + c["V"] * c["D"]) * 4 / 2**20)
    checked = 0
    for r in doc["results"]:
        if r["status"] != "ok":
            continue
        assert r["floor_ms"] == floors[r["key"]]["time_ms"]
        assert r["time_vs_floor"] == pytest.approx(r["time_ms"] / floors[r["key"]]["time_ms"])
        checked += r["provider"] != "floor"
    assert checked == 6


def _tables(md: str):
    """Blocks of consecutive lines starting with '|'."""
    tables, cur = [], []
    for line in md.splitlines():
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            tables.append(cur)
            cur = []
    if cur:
        tables.append(cur)
    return tables


def _rows(table):
    header = [h.strip() for h in table[0].strip("|").split("|")]
    return [dict(zip(header, (v.strip() for v in row.strip("|").split("|")))) for row in table[2:]]


def test_results_markdown(quick_run):
    out, _, _ = quick_run
    md = (out / "results.md").read_text()
    doc = json.loads((out / "results.json").read_text())
    by = {(r["case"]["T"], r["case"]["V"], r["provider"]): r for r in doc["results"]}
    tables = _tables(md)
    assert len(tables) == 2, md
    for t, sweep in zip(tables, ("T", "V")):
        assert len(t) >= 3, t  # header, separator, at least one row
        ncol = t[0].count("|")
        assert all(row.count("|") == ncol for row in t), t
        assert re.fullmatch(r"\|(\s*:?-{3,}:?\s*\|)+", t[1]), t[1]
        assert "naive ms" in t[0] and "floor ms" in t[0] and "fastpref-torch ×floor" in t[0]
        for row in _rows(t):
            T, V = (int(row["T"]), 2048) if sweep == "T" else (64, int(row["V"]))
            for p in ("naive", "fastpref-torch"):
                assert row[f"{p} ×floor"] == f"{by[(T, V, p)]['time_vs_floor']:.2f}", (row, p)
    for png in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / png).exists(), png


def test_plots(quick_run):
    out, _, _ = quick_run
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert pngs == ["logprobs-T.png", "logprobs-V.png"], pngs
    for p in pngs:
        with open(out / p, "rb") as f:
            assert f.read(8) == PNG_SIGNATURE, p


def test_floor_through_a_fresh_process():
    """The floor runs like every provider in the CLI's default mode: a fresh worker process."""
    case = Case("dpo", B=2, T=8, D=16, V=64)
    rec = runner.run_isolated(case, "floor", CPU, repeats=2, warmup=1, timeout=120, threads=1)
    assert rec["status"] == "ok", rec
    assert rec["gemms"] == 4 and rec["time_ms"] > 0 and len(rec["times_ms"]) == 2
    assert rec["peak_mib"] == pytest.approx(rec["grad_mib"]) and "measured_peak_mib" in rec


# --------------------------------------------------------------------------- the floor provider


@pytest.mark.parametrize("workload", ["logprobs", "dpo", "pref_distill", "jsd"])
def test_floor_runs_only_its_gemms(workload):
    """The floor's forward+backward is FLOOR_GEMMS[workload] matrix products and its gradients are those of
    sum((h @ W^T) * dz), computed here by autograd."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountMatmuls(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm):
                CountMatmuls.n += 1
            return func(*args, **(kwargs or {}))

    case = Case(workload, B=2, T=6, D=8, V=32)
    inputs, params, step = runner.prepare(case, "floor", CPU)
    with CountMatmuls():
        step()
    assert CountMatmuls.n == workloads.FLOOR_GEMMS[workload]
    h = inputs["hidden"].detach().clone().requires_grad_(True)
    w = inputs["weight"].detach().clone().requires_grad_(True)
    ((h.reshape(-1, case.D) @ w.T) * inputs[workloads.FLOOR_DZ]).sum().backward()
    torch.testing.assert_close(params[0].grad, h.grad)
    torch.testing.assert_close(params[1].grad, w.grad)
    assert case.flops == 2 * workloads.FLOOR_GEMMS[workload] * case.N * case.D * case.V


# --------------------------------------------------------------------------- ratios and tables (fake timings)


def _fake(case: Case, provider: str, time_ms: float, peak_mib: float) -> dict:
    rec = {**runner._base(case, provider, CPU), "status": "ok", "time_ms": time_ms, "times_ms": [time_ms],
           "peak_mib": peak_mib, "grad_mib": report.gradient_floor_mib(case)}
    if provider == "floor":
        rec["gemms"] = workloads.FLOOR_GEMMS[case.workload]
    return rec


def _fake_sweep(workload="logprobs", extra=()):
    sweep = Sweep(f"{workload}-T", workload, "T", [Case(workload, 2, T, 16, 256) for T in (8, 16, 32)])
    results = []
    for k, c in enumerate(sweep.cases):
        floor = 2.0 * (k + 1)  # a different floor per case: a ratio against another case's floor is visible
        results += [_fake(c, "floor", floor, 0.0), _fake(c, "naive", 3.0 * floor, 40.0),
                    _fake(c, "fastpref-torch", 1.25 * floor, 4.0), _fake(c, "cce", 1.5 * floor, 8.0)]
        results += [_fake(c, p, 2.0 * floor, 10.0) for p in extra]
    report.annotate(results)
    return sweep, results


def test_markdown_ratio_column_uses_the_floor_of_each_case():
    sweep, results = _fake_sweep()
    providers = ["floor", "naive", "fastpref-torch", "cce"]
    lines = report.sweep_table(sweep, providers, {(r["key"], r["provider"]): r for r in results})
    rows = _rows(_tables("\n".join(lines))[0])
    assert [r["floor ms"] for r in rows] == ["2.0", "4.0", "6.0"]
    assert [r["naive ×floor"] for r in rows] == ["3.00"] * 3
    assert [r["fastpref-torch ×floor"] for r in rows] == ["1.25"] * 3
    assert [r["cce ×floor"] for r in rows] == ["1.50"] * 3
    assert "floor MiB" not in rows[0] and "floor ×floor" not in rows[0]
    assert any("3 plain GEMMs" in ln for ln in lines)


def test_no_floor_ratio_without_a_floor_result():
    sweep, results = _fake_sweep()
    results = [r for r in results if not (r["provider"] == "floor" and r["case"]["T"] == 16)]
    for r in results:
        r.pop("time_vs_floor", None)
        r.pop("floor_ms", None)
    report.annotate(results)
    assert all("time_vs_floor" not in r for r in results if r["case"]["T"] == 16)
    lines = report.sweep_table(sweep, ["floor", "naive"], {(r["key"], r["provider"]): r for r in results})
    rows = _rows(_tables("\n".join(lines))[0])
    assert rows[1]["floor ms"] == "not run" and rows[1]["naive ×floor"] == "—"
    assert rows[2]["naive ×floor"] == "3.00"


# --------------------------------------------------------------------------- plots (fake timings)

META = {"device": "cpu", "device_name": "CPU: Test CPU", "cpu_model": "Test CPU", "torch_threads": 3,
        "date": "2031-04-05T06:07:08+00:00"}


def _line_colors(fig):
    from matplotlib.colors import to_hex

    out = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            name = line.get_label().split(" (")[0]
            out.setdefault(name, set()).add(to_hex(line.get_color()))
    return out


def test_plot_colours_fixed_across_figures():
    import matplotlib.pyplot as plt

    providers = ["floor", "naive", "fastpref-torch", "cce", "my-new-kernel"]
    sweep1, res1 = _fake_sweep("logprobs", extra=["my-new-kernel"])
    sweep2, res2 = _fake_sweep("dpo", extra=["my-new-kernel"])
    fig1 = report.make_figure(sweep1, providers, res1, META)
    fig2 = report.make_figure(sweep2, providers[::-1], res2, META)  # another order: the same colours
    try:
        c1, c2 = _line_colors(fig1), _line_colors(fig2)
    finally:
        plt.close(fig1)
        plt.close(fig2)
    for p in ("naive", "fastpref-torch", "cce", "my-new-kernel"):
        assert c1[p] == c2[p] == {report.provider_color(p)}, p
    assert c1["floor"] == c2["floor"] == {report.provider_color("floor")}
    assert len({report.provider_color(p) for p in providers}) == len(providers)
    # an unknown provider's colour does not depend on the interpreter's string-hash seed
    code = "from fastpref.bench.report import provider_color; print(provider_color('my-new-kernel'))"
    colours = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                       env={**_clean_env(), "PYTHONHASHSEED": seed}).stdout.strip()
        for seed in ("1", "2")
    }
    assert colours == {report.provider_color("my-new-kernel")}


def test_plot_legends_floor_lines_title_and_annotations():
    import matplotlib.pyplot as plt

    sweep, results = _fake_sweep()
    fig = report.make_figure(sweep, ["floor", "naive", "fastpref-torch", "cce"], results, META)
    try:
        ax_t, ax_m = fig.axes
        for ax in (ax_t, ax_m):
            legend = ax.get_legend()
            assert legend is not None
            texts = [t.get_text() for t in legend.get_texts()]
            assert any(t.startswith("naive") for t in texts) and any(t.startswith("fastpref-torch") for t in texts)
        floor_t = [ln for ln in ax_t.get_lines() if ln.get_label().startswith("floor")]
        floor_m = [ln for ln in ax_m.get_lines() if ln.get_label().startswith("gradient floor")]
        assert len(floor_t) == len(floor_m) == 1
        assert list(floor_t[0].get_ydata()) == [2.0, 4.0, 6.0] and floor_t[0].get_linestyle() == "--"
        assert list(floor_m[0].get_ydata()) == pytest.approx([report.gradient_floor_mib(c) for c in sweep.cases])
        assert "3 GEMMs" in floor_t[0].get_label()
        labels = {ln.get_label() for ln in ax_t.get_lines()}
        assert "fastpref-torch (1.25×floor)" in labels and "naive (3.00×floor)" in labels
        title = fig._suptitle.get_text()
        for part in ("Test CPU", "3 CPU threads", "float32", "2031-04-05"):
            assert part in title, title
        assert "speed-up 2.40×" in title and "memory saving 10.0×" in title
        notes_t = [t.get_text() for t in ax_t.texts]
        notes_m = [t.get_text() for t in ax_m.texts]
        assert notes_t == ["2.40× faster than naive"] * 3
        assert notes_m == ["10.0× less than naive"] * 3
    finally:
        plt.close(fig)


def test_plots_skipped_in_one_line_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli._plots(str(tmp_path), quick_sweeps(), ["naive"], [], {}) == {}
    assert buf.getvalue() == "plots skipped — matplotlib not installed (pip install 'fastpref[bench]')\n"


# --------------------------------------------------------------------------- missing and noisy packages


def test_missing_package_is_one_line(monkeypatch, tmp_path, restore_threads):
    for mod in ("liger_kernel", "cut_cross_entropy"):
        monkeypatch.setitem(sys.modules, mod, None)  # as if not installed: find_spec / import fail
    assert workloads.missing_package_reason("liger") == "liger-kernel not installed (pip install 'fastpref[bench]')"
    with pytest.raises(workloads.Skip, match="^liger-kernel not installed"):
        workloads.loss_fn("dpo", "liger", CPU)
    stdout = _main_output(["--quick", "--device", "cpu", "--workloads", "dpo,jsd", "--providers",
                           "naive,liger,cce", "--out", str(tmp_path)])
    liger = [ln for ln in stdout.splitlines() if "liger" in ln]
    cce = [ln for ln in stdout.splitlines() if "cce" in ln]
    assert liger == ["liger: skipped — liger-kernel not installed (pip install 'fastpref[bench]')"], stdout
    assert cce == ["cce: skipped — cut-cross-entropy not installed (pip install 'fastpref[bench]')"], stdout
    assert "Traceback" not in stdout
    doc = json.loads((tmp_path / "results.json").read_text())
    assert {r["status"] for r in doc["results"] if r["provider"] in ("liger", "cce")} == {"skipped"}
    md = (tmp_path / "results.md").read_text()
    assert "`liger` skipped: liger-kernel not installed" in md


def test_broken_package_is_one_line():
    def load():
        raise ImportError("first line of a long message\nsecond line\nthird line")

    with pytest.raises(workloads.Skip) as info:
        workloads._import_optional("liger", load)
    assert "\n" not in str(info.value) and "liger-kernel installed but not importable" in str(info.value)


NOISY_LIGER = {
    "__init__.py": """
        import logging, sys, warnings
        logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found, using CUDA_HOME='/x'")
        print("liger: some banner")
        print("liger: something on stderr", file=sys.stderr)
        warnings.warn("liger: a deprecation", DeprecationWarning)
    """,
    "chunked_loss.py": """
        from fastpref.bench import workloads as W

        class LigerFusedLinearDPOLoss:
            def __init__(self, **kwargs):
                pass

            def __call__(self, weight, hidden, labels, ref_input=None, ref_weight=None):
                return W.naive_dpo(hidden, weight, labels, ref_input, ref_weight)
    """,
}


@pytest.fixture
def noisy_liger(tmp_path, monkeypatch):
    """A stand-in liger_kernel that logs torch's CUDA warning, prints and warns when imported."""
    pkg = tmp_path / "pkgs" / "liger_kernel"
    pkg.mkdir(parents=True)
    for name, text in NOISY_LIGER.items():
        (pkg / name).write_text(textwrap.dedent(text))
    saved = {k: v for k, v in sys.modules.items() if k == "liger_kernel" or k.startswith("liger_kernel.")}
    for k in saved:
        del sys.modules[k]
    monkeypatch.syspath_prepend(str(tmp_path / "pkgs"))
    monkeypatch.setattr(workloads, "IMPORT_NOTES", {})
    yield tmp_path / "out"
    for k in [k for k in sys.modules if k == "liger_kernel" or k.startswith("liger_kernel.")]:
        del sys.modules[k]
    sys.modules.update(saved)


def test_import_time_output_is_one_line(noisy_liger, capfd, restore_threads):
    stdout = _main_output(["--quick", "--device", "cpu", "--workloads", "dpo", "--providers", "naive,liger",
                           "--out", str(noisy_liger)])
    captured = capfd.readouterr()
    everything = stdout + captured.out + captured.err
    assert "No CUDA runtime" not in everything.replace(_note_line(stdout), "")
    assert "banner" not in everything.replace(_note_line(stdout), "")
    assert re.search(r"^\[\s*\d+/\d+\] dpo .* liger .* ms .*×floor$", stdout, re.M), stdout
    doc = json.loads((noisy_liger / "results.json").read_text())
    rec = next(r for r in doc["results"] if r["provider"] == "liger")
    assert rec["status"] == "ok" and "No CUDA runtime is found" in rec["import_note"]


def _note_line(stdout: str) -> str:
    """The one line that reports the suppressed import-time output."""
    notes = [ln for ln in stdout.splitlines() if "import-time output suppressed" in ln]
    assert len(notes) == 1 and notes[0].startswith("liger: "), stdout
    return notes[0]


def test_single_case_sweep_draws_floors_as_horizontal_lines():
    import matplotlib.pyplot as plt

    sweep, results = _fake_sweep()
    sweep = Sweep(sweep.name, sweep.workload, "T", sweep.cases[1:2])
    fig = report.make_figure(sweep, ["floor", "naive", "fastpref-torch"], results, META)
    try:
        ax_t, ax_m = fig.axes
        (floor_t,) = [ln for ln in ax_t.get_lines() if ln.get_label().startswith("floor")]
        (floor_m,) = [ln for ln in ax_m.get_lines() if ln.get_label().startswith("gradient floor")]
        assert set(floor_t.get_ydata()) == {4.0}
        assert list(floor_m.get_ydata()) == pytest.approx([report.gradient_floor_mib(sweep.cases[0])] * 2)
        assert ax_t.get_legend() is not None and ax_m.get_legend() is not None
    finally:
        plt.close(fig)


def test_shapes_option_replaces_the_sweep_and_rejects_bad_items():
    from fastpref.bench.cases import parse_shapes, sweeps_for, unique_cases

    shapes = parse_shapes("1024x1024x65536, 512X2048x32000")
    assert shapes == [(1024, 1024, 65536), (512, 2048, 32000)]
    cases = unique_cases(sweeps_for("cpu", workloads=["logprobs", "jsd"], shapes=shapes))
    assert [(c.workload, c.N, c.D, c.V, c.dtype) for c in cases] == [
        ("logprobs", 1024, 1024, 65536, "float32"), ("logprobs", 512, 2048, 32000, "float32"),
        ("jsd", 1024, 1024, 65536, "float32"), ("jsd", 512, 2048, 32000, "float32")]
    for bad in ("10x3", "0x4x5", "axbxc", ""):
        with pytest.raises(ValueError, match="--shapes"):
            parse_shapes(bad)


def test_shapes_sweeps_have_distinct_names():
    from fastpref.bench.cases import parse_shapes, sweeps_for

    names = [s.name for s in sweeps_for("cpu", shapes=parse_shapes("64x32x1000,64x32x2000"))]
    assert len(names) == len(set(names)), names  # one plot file per sweep
