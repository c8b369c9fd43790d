"""Compare training runs: a table with verdicts, report.md and PNG plots.

    python -m altgrad.report out/bf16_baseline out/e5m2_fp8 [more runs] [--baseline DIR] [--out DIR]

Reads each run directory's `summary.json` and `metrics.jsonl` (written by train.py; W&B is not
needed). The baseline is the first run unless `--baseline` names another. Columns:

    run, format, final val loss, final ppl, ratio to the baseline (val loss at the last step both
    runs evaluated), mean shadow grad cosine, mean bit-stall, max overflow (worst role, any step),
    mean underflow (worst role's mean over steps), divergence step, verdict

Verdicts: `DIVERGED` when the run's status is diverged; `PASS` when its loss is within 10 % of the
baseline's at the same step; otherwise `INVESTIGATE` (also when there is no common step to compare).
A run is compared with the baseline-config run of the same seed when the sweep produced one, so
seed-matched runs (identical init and data order) differ only by precision. Missing metrics print
as "—". Runs whose names differ only by a `_s<seed>` suffix form a seed group; groups with several
seeds get a mean ± std line, so a reader can tell seed noise from a format effect.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("input", "weight", "grad_output", "output", "grad_input", "grad_weight")
PASS_TOLERANCE = 0.10  # |loss / baseline loss - 1| within 10 % at the same step
DASH = "—"

__all__ = ["Run", "Row", "load_run", "summarize", "format_table", "write_report", "main"]


# ---- loading ---------------------------------------------------------------------------------------


@dataclass
class Run:
    """One run directory: its summary (may be empty) and its metric series."""

    path: Path
    summary: dict
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.summary.get("run_name") or self.path.name

    @property
    def group(self) -> str:
        # the sweep names runs <config>_s<seed>: strip the seed to group runs of one config
        return re.sub(r"_s\d+$", "", self.name)

    @property
    def seed(self) -> int | None:
        seed = ((self.summary.get("config") or {}).get("train") or {}).get("seed")
        if seed is None and (m := re.search(r"_s(\d+)$", self.name)):
            seed = int(m.group(1))
        return seed

    @property
    def diverged(self) -> bool:
        return self.summary.get("status") == "diverged"

    def values(self, key: str) -> list[float]:
        return [v for _, v in self.series.get(key, [])]

    def last(self, key: str) -> float | None:
        vals = self.values(key)
        return vals[-1] if vals else None


def load_run(path: str | Path) -> Run:
    """Read a run directory; a missing directory or one with neither file raises FileNotFoundError."""
    path = Path(path)
    summary_file, metrics_file = path / "summary.json", path / "metrics.jsonl"
    if not summary_file.is_file() and not metrics_file.is_file():
        raise FileNotFoundError(f"run directory {str(path)!r} has neither summary.json nor metrics.jsonl")
    summary = {}
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text())
        except json.JSONDecodeError:
            summary = {}  # a run killed while writing: report what metrics.jsonl holds
    return Run(path, summary if isinstance(summary, dict) else {}, _read_series(metrics_file))


def _read_series(metrics_file: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl -> {key: [(step, value), ...]} keeping finite numbers only."""
    series: dict[str, list[tuple[int, float]]] = {}
    if not metrics_file.is_file():
        return series
    for line in metrics_file.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a truncated last line from a killed run
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
            continue
        step = int(rec["step"])
        for key, val in rec.items():
            if key != "step" and isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val):
                series.setdefault(key, []).append((step, float(val)))
    return series


# ---- summarising -----------------------------------------------------------------------------------


def describe_format(run: Run) -> str:
    """Short precision description from the resolved config: "BF16", "E5M2", "i:E4M3 w:E4M3 go:E5M2"."""
    config = run.summary.get("config") or {}
    quant = config.get("quant")
    if not quant:
        if not config:
            return DASH
        dtype = (config.get("train") or {}).get("dtype") or "auto"
        if dtype == "auto":  # train.py: bf16 autocast on CUDA, fp32 on the CPU
            dtype = "bf16" if str(run.summary.get("device", "")).startswith("cuda") else "fp32"
        return str(dtype).upper()
    if not isinstance(quant, dict):
        return str(quant)
    default = quant.get("default_format")
    roles = {r: quant.get(f"{r}_format") or default for r in ("input", "weight", "grad_output")}
    abbrev = {"input": "i", "weight": "w", "grad_output": "go"}
    if len(set(map(str, roles.values()))) == 1:
        text = str(roles["input"]) if roles["input"] else "hp"
    else:
        text = " ".join(f"{abbrev[r]}:{f or '-'}" for r, f in roles.items())
    extras = []
    if quant.get("weight_grad_format"):
        extras.append(f"wg:{quant['weight_grad_format']}")
    if quant.get("master_weights"):
        extras.append(f"master:{quant['master_weights']}")
    if quant.get("rounding") == "stochastic":
        extras.append("SR")
    if quant.get("scaling") not in (None, "delayed"):
        extras.append(f"scaling:{quant['scaling']}")
    rules = quant.get("layer_rules") or []
    if rules:  # per-layer precision: name the formats in play ("hp" = high precision)
        used = [default] + [r.get("format") if isinstance(r, dict) else None for r in rules]
        text = "mixed " + "/".join(dict.fromkeys(str(f) if f else "hp" for f in used))
    return " ".join([text] + extras)


def final_val_loss(run: Run) -> float | None:
    val = run.summary.get("final_val_loss")
    if isinstance(val, (int, float)) and math.isfinite(val):
        return float(val)
    return run.last("val/loss")


def same_step_ratio(run: Run, ref: Run) -> tuple[float | None, int | None]:
    """(loss / reference loss, step) at the last step both runs logged a loss: validation loss
    when both evaluated at a common step, else training loss."""
    for key in ("val/loss", "train/loss"):
        mine, theirs = dict(run.series.get(key, [])), dict(ref.series.get(key, []))
        common = sorted(set(mine) & set(theirs))
        if common and theirs[common[-1]] != 0:
            return mine[common[-1]] / theirs[common[-1]], common[-1]
    return None, None


def _role_metric(run: Run, metric: str) -> dict[str, list[float]]:
    """Per-role aggregate series quant/<role>/<metric> -> {role: values}."""
    out = {}
    for role in ROLES:
        vals = run.values(f"quant/{role}/{metric}")
        if vals:
            out[role] = vals
    return out


def _mean(vals: list[float]) -> float | None:
    return sum(vals) / len(vals) if vals else None


@dataclass
class Row:
    run: str
    fmt: str
    val_loss: float | None
    ppl: float | None
    ratio: float | None
    ratio_step: int | None
    grad_cos: float | None
    bit_stall: float | None
    max_overflow: float | None
    mean_underflow: float | None
    diverged_step: int | None
    verdict: str


def _reference(run: Run, baseline: Run, runs: list[Run]) -> Run:
    # prefer the baseline config's run with the same seed: identical init and data order
    for other in runs:
        if other.group == baseline.group and other.seed is not None and other.seed == run.seed:
            return other
    return baseline


def summarize(runs: list[Run], baseline: Run) -> list[Row]:
    """One Row per run, in the given order."""
    rows = []
    for run in runs:
        loss = final_val_loss(run)
        ref = _reference(run, baseline, runs)
        ratio, step = same_step_ratio(run, ref) if run is not ref else (1.0, None)
        overflow = [max(v) for v in _role_metric(run, "overflow").values()]
        underflow = [_mean(v) for v in _role_metric(run, "underflow").values()]
        diverged_step = run.summary.get("diverged_step")
        if run.group == baseline.group and not run.diverged:
            verdict = "baseline"
        elif run.diverged:
            verdict = "DIVERGED"
        elif ratio is not None and abs(ratio - 1.0) <= PASS_TOLERANCE:
            verdict = "PASS"
        else:
            verdict = "INVESTIGATE"
        rows.append(Row(
            run=run.name,
            fmt=describe_format(run),
            val_loss=loss,
            ppl=math.exp(loss) if loss is not None and loss < 700 else run.last("val/ppl"),
            ratio=ratio,
            ratio_step=step,
            grad_cos=_mean(run.values("shadow/grad_cos_mean")),
            bit_stall=_mean(run.values("update/bit_stall")),
            max_overflow=max(overflow) if overflow else None,
            mean_underflow=max(underflow) if underflow else None,
            diverged_step=diverged_step if isinstance(diverged_step, int) else None,
            verdict=verdict,
        ))
    return rows


def seed_spread(runs: list[Run]) -> dict[str, tuple[float, float, int]]:
    """{group: (mean, std, n)} of final val loss for groups with two or more seeds."""
    groups: dict[str, list[float]] = {}
    for run in runs:
        loss = final_val_loss(run)
        if loss is not None and not run.diverged:
            groups.setdefault(run.group, []).append(loss)
    return {g: (statistics.mean(v), statistics.stdev(v), len(v)) for g, v in groups.items() if len(v) >= 2}


# ---- table -----------------------------------------------------------------------------------------

COLUMNS = ("run", "format", "val loss", "ppl", "ratio", "grad cos", "bit-stall", "max overflow",
           "mean underflow", "diverged at", "verdict")


def _fmt(val, spec: str) -> str:
    return DASH if val is None else format(val, spec)


def _cells(row: Row) -> list[str]:
    return [
        row.run, row.fmt, _fmt(row.val_loss, ".4f"), _fmt(row.ppl, ".3f"), _fmt(row.ratio, ".4f"),
        _fmt(row.grad_cos, ".4f"), _fmt(row.bit_stall, ".3f"), _fmt(row.max_overflow, ".2e"),
        _fmt(row.mean_underflow, ".2e"), _fmt(row.diverged_step, "d"), row.verdict,
    ]


def format_table(rows: list[Row], markdown: bool = False) -> str:
    cells = [list(COLUMNS)] + [_cells(r) for r in rows]
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "|".join("---" for _ in COLUMNS) + "|")
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _spread_lines(spread: dict[str, tuple[float, float, int]], baseline: Run) -> list[str]:
    lines = []
    for group, (mean, std, n) in spread.items():
        tag = " (baseline)" if group == baseline.group else ""
        lines.append(f"seed spread {group}{tag}: final val loss {mean:.4f} ± {std:.4f} over {n} seeds")
    return lines


# ---- plots -----------------------------------------------------------------------------------------


def _plot_series(ax, run: Run, key: str, **kw) -> bool:
    pts = run.series.get(key, [])
    if pts:
        ax.plot([s for s, _ in pts], [v for _, v in pts], **kw)
    return bool(pts)


def _line_plot(runs, keys, title, ylabel, path, logy=False):
    """One axis, one line per (run, key); returns the path or None when no run has the data."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for run in runs:
        for key, style in keys:
            drawn |= _plot_series(ax, run, key, label=f"{run.name} {key}", **style)
    if drawn:
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        if logy:
            ax.set_yscale("symlog", linthresh=1e-6)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path if drawn else None


def _quant_plot(runs, path):
    """Overflow (left) and underflow (right) per role over steps, one line per run and role."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    drawn = False
    for ax, metric in zip(axes, ("overflow", "underflow")):
        for run in runs:
            for role in ROLES:
                drawn |= _plot_series(ax, run, f"quant/{role}/{metric}", label=f"{run.name} {role}")
        ax.set(title=f"{metric} fraction per role", xlabel="step")
        ax.set_yscale("symlog", linthresh=1e-6)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    if drawn:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path if drawn else None


def _heatmap(run: Run, path):
    """Per-layer shadow grad cosine: layers down, logged steps across."""
    import matplotlib.pyplot as plt

    # layers in model order (the order train.py first logged them), not alphabetical (h.10 < h.2)
    keys = [k for k in run.series if re.fullmatch(r"shadow/.+/grad_cos", k)]
    if not keys:
        return None
    steps = sorted({s for k in keys for s, _ in run.series[k]})
    col = {s: i for i, s in enumerate(steps)}
    grid = [[math.nan] * len(steps) for _ in keys]
    for i, k in enumerate(keys):
        for s, v in run.series[k]:
            grid[i][col[s]] = v
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(steps) + 4), max(3, 0.28 * len(keys) + 1.5)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(keys)), [k[len("shadow/"):-len("/grad_cos")] for k in keys], fontsize=6)
    ticks = list(range(0, len(steps), max(1, len(steps) // 10)))
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    ax.set(title=f"{run.name}: grad cosine vs FP32 shadow", xlabel="step")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def make_plots(runs: list[Run], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    # a format sweep plots 10+ runs: 20 distinct colours instead of matplotlib's 10
    matplotlib.rcParams["axes.prop_cycle"] = matplotlib.cycler(color=matplotlib.colormaps["tab20"].colors)
    made = [
        _line_plot(runs, [("train/loss", {"lw": 1, "alpha": 0.6}), ("val/loss", {"marker": "o", "ms": 3})],
                   "loss", "loss", out_dir / "loss.png"),
        _line_plot(runs, [("shadow/grad_cos_mean", {})], "mean grad cosine vs FP32 shadow", "cosine",
                   out_dir / "grad_cos.png"),
        _line_plot(runs, [("update/bit_stall", {})], "bit-stall (updates lost to weight rounding)", "fraction",
                   out_dir / "bit_stall.png"),
        _quant_plot(runs, out_dir / "overflow_underflow.png"),
    ]
    made += [_heatmap(run, out_dir / f"grad_cos_heatmap_{_safe(run.name)}.png") for run in runs]
    return [p for p in made if p is not None]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# ---- report ----------------------------------------------------------------------------------------


def write_report(runs: list[Run], baseline: Run, out_dir: str | Path) -> tuple[str, Path, list[Path]]:
    """Write report.md and the plots into out_dir; returns (terminal text, report path, plot paths)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize(runs, baseline)
    spread = _spread_lines(seed_spread(runs), baseline)
    plots = make_plots(runs, out_dir)
    note = (f"baseline: {baseline.name}; ratio = val loss / baseline val loss at the last common step; "
            f"PASS = within {PASS_TOLERANCE:.0%} of the baseline")
    text = "\n".join([format_table(rows), "", note] + spread)
    md = ["# altgrad report", "", format_table(rows, markdown=True), "", note, ""]
    md += [f"- {line}" for line in spread] + ([""] if spread else [])
    md += ["| run | compared at step | status | wall time (s) |", "|---|---|---|---|"]
    for run, row in zip(runs, rows):
        wall = run.summary.get("wall_time_s")
        md.append(f"| {run.name} | {_fmt(row.ratio_step, 'd')} | {run.summary.get('status', DASH)} | "
                  f"{_fmt(wall, '.1f') if isinstance(wall, (int, float)) else DASH} |")
    md += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    report = out_dir / "report.md"
    report.write_text("\n".join(md) + "\n")
    return text, report, plots


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m altgrad.report", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (out/<run_name>)")
    p.add_argument("--baseline", metavar="DIR", help="baseline run directory (default: the first RUN_DIR)")
    p.add_argument("--out", metavar="DIR", help="where report.md and the PNGs go (default: <first run>/../report)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        runs = [load_run(p) for p in args.runs]
        baseline = runs[0]
        if args.baseline:
            base_path = Path(args.baseline).resolve()
            baseline = next((r for r in runs if r.path.resolve() == base_path), None) or load_run(args.baseline)
            if baseline not in runs:
                runs.insert(0, baseline)
    except FileNotFoundError as err:
        print(f"report: {err}", file=sys.stderr)
        return 2
    out_dir = Path(args.out) if args.out else Path(args.runs[0]).parent / "report"
    text, report, plots = write_report(runs, baseline, out_dir)
    print(text)
    print(f"\nreport: {report}" + (f"; plots: {', '.join(str(p) for p in plots)}" if plots else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
