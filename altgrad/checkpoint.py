"""Checkpoints: one dict per file, written atomically, rotated, found again on resume.

A run directory holds numbered checkpoints `ckpt_0000100.pt` (at most `max_checkpoints`
of them) and `ckpt_last.pt`, which is always the newest state: a hard link to the newest
numbered file, or its own file for a final save between intervals. Writes go to a temp
file in the same folder and then `os.replace`, so a crash never leaves a half-written
checkpoint under a real name.

The dict holds only tensors, numbers, strings, lists and dicts, so it loads with
`torch.load(weights_only=True)` (no pickled code runs on load). train.py's dict:
`schema, step, model, optimizer, rng, data, best_val_loss, best_val_step, nonfinite_streak,
wall_time_s, config` (+ `diagnostics` when the metrics module has state). QuantizedLinear
keeps its AmaxHistory and scales in module buffers, so they travel in `model`.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from altgrad.tracking import atomic_path

__all__ = [
    "SCHEMA_VERSION",
    "CKPT_LAST",
    "CheckpointError",
    "checkpoint_path",
    "save_checkpoint",
    "save_run_checkpoint",
    "list_checkpoints",
    "rotate_checkpoints",
    "latest_checkpoint",
    "checkpoint_candidates",
    "load_latest_checkpoint",
    "load_checkpoint",
]

SCHEMA_VERSION = 1  # bump when the dict's layout changes; load_checkpoint refuses newer ones
CKPT_LAST = "ckpt_last.pt"
_NUMBERED = re.compile(r"^ckpt_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit this code (one-line message)."""


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    # zero-padded so that a directory listing sorts by step
    return Path(run_dir) / f"ckpt_{step:07d}.pt"


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """torch.save `state` (with `schema` added) to `path` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save({"schema": SCHEMA_VERSION, **state}, f)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the name points at them
    return path


def _point_last_at(path: Path) -> Path:
    """Make ckpt_last.pt the same file as `path` (hard link; a copy where links fail)."""
    last = path.parent / CKPT_LAST
    with atomic_path(last) as tmp:
        os.unlink(tmp)  # os.link needs a free name
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
    return last


def save_run_checkpoint(state: dict, run_dir: str | os.PathLike, step: int, *, max_checkpoints: int,
                        numbered: bool = True) -> Path:
    """Save a run's checkpoint at `step`: numbered + ckpt_last.pt, then drop old numbered ones.

    numbered=False writes only ckpt_last.pt (a final state between checkpoint intervals).
    """
    run_dir = Path(run_dir)
    if not numbered:
        return save_checkpoint(state, run_dir / CKPT_LAST)
    path = save_checkpoint(state, checkpoint_path(run_dir, step))
    _point_last_at(path)
    rotate_checkpoints(run_dir, max_checkpoints)
    return path


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Numbered checkpoints in `run_dir` as (step, path), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        m = _NUMBERED.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def rotate_checkpoints(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the `keep` newest numbered checkpoints; returns the deleted paths."""
    if keep < 1:
        raise ValueError(f"keep: must be >= 1, got {keep}")
    doomed = [p for _, p in list_checkpoints(run_dir)[:-keep]]
    for p in doomed:
        p.unlink()
    return doomed


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """ckpt_last.pt when present, else the newest numbered checkpoint, else None."""
    last = Path(run_dir) / CKPT_LAST
    if last.is_file():
        return last
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def checkpoint_candidates(run_dir: str | os.PathLike) -> list[Path]:
    """Every checkpoint of `run_dir`, newest first: ckpt_last.pt, then numbered ones by step."""
    last = Path(run_dir) / CKPT_LAST
    return ([last] if last.is_file() else []) + [p for _, p in reversed(list_checkpoints(run_dir))]


def load_latest_checkpoint(run_dir: str | os.PathLike, map_location="cpu", warn=None) -> tuple[Path | None, dict | None]:
    """(path, state) of the newest checkpoint of `run_dir` that loads, or (None, None) when there is none.

    ckpt_last.pt is a hard link to the newest numbered file, so one damaged file can ruin both
    names: an unreadable checkpoint is reported through `warn(message)` and the next older one is
    tried. Raises CheckpointError (naming the newest failure) when checkpoints exist but none loads.
    """
    errors = []
    for path in checkpoint_candidates(run_dir):
        try:
            return path, load_checkpoint(path, map_location=map_location)
        except CheckpointError as e:
            errors.append(e)
            if warn is not None:
                warn(f"warning: {e}; trying an older checkpoint")
    if errors:
        raise CheckpointError(f"no readable checkpoint in {run_dir} (newest: {errors[0]})")
    return None, None


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint dict written by `save_checkpoint` (weights_only: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, ...: say which file and why, in one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot be loaded ({reason})") from None
    if not isinstance(state, dict) or "schema" not in state:
        raise CheckpointError(f"{path}: not an altgrad checkpoint (no 'schema' key)")
    if state["schema"] > SCHEMA_VERSION:
        raise CheckpointError(f"{path}: schema {state['schema']} is newer than this code's "
                              f"{SCHEMA_VERSION}; update altgrad")
    return state
