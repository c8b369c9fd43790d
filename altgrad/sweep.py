"""Run several configs (and seeds) one after another, then compare them with altgrad.report.

    python -m altgrad.sweep configs/bf16_baseline.yaml configs/e5m2_fp8.yaml [...] \
        [--seeds 42 43 44] [--set train.max_steps=200 ...] [--out-root out]

Each (config, seed) runs `python train.py CONFIG --train.seed=S --log.run_name=<name>_s<S>
--log.out_dir=<out-root> <sets>` in a subprocess, where <name> is the config file's name. The same
seed gives every config the same initial weights and data order, so runs of one seed differ only
by precision. The first config is the report's baseline; put the BF16 config first.

A run that diverges (train.py exit code 3) is a result and goes into the report; any other failing
run is reported at the end and makes the sweep exit 1 after reporting the runs that produced output.
Without --seeds each config runs once with its own `train.seed` (42 if unset).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from altgrad import report

DIVERGED_EXIT_CODE = 3  # train.py's exit code for a run stopped by non-finite losses
_SET_RE = re.compile(r"^[A-Za-z_]\w*\.[A-Za-z_]\w*=")
_OWNED_KEYS = ("train.seed", "log.run_name", "log.out_dir")  # set by the sweep itself

__all__ = ["SweepRun", "plan", "run_sweep", "main"]


@dataclass(frozen=True)
class SweepRun:
    config: Path
    seed: int
    run_name: str
    run_dir: Path
    cmd: tuple[str, ...]


class SweepError(ValueError):
    """Bad command-line input: the message names the argument and what is allowed."""


def _default_train_script() -> Path:
    # the repo's train.py sits beside the altgrad package in a source checkout
    beside = Path(__file__).resolve().parent.parent / "train.py"
    return beside if beside.is_file() else Path("train.py")


def _config_seed(path: Path) -> int:
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SweepError(f"config {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    seed = (raw.get("train") or {}).get("seed", 42) if isinstance(raw, dict) else 42
    return seed if isinstance(seed, int) else 42


def _check_sets(sets: list[str]) -> None:
    for item in sets:
        if not _SET_RE.match(item):
            raise SweepError(f"--set {item!r}: expected section.key=value, e.g. train.max_steps=50")
        if item.split("=", 1)[0] in _OWNED_KEYS:
            raise SweepError(f"--set {item!r}: {item.split('=', 1)[0]} is set by the sweep "
                             "(use --seeds / --out-root instead)")


def plan(configs: list[str | Path], seeds: list[int] | None = None, sets: list[str] = (),
         out_root: str | Path = "out", train_script: str | Path | None = None,
         python: str = sys.executable) -> list[SweepRun]:
    """The runs of a sweep, in order: every seed of the first config, then of the next, ..."""
    _check_sets(list(sets))
    if seeds is not None and (not seeds or any(not isinstance(s, int) or s < 0 for s in seeds)):
        raise SweepError(f"--seeds must be one or more integers >= 0 (got {seeds!r})")
    script = Path(train_script) if train_script else _default_train_script()
    runs, names = [], set()
    for config in map(Path, configs):
        if not config.is_file():
            raise SweepError(f"config {str(config)!r} does not exist")
        for seed in seeds if seeds is not None else [_config_seed(config)]:
            name = f"{config.stem}_s{seed}"
            if name in names:
                raise SweepError(f"two runs would both be named {name!r}: give each config a distinct file name")
            names.add(name)
            cmd = (python, str(script), str(config), f"--train.seed={seed}", f"--log.run_name={name}",
                   f"--log.out_dir={out_root}", *(f"--{s}" for s in sets))
            runs.append(SweepRun(config, seed, name, Path(out_root) / name, cmd))
    return runs


def run_sweep(runs: list[SweepRun]) -> dict[str, str]:
    """Run each command in turn; returns {run_name: "completed" | "diverged" | "failed (exit N)"}."""
    outcome = {}
    for i, run in enumerate(runs, 1):
        print(f"[sweep {i}/{len(runs)}] {' '.join(run.cmd)}", flush=True)
        code = subprocess.run(run.cmd).returncode
        if code == 0:
            outcome[run.run_name] = "completed"
        elif code == DIVERGED_EXIT_CODE:
            outcome[run.run_name] = "diverged"  # a result, not a failure of the sweep
        else:
            outcome[run.run_name] = f"failed (exit {code})"
        print(f"[sweep {i}/{len(runs)}] {run.run_name}: {outcome[run.run_name]}", flush=True)
    return outcome


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m altgrad.sweep", description=__doc__.split("\n")[0])
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML configs; the first is the baseline")
    p.add_argument("--seeds", nargs="+", type=int, metavar="S", help="seeds to run each config with")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override passed to every run (repeatable)")
    p.add_argument("--out-root", default="out", metavar="DIR", help="parent of the run directories (default: out)")
    p.add_argument("--report-out", metavar="DIR", help="report directory (default: <out-root>/report)")
    p.add_argument("--train-script", metavar="PATH", help="train.py to run (default: the repo's)")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running them")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        runs = plan(args.configs, args.seeds, args.sets, args.out_root, args.train_script)
    except SweepError as err:
        print(f"sweep: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("\n".join(" ".join(r.cmd) for r in runs))
        return 0
    outcome = run_sweep(runs)
    failed = [f"{name}: {what}" for name, what in outcome.items() if what.startswith("failed")]
    dirs = [str(r.run_dir) for r in runs if (r.run_dir / "summary.json").is_file()
            or (r.run_dir / "metrics.jsonl").is_file()]
    if dirs:
        report_out = args.report_out or str(Path(args.out_root) / "report")
        report.main(dirs + ["--out", report_out])
    if failed:
        print("sweep: runs failed: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed or not dirs else 0


if __name__ == "__main__":
    sys.exit(main())
