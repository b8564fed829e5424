"""Write a run's results: ``results.json``, ``results.md`` (one table per sweep) and PNG plots."""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional

from .cases import WORKLOAD_TITLES, Sweep

# A provider whose loss differs from the naive reference by more than this (relative) is flagged.
CHECK_RTOL = 2e-3


def _fmt(x: Optional[float], digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:,.{digits}f}"


def _ratio(x: Optional[float], base: Optional[float]) -> Optional[float]:
    if x is None or base is None or base <= 0:
        return None
    return x / base


def annotate(results: List[Dict]) -> None:
    """Add ratios to naive (time, peak memory) and the loss check, in place."""
    naive = {r["key"]: r for r in results if r["provider"] == "naive" and r["status"] == "ok"}
    for r in results:
        base = naive.get(r["key"])
        if r["status"] != "ok" or base is None:
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
    header = [sweep.axis, "N=B·T", "grads MiB"]
    for p in shown:
        header += [f"{p} ms", f"{p} MiB"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---:"] * len(header)) + "|")
    for i, c in enumerate(sweep.cases):
        any_ok = next((rows[p][i] for p in shown if rows[p][i] is not None and rows[p][i].get("grad_mib")), None)
        row = [str(getattr(c, sweep.axis)), str(c.N), _fmt(any_ok["grad_mib"]) if any_ok else "—"]
        for p in shown:
            r = rows[p][i]
            row += [
                _cell(r, "time_ms", "time_vs_naive", p == "naive"),
                _cell(r, "peak_mib", "mem_vs_naive", p == "naive"),
            ]
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
        "increment over the inputs in MiB, gradients included (`grads MiB`); (×) = ratio to `naive`"
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


def write_plots(out_dir: str, sweeps: List[Sweep], providers: List[str], results: List[Dict]) -> Dict[str, str]:
    """One PNG per sweep: time and peak memory against T (or V), one line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {(r["key"], r["provider"]): r for r in results}
    paths = {}
    for s in sweeps:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        c0 = s.cases[0]
        any_line = False
        for p in providers:
            pts = [(getattr(c, s.axis), by_key.get((c.key, p))) for c in s.cases]
            ok = [(x, r) for x, r in pts if r is not None and r["status"] == "ok"]
            failed = [f"{x}:{r['status']}" for x, r in pts if r is not None and r["status"] not in ("ok", "skipped")]
            if not ok and not failed:
                continue
            label = p + (f" ({', '.join(failed)})" if failed else "")
            xs = [x for x, _ in ok]
            axes[0].plot(xs, [r["time_ms"] for _, r in ok], marker="o", label=label)
            axes[1].plot(xs, [max(r["peak_mib"], 1e-3) for _, r in ok], marker="o", label=label)
            any_line = True
        fixed = {"T": f"B={c0.B} D={c0.D} V={c0.V}", "V": f"B={c0.B} T={c0.T} D={c0.D}"}[s.axis]
        for ax, what in zip(axes, ("time per fwd+bwd (ms)", "peak memory increment (MiB)")):
            ax.set_xlabel(s.axis)
            ax.set_ylabel(what)
            xs = sorted({getattr(c, s.axis) for c in s.cases})
            if len(xs) > 1:
                ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.minorticks_off() if len(xs) > 1 else None
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        if not any_line:  # the markdown says why nothing ran
            plt.close(fig)
            continue
        axes[0].legend(fontsize=8)
        fig.suptitle(f"{s.workload} against {s.axis} ({fixed}, {c0.dtype})")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{s.name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[s.name] = path
    return paths
