"""Write a run's results: ``results.json``, ``results.md`` (one table per sweep) and PNG plots.

Every time is also given as a multiple of the GEMM floor of the same case (the ``floor`` provider,
measured in the same run: ``time_vs_floor`` in the JSON, the ``×floor`` columns of the tables, the
dashed black line of the plots).  Plots use one colour per provider in every figure
(:data:`PROVIDER_COLORS`; :func:`provider_color` for any other name).
"""

from __future__ import annotations

import json
import math
import os
import zlib
from typing import Dict, List, Optional, Tuple

from .cases import WORKLOAD_TITLES, Case, Sweep

# A provider whose loss differs from the naive reference by more than this (relative) is flagged.
CHECK_RTOL = 2e-3

FLOOR = "floor"

# One colour per provider, the same in every figure: fastpref in blues/greens, the floor black,
# the naive reference grey, the other libraries in warm or distinct hues.
PROVIDER_COLORS = {
    FLOOR: "#000000",
    "naive": "#7f7f7f",
    "compiled": "#8c564b",
    "fastpref-torch": "#1f77b4",
    "fastpref-triton": "#2ca02c",
    "fastpref-cuda": "#17becf",
    "liger": "#ff7f0e",
    "cce": "#9467bd",
    "trl": "#e377c2",
    "torch-lce": "#bcbd22",
}
# Colours for providers not in the mapping, picked by a stable hash of the name (not Python's
# per-process salted ``hash``), so a new provider keeps its colour from run to run.
_EXTRA_COLORS = ("#d62728", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d")


def provider_color(provider: str) -> str:
    """The colour of ``provider`` in every plot: :data:`PROVIDER_COLORS`, else a deterministic pick."""
    if provider in PROVIDER_COLORS:
        return PROVIDER_COLORS[provider]
    return _EXTRA_COLORS[zlib.crc32(provider.encode()) % len(_EXTRA_COLORS)]


def gradient_floor_mib(case: Case) -> float:
    """MiB of ``d hidden`` and ``d weight`` (the case's dtype): memory every provider must add."""
    itemsize = {"float32": 4, "float64": 8}.get(case.dtype, 2)
    return (case.N * case.D + case.V * case.D) * itemsize / 2**20


def _fmt(x: Optional[float], digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:,.{digits}f}"


def _ratio(x: Optional[float], base: Optional[float]) -> Optional[float]:
    if x is None or base is None or base <= 0:
        return None
    return x / base


def annotate(results: List[Dict]) -> None:
    """Add, in place, the ratio of every time to the floor of the same case (``floor_ms``,
    ``time_vs_floor``), ratios to naive (time, peak memory) and the loss check against naive."""
    floor = {r["key"]: r for r in results if r["provider"] == FLOOR and r["status"] == "ok"}
    naive = {r["key"]: r for r in results if r["provider"] == "naive" and r["status"] == "ok"}
    for r in results:
        fl = floor.get(r["key"])
        if r["status"] == "ok" and fl is not None:
            r["floor_ms"] = fl["time_ms"]
            r["time_vs_floor"] = _ratio(r["time_ms"], fl["time_ms"])
        base = naive.get(r["key"])
        if r["status"] != "ok" or base is None or r["provider"] == FLOOR:  # the floor computes no loss
            continue
        r["time_vs_naive"] = _ratio(r["time_ms"], base["time_ms"])
        r["mem_vs_naive"] = _ratio(r["peak_mib"], base["peak_mib"])
        if base.get("loss") is not None and r.get("loss") is not None:
            r["loss_rel_diff_vs_naive"] = abs(r["loss"] - base["loss"]) / max(abs(base["loss"]), 1e-12)
        gn, gb = r.get("grad_norms") or [], base.get("grad_norms") or []
        diffs = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(gn, gb) if a is not None and b is not None]
        if diffs:
            r["grad_norm_rel_diff_vs_naive"] = max(diffs)


def write_json(
    path: str, meta: Dict, workloads: Dict, sweeps: List[Sweep], providers: List[str], results: List[Dict]
) -> None:
    doc = {
        "schema": 1,
        "meta": meta,
        "workloads": workloads,
        "providers": providers,
        "sweeps": [s.to_dict() for s in sweeps],
        "results": results,
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")


def _cell(r: Optional[Dict], field: str, ratio_field: str, base: bool) -> str:
    if r is None:
        return "not run"
    if r["status"] == "skipped":
        return "skipped"
    if r["status"] != "ok":
        return r["status"]
    s = _fmt(r.get(field))
    if not base and r.get(ratio_field) is not None:
        s += f" ({r[ratio_field]:.2f}×)"
    return s


def _floor_cell(r: Optional[Dict]) -> str:
    if r is None or r["status"] != "ok":
        return "—"
    return _fmt(r.get("time_vs_floor"), 2)


def sweep_table(sweep: Sweep, providers: List[str], by_key: Dict) -> List[str]:
    """Markdown lines of one sweep: a table (providers side by side) and notes under it."""
    lines = []
    c0 = sweep.cases[0]
    fixed = {"T": f"B={c0.B}, D={c0.D}, V={c0.V}", "V": f"B={c0.B}, T={c0.T}, D={c0.D}"}[sweep.axis]
    lines.append(f"### {sweep.workload}: against {sweep.axis} ({fixed}, {c0.dtype})")
    lines.append("")
    lines.append(f"{WORKLOAD_TITLES[sweep.workload]}.")
    lines.append("")
    rows = {p: [by_key.get((c.key, p)) for c in sweep.cases] for p in providers}
    shown = [p for p in providers if any(r is not None and r["status"] != "skipped" for r in rows[p])]
    hidden = [p for p in providers if p not in shown]
    if not shown:
        reasons = sorted({r["reason"] for p in providers for r in rows[p] if r is not None})
        lines.append(f"Not run: {'; '.join(reasons) or 'no provider selected'}.")
        lines.append("")
        return lines
    with_floor = FLOOR in shown
    others = [p for p in shown if p != FLOOR]
    header = [sweep.axis, "N=B·T", "grads MiB"] + (["floor ms"] if with_floor else [])
    for p in others:
        header += [f"{p} ms"] + ([f"{p} ×floor"] if with_floor else []) + [f"{p} MiB"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---:"] * len(header)) + "|")
    for i, c in enumerate(sweep.cases):
        any_ok = next((rows[p][i] for p in shown if rows[p][i] is not None and rows[p][i].get("grad_mib")), None)
        row = [str(getattr(c, sweep.axis)), str(c.N), _fmt(any_ok["grad_mib"]) if any_ok else "—"]
        if with_floor:
            row.append(_cell(rows[FLOOR][i], "time_ms", "", True))
        for p in others:
            r = rows[p][i]
            row.append(_cell(r, "time_ms", "time_vs_naive", p == "naive"))
            if with_floor:
                row.append(_floor_cell(r))
            row.append(_cell(r, "peak_mib", "mem_vs_naive", p == "naive"))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    notes = []
    for p in hidden:
        reasons = sorted({r["reason"] for r in rows[p] if r is not None})
        notes.append(f"`{p}` skipped: {'; '.join(reasons) or 'not selected'}")
    for p in shown:
        for c, r in zip(sweep.cases, rows[p]):
            if r is None:
                continue
            if r["status"] not in ("ok",):
                notes.append(f"`{p}` at {sweep.axis}={getattr(c, sweep.axis)}: {r['status']} — {r.get('reason', '')}")
            elif max(r.get("loss_rel_diff_vs_naive") or 0, r.get("grad_norm_rel_diff_vs_naive") or 0) > CHECK_RTOL:
                notes.append(
                    f"`{p}` at {sweep.axis}={getattr(c, sweep.axis)}: differs from naive (relative): "
                    f"loss {r.get('loss_rel_diff_vs_naive') or 0:.2e}, "
                    f"gradient norms {r.get('grad_norm_rel_diff_vs_naive') or 0:.2e}"
                )
        if p == FLOOR:
            gemms = next((r.get("gemms") for r in rows[p] if r is not None and r.get("gemms")), None)
            if gemms:
                notes.append(
                    f"`floor`: the {gemms} plain GEMMs of a fused forward+backward ({2 * gemms}NDV FLOPs), nothing "
                    "else; its memory is the gradient floor (`grads MiB`); `×floor` = time / floor time, same case"
                )
        if p.startswith("fastpref-"):
            impl = next((r.get("impl") for r in rows[p] if r is not None and r.get("impl")), None)
            if impl:
                notes.append(f"`{p}` calls {impl}")
    if notes:
        lines += [f"- {n}" for n in dict.fromkeys(notes)]
        lines.append("")
    return lines


def write_markdown(
    path: str,
    meta: Dict,
    workloads: Dict,
    sweeps: List[Sweep],
    providers: List[str],
    results: List[Dict],
    plots: Dict[str, str],
) -> None:
    by_key = {(r["key"], r["provider"]): r for r in results}
    out = ["# fastpref benchmark results", ""]
    out.append(
        f"- date: {meta.get('date')}; device: {meta.get('device_name')}; torch {meta.get('torch')}; "
        f"fastpref {meta.get('fastpref')}; liger-kernel {meta.get('liger_kernel')}; "
        f"cut-cross-entropy {meta.get('cut_cross_entropy')}"
    )
    out.append(
        f"- sweep: {meta.get('sweep')}; repeats {meta.get('repeats')} (median), warm-up {meta.get('warmup')}; "
        f"memory: {meta.get('memory_method')}"
    )
    out.append(
        "- time: median ms of one forward+backward (gradients w.r.t. hidden and weight); memory: peak "
        "increment over the inputs in MiB, gradients included (`grads MiB`, the gradient floor); (×) = ratio "
        "to `naive`; `×floor` = time as a multiple of the `floor` provider (the plain GEMMs alone) on the same "
        "case in the same run"
    )
    out.append("")
    for w, info in workloads.items():
        if info.get("skipped"):
            out.append(f"- workload `{w}` skipped: {info['skipped']}")
    out.append("")
    for s in sweeps:
        out += sweep_table(s, providers, by_key)
        if s.name in plots:
            out.append(f"![{s.name}]({os.path.basename(plots[s.name])})")
            out.append("")
    with open(path, "w") as f:
        f.write("\n".join(out).rstrip() + "\n")


def device_label(meta: Optional[Dict]) -> str:
    """``"<device>, <n> CPU threads, <date>"`` for a figure title (from the run's ``meta``)."""
    meta = meta or {}
    if str(meta.get("device", "cpu")).startswith("cuda"):
        dev = meta.get("device_name") or meta.get("device")
    else:
        dev = f"CPU {meta.get('cpu_model') or ''}".strip()
    parts = [dev or "unknown device"]
    if meta.get("torch_threads") is not None:
        n = meta["torch_threads"]
        parts.append(f"{n} CPU thread{'s' if n != 1 else ''}")
    if meta.get("date"):
        parts.append(str(meta["date"])[:10])
    return ", ".join(parts)


def _spread(values: List[float], fmt: str = "{:.2f}") -> str:
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}–{hi}"


def _pick_fastpref(sweep: Sweep, providers: List[str], by_key: Dict) -> Optional[str]:
    """The fastpref provider annotated against naive: most cases run, then the least total time."""
    best: Optional[Tuple] = None
    for p in providers:
        if not p.startswith("fastpref-"):
            continue
        ok = [by_key.get((c.key, p)) for c in sweep.cases]
        ok = [r for r in ok if r is not None and r["status"] == "ok"]
        if not ok:
            continue
        score = (-len(ok), sum(r["time_ms"] for r in ok))
        if best is None or score < best[0]:
            best = (score, p)
    return None if best is None else best[1]


def _tick(value: float, _pos=None) -> str:
    """Plain tick labels on a log axis ("0.5", "20", "3000"), only for 1-2-5 steps so labels do not crowd."""
    if value <= 0:
        return ""
    exp = math.floor(math.log10(value))
    mant = round(value / 10**exp, 6)
    if mant not in (1, 2, 5):
        return ""
    return f"{value:g}"


def make_figure(sweep: Sweep, providers: List[str], results: List[Dict], meta: Optional[Dict] = None):
    """The figure of one sweep (None when nothing ran): time and peak memory against ``sweep.axis``.

    One line per provider in its :func:`provider_color`, the floor as a dashed black line in both panels
    (time: the ``floor`` provider; memory: the gradient floor), a legend on each panel, fastpref's
    speed-up and memory saving against ``naive`` written next to its points, and the device, CPU thread
    count, dtype and date in the title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    by_key = {(r["key"], r["provider"]): r for r in results}
    s = sweep
    c0 = s.cases[0]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    any_line = False
    for p in providers:
        if p == FLOOR:
            continue
        pts = [(getattr(c, s.axis), by_key.get((c.key, p))) for c in s.cases]
        ok = [(x, r) for x, r in pts if r is not None and r["status"] == "ok"]
        failed = [f"{x}:{r['status']}" for x, r in pts if r is not None and r["status"] not in ("ok", "skipped")]
        if not ok and not failed:
            continue
        label = p
        ratios = [r["time_vs_floor"] for _, r in ok if r.get("time_vs_floor") is not None]
        if ratios:
            label += f" ({_spread(ratios)}×floor)"
        if failed:
            label += f" [{', '.join(failed)}]"
        xs = [x for x, _ in ok]
        style = dict(color=provider_color(p), marker="o", label=label, lw=2.2 if p.startswith("fastpref-") else 1.4)
        ax_t.plot(xs, [r["time_ms"] for _, r in ok], **style)
        ax_m.plot(xs, [max(r["peak_mib"], 1e-3) for _, r in ok], **style)
        any_line = True
    if not any_line:  # the markdown says why nothing ran
        plt.close(fig)
        return None

    def floor_line(ax, xs, ys, label):
        style = dict(color=provider_color(FLOOR), ls="--", lw=1.6, label=label, zorder=5)
        if len(xs) == 1:  # one case: a horizontal line across the panel
            ax.axhline(ys[0], **style)
        else:
            ax.plot(xs, ys, marker="D", markersize=3.5, **style)

    floor_pts = [(getattr(c, s.axis), by_key.get((c.key, FLOOR))) for c in s.cases]
    floor_pts = [(x, r) for x, r in floor_pts if r is not None and r["status"] == "ok"]
    if floor_pts:
        gemms = floor_pts[0][1].get("gemms")
        what = f"{gemms} GEMMs, {2 * gemms}NDV" if gemms else "GEMMs only"
        floor_line(ax_t, [x for x, _ in floor_pts], [r["time_ms"] for _, r in floor_pts], f"floor ({what})")
    xs_all = [getattr(c, s.axis) for c in s.cases]
    floor_line(ax_m, xs_all, [gradient_floor_mib(c) for c in s.cases], "gradient floor (d hidden + d weight)")

    fp = _pick_fastpref(s, providers, by_key)
    speedups, savings = [], []
    if fp is not None:
        for c in s.cases:
            r, base = by_key.get((c.key, fp)), by_key.get((c.key, "naive"))
            if r is None or base is None or r["status"] != "ok" or base["status"] != "ok":
                continue
            x = getattr(c, s.axis)
            # text right of the point, left of it at the right edge (inside the axes)
            at = dict(textcoords="offset points", fontsize=7, color=provider_color(fp))
            if x == max(xs_all) and len(xs_all) > 1:
                at.update(xytext=(-5, -12), ha="right")
            else:
                at.update(xytext=(5, -12), ha="left")
            sp = base["time_ms"] / r["time_ms"]
            speedups.append(sp)
            text = f"{sp:.2f}× faster" if sp >= 1 else f"{1 / sp:.2f}× slower"
            ax_t.annotate(f"{text} than naive", (x, r["time_ms"]), **at)
            if r["peak_mib"] > 0 and base["peak_mib"] > 0:
                sv = base["peak_mib"] / r["peak_mib"]
                savings.append(sv)
                text = f"{sv:.1f}× less" if sv >= 1 else f"{1 / sv:.1f}× more"
                ax_m.annotate(f"{text} than naive", (x, r["peak_mib"]), **at)
    summary = []
    if speedups:
        summary.append(f"{fp} vs naive: speed-up {_spread(speedups)}×")
    if savings:
        summary.append(f"memory saving {_spread(savings, '{:.1f}')}× (naive / {fp})")
    fixed = {"T": f"B={c0.B} D={c0.D} V={c0.V}", "V": f"B={c0.B} T={c0.T} D={c0.D}"}[s.axis]
    for ax, what in zip((ax_t, ax_m), ("time per fwd+bwd (ms)", "peak memory increment (MiB)")):
        ax.set_xlabel(s.axis)
        ax.set_ylabel(what)
        xs = sorted(set(xs_all))
        if len(xs) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        if len(xs) > 1:
            ax.minorticks_off()
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(_tick))
        ax.yaxis.set_minor_formatter(ticker.FuncFormatter(_tick))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best", framealpha=0.85)
    ax_t.set_title("time (lower is better)", fontsize=9)
    ax_m.set_title("memory (lower is better)", fontsize=9)
    title = f"{s.workload} against {s.axis} ({fixed}, {c0.dtype})\n{device_label(meta)}"
    if summary:
        title += "\n" + "; ".join(summary)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def write_plots(
    out_dir: str, sweeps: List[Sweep], providers: List[str], results: List[Dict], meta: Optional[Dict] = None
) -> Dict[str, str]:
    """One PNG per sweep (:func:`make_figure`); raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    for s in sweeps:
        fig = make_figure(s, providers, results, meta)
        if fig is None:
            continue
        path = os.path.join(out_dir, f"{s.name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[s.name] = path
    return paths
