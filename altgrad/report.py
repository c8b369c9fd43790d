"""Compare training runs: a table with verdicts, report.md and PNG plots.

    python -m altgrad.report out/baseline out/e5m2_fp8 [more runs] [--baseline DIR] [--out DIR]

Reads each run directory's `summary.json` and `metrics.jsonl` (written by train.py; W&B is not
needed). The baseline is the first run unless `--baseline` names another.

**One comparison step.** Every run is compared at the same step S: the last step at which all
runs evaluated (validation loss; training loss when some run never evaluated), leaving out failed
and diverged runs, which carry their own verdict. S is printed in the header. A run's final
validation loss and the step it is from are shown beside, never used for the verdict, so a
stopped or still-running run is compared on the same footing as a finished one.

**Status** is summary.json's (`completed`, `diverged`, `stopped`, `running`) with two readings
of its own: `FAILED` for a run that crashed (`failed`), and `INCOMPLETE` for a run that says
`running` but whose process is gone (its run lock is free) or that has no summary at all.

**Verdicts**, in this order: `FAILED`, `DIVERGED` (status diverged), `baseline` (the baseline's
config), `NON-FINITE` (a NaN or infinite loss at S or at the end: never a pass), then
- when the baseline config ran with two or more seeds, the seed-spread rule: PASS when
  |loss(S) − mean of the baseline seeds' loss(S)| ≤ 3 σ, σ their sample standard deviation
  (the column `Δ/σ`); with σ from a handful of seeds this flags only gaps well outside noise;
- otherwise the fixed-percentage fallback: PASS when |loss(S) / baseline loss(S) − 1| ≤ 10 %;
`INVESTIGATE` otherwise, or when there is no common step. The table's note names the rule used.
Two guards: when the only shared step is 0 (before any update, where every run with the baseline's
seed is the same untrained model) a run reads `TOO EARLY`, never PASS; and a run that passes at S
but did not complete (stopped, running, INCOMPLETE) reads `PARTIAL`: it passed as far as it got.

The ratio column divides by the baseline-config run of the same seed when there is one
(identical init and data order, so the two differ only by precision). Runs whose names differ
only by a `_s<seed>` suffix form a seed group; groups with several seeds get a mean ± std line.
Missing metrics print as "—".
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

from altgrad.vocabulary import OPERAND_ROLES, Role

ROLES = tuple(Role)  # the roles whose quant/<role>/... aggregates a run logs
PASS_TOLERANCE = 0.10  # fallback rule: |loss / baseline loss - 1| within 10 % at the same step
PASS_SIGMAS = 3.0  # seed-spread rule: |loss - baseline mean| within 3 baseline standard deviations
DASH = "—"
LOSS_KEYS = ("val/loss", "train/loss")  # kept with their non-finite values (null -> nan)

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

    @property
    def status(self) -> str:
        """completed | diverged | stopped | running, or FAILED / INCOMPLETE (module docstring)."""
        status = self.summary.get("status")
        if status == "failed":
            return "FAILED"
        if status == "running":
            from altgrad.rundir import lock_holder

            holder = lock_holder(self.path)
            pid = self.summary.get("pid")
            alive = holder is not None and (pid is None or holder.get("pid") in (None, pid))
            return "running" if alive else "INCOMPLETE"
        return status if isinstance(status, str) and status else "INCOMPLETE"

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
            if key in LOSS_KEYS and val is None:
                val = math.nan  # a non-finite loss is a result: train.py writes it as null
            if key != "step" and isinstance(val, (int, float)) and not isinstance(val, bool) and (
                    math.isfinite(val) or key in LOSS_KEYS):
                series.setdefault(key, []).append((step, float(val)))
    return series


# ---- summarising -----------------------------------------------------------------------------------


def describe_format(run: Run) -> str:
    """Short precision description from the resolved config: "BF16", "E5M2", "i:E4M3 w:E4M3 go:E5M2"."""
    config = run.summary.get("config") or {}
    quant = config.get("quant")
    if not config:
        return DASH
    if not isinstance(quant, (dict, type(None))):
        return str(quant)

    def fmt(name):  # "bf16" / "fp32" / "none" in a quant section mean high precision, as in altgrad.config
        return None if name is None or str(name).strip().lower() in ("bf16", "fp32", "none") else name

    quant = quant or {}
    default = fmt(quant.get("default_format"))
    roles = {r: fmt(quant.get(f"{r}_format", default)) for r in OPERAND_ROLES}
    if not any(roles.values()) and not quant.get("layer_rules"):
        # nothing simulated: say what actually ran (train.py records it), not what the config asked for
        hp = run.summary.get("dtype")
        if not hp:
            hp = (config.get("train") or {}).get("dtype") or "auto"
            if hp == "auto":  # train.py: bf16 autocast on CUDA, fp32 on the CPU
                hp = "bf16" if str(run.summary.get("device", "")).startswith("cuda") else "fp32"
        if hp == "fp32" and run.summary.get("high_precision_matmul") == "tf32":
            hp = "tf32"
        return str(hp).upper()
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
    gran = _granularity(quant)
    if gran:
        extras.append(gran)
    rules = quant.get("layer_rules") or []
    if rules:  # per-layer precision: name the formats in play ("hp" = high precision)
        used = [default] + [r.get("format") if isinstance(r, dict) else None for r in rules]
        text = "mixed " + "/".join(dict.fromkeys(str(f) if f else "hp" for f in used))
    return " ".join([text] + extras)


def _granularity(quant: dict) -> str:
    """"" for per-tensor scales, else e.g. "row", "block32", "block32-ceil", "block16x16-fp32", or the
    per-role mapping as written ("granularity:{...}")."""
    g = quant.get("granularity", "tensor")
    if isinstance(g, dict) or any(isinstance(quant.get(k), dict) for k in ("block_size", "block_2d")):
        return f"granularity:{g}" if g != "tensor" else ""
    if g == "tensor":
        return ""
    bs = quant.get("block_size", 32)
    text = "row" if g == "row" else (f"block{bs}x{bs}" if quant.get("block_2d") else f"block{bs}")
    for key, default in (("scale_format", "e8m0"), ("scale_rounding", "floor")):
        if quant.get(key, default) != default:
            text += f"-{quant[key]}" if not isinstance(quant[key], dict) else f"-{key}:{quant[key]}"
    return text


def final_val(run: Run) -> tuple[float | None, int | None]:
    """(last validation loss, its step), non-finite included; (None, None) when it never evaluated."""
    pts = run.series.get("val/loss", [])
    if pts:
        return pts[-1][1], pts[-1][0]
    val = run.summary.get("final_val_loss")
    if isinstance(val, (int, float)):
        return float(val), run.summary.get("final_val_step")
    return None, None


def final_val_loss(run: Run) -> float | None:
    return final_val(run)[0]


@dataclass
class Comparison:
    """Where and how runs are compared: the step, the loss key, and the rule."""

    step: int | None
    key: str
    runs_sharing: int
    spread: tuple[float, float, int] | None  # baseline seeds' (mean, std, n) of the loss at `step`

    @property
    def rule(self) -> str:
        if self.step is None:
            return "no step is shared by all runs: nothing can be compared (INVESTIGATE)"
        if self.step == 0:
            return "the only step all runs share is 0, before any update: no verdict (TOO EARLY)"
        if self.spread is not None:
            mean, std, n = self.spread
            return (f"PASS = |loss - baseline mean| <= {PASS_SIGMAS:g} sigma at step {self.step}; sigma = {std:.4f}, "
                    f"the std of the baseline's {n} seeds (mean {mean:.4f}); seed-spread rule")
        return (f"PASS = within {PASS_TOLERANCE:.0%} of the baseline's loss at step {self.step}; fixed-percentage "
                f"fallback rule (run the baseline with 2 or more seeds for a noise-based verdict)")

    @property
    def header(self) -> str:
        if self.step is None:
            return "compared at: no common step"
        what = "validation" if self.key == "val/loss" else "training (some run never evaluated)"
        return (f"compared at step {self.step}: the last step at which all {self.runs_sharing} compared runs logged a "
                f"{what} loss (failed and diverged runs left out); final values beside")


def _excluded(run: Run) -> bool:
    return run.status in ("FAILED", "diverged")


def comparison(runs: list[Run], baseline: Run) -> Comparison:
    """The common step of `runs` (module docstring) and the baseline's seed spread there."""
    pool = [r for r in runs if not _excluded(r)] or list(runs)
    key = "val/loss" if all(r.series.get("val/loss") for r in pool) else "train/loss"
    step_sets = [{s for s, _ in r.series.get(key, [])} for r in pool]
    common = set.intersection(*step_sets) if step_sets else set()
    step = max(common) if common else None
    spread = None
    if step is not None:
        base = [dict(r.series[key])[step] for r in runs if r.group == baseline.group and key in r.series
                and step in dict(r.series[key]) and not _excluded(r)]
        base = [v for v in base if math.isfinite(v)]
        if len(base) >= 2 and statistics.stdev(base) > 0:
            spread = (statistics.mean(base), statistics.stdev(base), len(base))
    return Comparison(step, key, len(pool), spread)


def loss_at(run: Run, key: str, step: int | None) -> float | None:
    if step is None:
        return None
    return dict(run.series.get(key, [])).get(step)


def same_step_ratio(run: Run, ref: Run, cmp: Comparison | None = None) -> tuple[float | None, int | None]:
    """(loss / reference loss, step) at the comparison step (default: the two runs' own last common step)."""
    cmp = cmp or comparison([run, ref], ref)
    mine, theirs = loss_at(run, cmp.key, cmp.step), loss_at(ref, cmp.key, cmp.step)
    if mine is None or theirs is None or theirs == 0 or not math.isfinite(theirs):
        return None, cmp.step
    return mine / theirs, cmp.step


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
    status: str
    fmt: str
    loss: float | None  # at the comparison step
    ratio: float | None
    ratio_step: int | None
    gap_sigma: float | None  # (loss - baseline mean) / baseline std, when the baseline has seeds
    val_loss: float | None  # final
    val_step: int | None
    ppl: float | None  # of the final val loss
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


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def _verdict(run: Run, baseline: Run, loss, ratio, gap_sigma, final, cmp: Comparison) -> str:
    if run.status == "FAILED":
        return "FAILED"
    if run.status == "diverged":
        return "DIVERGED"
    if (loss is not None and not math.isfinite(loss)) or (final is not None and not math.isfinite(final)):
        return "NON-FINITE"
    if run.group == baseline.group:
        return "baseline"
    if loss is None:
        return "INVESTIGATE"
    if cmp.step == 0:
        return "TOO EARLY"  # step 0 is before any update: every run with the baseline's seed is identical
    if cmp.spread is not None:
        ok = gap_sigma is not None and abs(gap_sigma) <= PASS_SIGMAS
    else:
        ok = ratio is not None and abs(ratio - 1.0) <= PASS_TOLERANCE
    if not ok:
        return "INVESTIGATE"
    return "PASS" if run.status == "completed" else "PARTIAL"


def summarize(runs: list[Run], baseline: Run, cmp: Comparison | None = None) -> list[Row]:
    """One Row per run, in the given order, all compared at `cmp` (default: comparison(runs, baseline))."""
    cmp = cmp or comparison(runs, baseline)
    rows = []
    for run in runs:
        final, final_step = final_val(run)
        loss = loss_at(run, cmp.key, cmp.step)
        ref = _reference(run, baseline, runs)
        ratio, _ = same_step_ratio(run, ref, cmp)
        gap_sigma = None
        if cmp.spread is not None and _finite(loss):
            gap_sigma = (loss - cmp.spread[0]) / cmp.spread[1]
        overflow = [max(v) for v in _role_metric(run, "overflow").values()]
        underflow = [_mean(v) for v in _role_metric(run, "underflow").values()]
        diverged_step = run.summary.get("diverged_step")
        rows.append(Row(
            run=run.name,
            status=run.status,
            fmt=describe_format(run),
            loss=loss,
            ratio=ratio,
            ratio_step=cmp.step,
            gap_sigma=gap_sigma,
            val_loss=final,
            val_step=final_step,
            ppl=math.exp(final) if _finite(final) and final < 700 else None,
            grad_cos=_mean(run.values("shadow/grad_cos_mean")),
            bit_stall=_mean(run.values("update/bit_stall")),
            max_overflow=max(overflow) if overflow else None,
            mean_underflow=max(underflow) if underflow else None,
            diverged_step=diverged_step if isinstance(diverged_step, int) else None,
            verdict=_verdict(run, baseline, loss, ratio, gap_sigma, final, cmp),
        ))
    return rows


def seed_spread(runs: list[Run]) -> dict[str, tuple[float, float, int]]:
    """{group: (mean, std, n)} of final val loss for groups with two or more seeds."""
    groups: dict[str, list[float]] = {}
    for run in runs:
        loss = final_val_loss(run)
        if _finite(loss) and not _excluded(run):
            groups.setdefault(run.group, []).append(loss)
    return {g: (statistics.mean(v), statistics.stdev(v), len(v)) for g, v in groups.items() if len(v) >= 2}


# ---- table -----------------------------------------------------------------------------------------

def _columns(sigma: bool) -> tuple[str, ...]:
    return ("run", "status", "format", "loss@S", "ratio@S") + (("Δ/σ",) if sigma else ()) + (
        "final val (step)", "grad cos", "bit-stall", "max overflow", "mean underflow", "diverged at", "verdict")


def _fmt(val, spec: str) -> str:
    return DASH if val is None else format(val, spec)


def _cells(row: Row, sigma: bool) -> list[str]:
    final = DASH if row.val_loss is None else f"{row.val_loss:.4f} ({_fmt(row.val_step, 'd')})"
    return [row.run, row.status, row.fmt, _fmt(row.loss, ".4f"), _fmt(row.ratio, ".4f")] + (
        [_fmt(row.gap_sigma, "+.1f")] if sigma else []) + [
        final, _fmt(row.grad_cos, ".4f"), _fmt(row.bit_stall, ".3f"), _fmt(row.max_overflow, ".2e"),
        _fmt(row.mean_underflow, ".2e"), _fmt(row.diverged_step, "d"), row.verdict]


def format_table(rows: list[Row], markdown: bool = False) -> str:
    sigma = any(r.gap_sigma is not None for r in rows)
    return _render([list(_columns(sigma))] + [_cells(r, sigma) for r in rows], markdown)


def _render(cells: list[list[str]], markdown: bool) -> str:
    """A header row and data rows as a markdown table, or as aligned text columns."""
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "|".join("---" for _ in cells[0]) + "|")
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _spread_lines(spread: dict[str, tuple[float, float, int]], baseline: Run) -> list[str]:
    lines = []
    for group, (mean, std, n) in spread.items():
        tag = " (baseline)" if group == baseline.group else ""
        lines.append(f"seed spread {group}{tag}: final val loss {mean:.4f} ± {std:.4f} over {n} seeds")
    return lines


def _group_mean(vals: list) -> float | None:
    return _mean([v for v in vals if _finite(v)])


def group_table(rows: list[Row], runs: list[Run], cmp: Comparison, markdown: bool = False) -> str | None:
    """One line per config over its seeds (None when no config has two or more): loss at step S as
    mean ± std, the mean's distance from the baseline mean in baseline σ (when the baseline has
    seeds), the other columns averaged over the seeds (max overflow: the max), and how many of its
    runs PASS the per-run rule."""
    groups: dict[str, list[Row]] = {}
    for run, row in zip(runs, rows):
        groups.setdefault(run.group, []).append(row)
    if not any(len(g) >= 2 for g in groups.values()):
        return None
    columns = ("config", "format", "seeds", "loss@S mean ± std", "Δ/σ", "grad cos", "bit-stall", "max overflow",
               "mean underflow", "PASS")
    cells = [list(columns)]
    for group, grp in groups.items():
        losses = [r.loss for r in grp if _finite(r.loss)]
        if len(losses) >= 2:
            loss = f"{statistics.mean(losses):.4f} ± {statistics.stdev(losses):.4f}"
        else:
            loss = _fmt(losses[0] if losses else None, ".4f")
        gap = None
        if cmp.spread is not None and losses:
            gap = (statistics.mean(losses) - cmp.spread[0]) / cmp.spread[1]
        passed = sum(r.verdict == "PASS" for r in grp)
        verdicts = "baseline" if grp[0].verdict == "baseline" else f"{passed}/{len(grp)}"
        overflow = [r.max_overflow for r in grp if _finite(r.max_overflow)]
        cells.append([group, grp[0].fmt, str(len(grp)), loss, _fmt(gap, "+.1f"),
                      _fmt(_group_mean([r.grad_cos for r in grp]), ".4f"),
                      _fmt(_group_mean([r.bit_stall for r in grp]), ".3f"),
                      _fmt(max(overflow) if overflow else None, ".2e"),
                      _fmt(_group_mean([r.mean_underflow for r in grp]), ".2e"), verdicts])
    return _render(cells, markdown)


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


def make_plots(runs: list[Run], out_dir: Path, heatmaps: bool = True) -> list[Path]:
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
    if heatmaps:  # one per run: a large sweep may leave them out (--no-heatmaps)
        made += [_heatmap(run, out_dir / f"grad_cos_heatmap_{_safe(run.name)}.png") for run in runs]
    return [p for p in made if p is not None]


def _group_plot(rows: list[Row], runs: list[Run], cmp: Comparison, path: Path) -> Path | None:
    """Loss at step S per config: mean over its seeds with a ±std bar and each seed as a dot; the
    baseline's mean ± std as a band."""
    import matplotlib.pyplot as plt

    groups: dict[str, list[float]] = {}
    for run, row in zip(runs, rows):
        groups.setdefault(run.group, [])
        if _finite(row.loss):
            groups[run.group].append(row.loss)
    groups = {g: v for g, v in groups.items() if v}
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(groups) + 2), 4))
    if cmp.spread is not None:
        mean, std = cmp.spread[0], cmp.spread[1]
        ax.axhspan(mean - std, mean + std, color="0.85", label="baseline mean ± std")
        ax.axhline(mean, color="0.5", lw=1)
    for i, (group, vals) in enumerate(groups.items()):
        m = statistics.mean(vals)
        err = statistics.stdev(vals) if len(vals) > 1 else 0.0
        ax.errorbar([i], [m], yerr=[err], fmt="o", color="tab:blue", capsize=3)
        ax.scatter([i] * len(vals), vals, s=8, color="tab:orange", zorder=3)
    ax.set_xticks(range(len(groups)), list(groups), rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(f"val loss at step {cmp.step}")
    ax.set_title("per config: mean ± std over seeds (dots: seeds)")
    if cmp.spread is not None:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# ---- report ----------------------------------------------------------------------------------------


def write_report(runs: list[Run], baseline: Run, out_dir: str | Path,
                 heatmaps: bool = True) -> tuple[str, Path, list[Path]]:
    """Write report.md and the plots into out_dir; returns (terminal text, report path, plot paths)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmp = comparison(runs, baseline)
    rows = summarize(runs, baseline, cmp)
    spread = _spread_lines(seed_spread(runs), baseline)
    plots = make_plots(runs, out_dir, heatmaps)
    note = f"baseline: {baseline.name}; ratio@S = loss / the seed-matched baseline's loss at step S; {cmp.rule}"
    text = "\n".join([cmp.header, "", format_table(rows), "", note] + spread)
    md = ["# altgrad report", "", cmp.header, "", format_table(rows, markdown=True), "", note, ""]
    md += [f"- {line}" for line in spread] + ([""] if spread else [])
    by_config = group_table(rows, runs, cmp)
    if by_config is not None:  # a sweep with seeds: one line per config, and its plot
        text += "\n\nby config, over its seeds (PASS: runs passing the rule above)\n" + by_config
        md += ["## By config, over its seeds", "", group_table(rows, runs, cmp, markdown=True), "",
               "PASS: how many of the config's runs pass the per-run rule above.", ""]
        group_png = _group_plot(rows, runs, cmp, out_dir / "by_config.png")
        plots += [group_png] if group_png is not None else []
    md += ["| run | status | steps | high-precision matmuls | wall time (s) |", "|---|---|---|---|---|"]
    for run in runs:
        wall = run.summary.get("wall_time_s")
        md.append(f"| {run.name} | {run.status} | {_fmt(run.summary.get('steps'), 'd')} | "
                  f"{run.summary.get('high_precision_matmul', DASH)} | "
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
    p.add_argument("--no-heatmaps", action="store_true", help="leave out the per-run layer x step gradient heatmaps")
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
    text, report, plots = write_report(runs, baseline, out_dir, heatmaps=not args.no_heatmaps)
    print(text)
    print(f"\nreport: {report}" + (f"; plots: {', '.join(str(p) for p in plots)}" if plots else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
