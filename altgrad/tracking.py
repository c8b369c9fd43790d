"""Run tracking: `metrics.jsonl` always, Weights & Biases when asked (docs/design.md §7–§8).

`RunLogger.log(step, metrics)` writes one JSON object per call to `<run_dir>/metrics.jsonl`
(`{"step": 100, "train/loss": 2.31, ...}`) and sends the same keys to W&B. W&B modes:
`online`, `offline` (no network; files under `<run_dir>/wandb/`, upload later with
`wandb sync <run_dir>/wandb/offline-run-*`) and `disabled`, which never imports wandb.

JSON has no NaN or infinity, so non-finite values are written as `null` in metrics.jsonl
(W&B receives the float itself, which it plots as a gap).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["RunLogger", "atomic_path", "temp_path", "write_text_atomic", "write_json_atomic", "read_metrics", "run_versions",
           "git_commit", "git_diff", "WANDB_MODES"]

WANDB_MODES = ("online", "offline", "disabled")
WANDB_INIT_TIMEOUT_S = 30.0  # online: how long to wait for the W&B server before logging offline instead
_WANDB_ID_FILE = "wandb_run_id.txt"


def _number(value):
    """A metric value as a Python scalar: tensors/numpy scalars -> float/int, others unchanged."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        return int(value)
    return value


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def temp_path(path: str | os.PathLike) -> str:
    """A new empty file beside `path` (same folder, so os.replace onto `path` is atomic), with
    the permissions a plain open() would give (mkstemp's 0600 would hide run files from others)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp file name beside `path`; on success it replaces `path` (os.replace, atomic),
    on any error it is removed: readers only ever see the old or the complete new file."""
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (see atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON (non-finite floats as null) to `path` atomically."""
    write_text_atomic(path, json.dumps(_finite(obj), indent=2, allow_nan=False, default=str) + "\n")


def _finite(obj):
    """`obj` with every non-finite float replaced by None, recursively (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics.jsonl file (a torn last line from a crash is skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # only a crash mid-write leaves a partial line, and only at the end
    return records


def _truncate_after(path: Path, step: int) -> None:
    """Keep records with step <= `step`: a resumed run re-logs what came after its checkpoint."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", -1) <= step]
    write_text_atomic(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept))


class RunLogger:
    """metrics.jsonl + optional W&B for one run directory.

    resume_step=None starts a fresh metrics.jsonl; an int keeps the records up to that step
    and appends (W&B resumes the same run id, stored in `<run_dir>/wandb_run_id.txt`).
    """

    def __init__(self, run_dir: str | os.PathLike, *, config: dict | None = None, project: str = "altgrad",
                 run_name: str | None = None, tags=(), wandb_mode: str = "disabled", entity: str | None = None,
                 resume_step: int | None = None):
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode: must be one of {', '.join(WANDB_MODES)}, got {wandb_mode!r}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if resume_step is None:
            self.metrics_path.unlink(missing_ok=True)
        else:
            _truncate_after(self.metrics_path, resume_step)
        self._file = open(self.metrics_path, "a", buffering=1)  # line-buffered: readable while running
        self.wandb_mode = wandb_mode
        self.wandb_run = None
        if wandb_mode != "disabled":
            self.wandb_run = self._init_wandb(config, project, run_name, list(tags), entity,
                                              resume=resume_step is not None)

    def _init_wandb(self, config, project, run_name, tags, entity, resume: bool):
        import wandb  # lazy: a disabled run never pays for (or needs) the import

        id_file = self.run_dir / _WANDB_ID_FILE
        # None lets wandb make a new id; a resumed run continues the W&B run it started
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        kwargs = dict(project=project, entity=entity, name=run_name, tags=tags, config=config or {},
                      dir=str(self.run_dir), id=run_id, resume="allow")
        if self.wandb_mode == "online":  # without network this waits: say so instead of hanging silently
            print(f"W&B online: connecting (up to {WANDB_INIT_TIMEOUT_S:.0f} s, then offline)", file=sys.stderr,
                  flush=True)
        try:
            run = wandb.init(mode=self.wandb_mode, settings=wandb.Settings(silent=True, init_timeout=WANDB_INIT_TIMEOUT_S),
                             **kwargs)
        except Exception as e:  # no login / no network: keep the run, keep its W&B record locally
            if self.wandb_mode != "online":
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"W&B online failed ({first}); logging offline to {self.run_dir / 'wandb'} instead "
                  f"(`wandb login`, then `wandb sync`)", file=sys.stderr)
            self.wandb_mode = "offline"
            run = wandb.init(mode="offline", settings=wandb.Settings(silent=True), **kwargs)
        id_file.write_text(run.id + "\n")
        return run

    def log(self, step: int, metrics: dict) -> dict:
        """Record `metrics` at `step` in every sink; returns the record written to metrics.jsonl."""
        values = {key: _number(value) for key, value in metrics.items()}
        record = {"step": int(step), **{k: _json_safe(v) for k, v in values.items()}}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=int(step))
        return record

    def close(self, summary: dict | None = None, exit_code: int = 0) -> None:
        """Close the metrics file; send the layer panels and the scalar entries of `summary` to
        W&B and finish it."""
        if not self._file.closed:
            self._file.close()
        if self.wandb_run is not None:
            self._log_layer_panels()
            if summary:
                scalars = {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) or v is None}
                self.wandb_run.summary.update(scalars)
            self.wandb_run.finish(exit_code=exit_code)
            self.wandb_run = None

    def _log_layer_panels(self) -> None:
        """One W&B chart per per-layer metric, a line per layer (`layers/<metric>`): W&B's
        automatic panels would show each layer's key on its own. The keys themselves stay those of
        metrics.jsonl."""
        import wandb

        records = read_metrics(self.metrics_path)
        charts = {f"layers/{metric}": wandb.plot.line_series(xs=xs, ys=ys, keys=layers, title=metric, xname="step")
                  for metric, (xs, ys, layers) in layer_panels(records).items()}
        if charts:  # into the last step's row: W&B history keeps one row per metrics.jsonl record
            self.wandb_run.log(charts, step=records[-1]["step"])

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(exit_code=0 if exc_type is None else 1)


def _layer_key(key: str) -> tuple[str, str] | None:
    """(metric, layer) of a per-layer key — `quant/<layer>/<role>/<stat>` or `<group>/<layer>/<stat>`
    (update, mlp, grad, shadow) — else None (aggregates such as `quant/input/overflow`)."""
    parts = key.split("/")
    if len(parts) == (4 if parts[0] == "quant" else 3) and parts[0] in ("quant", "update", "mlp", "grad", "shadow"):
        return "/".join([parts[0], *parts[2:]]), parts[1]
    return None


def layer_panels(records: list[dict]) -> dict[str, tuple[list[list[int]], list[list[float]], list[str]]]:
    """Per-layer keys regrouped by metric: {metric: (steps per layer, values per layer, layer names)},
    non-finite values (null in metrics.jsonl) left out."""
    series: dict[str, dict[str, tuple[list, list]]] = {}
    for rec in records:
        for key, value in rec.items():
            if (split := _layer_key(key)) is None or value is None:
                continue
            xs, ys = series.setdefault(split[0], {}).setdefault(split[1], ([], []))
            xs.append(rec["step"])
            ys.append(value)
    return {metric: ([v[0] for v in by_layer.values()], [v[1] for v in by_layer.values()], list(by_layer))
            for metric, by_layer in series.items()}


# ----------------------------------------------------------------------------------------
# provenance for summary.json: versions and the code's git commit


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)  # reads metadata only, imports nothing
    except importlib.metadata.PackageNotFoundError:
        return None


def run_versions() -> dict:
    """python, torch, CUDA, cuDNN, triton, numpy, wandb and altgrad versions (None = absent)."""
    import torch

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "wandb": _version("wandb"),
        "altgrad": _version("altgrad"),
    }


def git_commit(repo_dir: str | os.PathLike | None = None) -> str | None:
    """HEAD of the git checkout holding altgrad (`<sha>-dirty` with uncommitted changes to
    tracked files), or None outside a checkout / without git."""
    repo_dir = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parent.parent

    def git(*args):
        return subprocess.run(["git", *args], cwd=repo_dir, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


def git_diff(repo_dir: str | os.PathLike | None = None) -> str | None:
    """`git diff HEAD` of the checkout holding altgrad: the uncommitted changes to tracked files
    that, with `git_commit`, reproduce the code a run used ('' for a clean tree; None outside a
    checkout / without git). Untracked files are not included."""
    repo_dir = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "diff", "HEAD", "--binary"], cwd=repo_dir, capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None
