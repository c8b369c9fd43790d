"""Run several configs (and seeds), N at a time, then compare them with altgrad.report.

    python -m altgrad.sweep configs/baseline.yaml configs/e5m2_fp8.yaml [...] \
        [--seeds 42 43 44] [--train.max_steps=200 ...] [--jobs N] [--out-root out]

Each (config, seed) runs `python train.py CONFIG --train.seed=S --log.run_name=<name>_s<S>
--log.out_dir=<out-root> <overrides>` in its own process, where <name> is the config file's name.
Overrides use train.py's syntax, `--section.key=value` (`--set section.key=value` is the same).
The same seed gives every config the same initial weights and data order, so runs of one seed
differ only by precision. The first config is the report's baseline; put the BF16 config first.

**Before the first run** every (config, overrides) pair is checked as train.py would check it
(keys, types, values, quant section, data directory and token ids, and whether a run directory is
in use by a live run): a mistake in the last config stops the sweep before the first one starts,
with one line and exit code 2. `--dry-run` does the same checks and prints the commands.

**--jobs N** runs N processes at once (one GPU holds several small runs). Each run's output lines
are printed whole, prefixed with `[run name]`, and also kept in `<out-root>/<run name>.log`.
On a CPU each run then gets `cores / N` threads (OMP_NUM_THREADS) unless that is already set.

**Ctrl-C / SIGTERM**: the runs are started in their own process groups, so the signal reaches only
the sweep, which forwards it once to every running run: each finishes its step, saves a
checkpoint and exits (train.py's exit code 130); no new run starts. A second Ctrl-C is forwarded
again, which makes the runs abort without saving. The sweep then reports the runs that produced
output and exits 130.

Outcomes: a run that diverges (exit code 3) is a result and goes into the report; any other
failing run is listed at the end and makes the sweep exit 1 after reporting the others.
Without --seeds each config runs once with its own `train.seed` (42 if unset).

**--base FILE** (repeatable) layers FILE under every config, as `python train.py FILE CONFIG`
does: e.g. `--base configs/cpu_quick.yaml` runs each format config at laptop size.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from altgrad import report

DIVERGED_EXIT_CODE, STOPPED_EXIT_CODE = 3, 130  # train.py's exit codes
_OVERRIDE_RE = re.compile(r"^--[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")
_SET_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+=")
_OWNED_KEYS = ("train.seed", "log.run_name", "log.out_dir", "train.resume")  # set by the sweep itself

__all__ = ["SweepRun", "SweepError", "plan", "validate", "run_sweep", "main"]


@dataclass(frozen=True)
class SweepRun:
    config: Path
    seed: int
    run_name: str
    run_dir: Path
    cmd: tuple[str, ...]
    overrides: tuple[str, ...] = ()  # what train.py parses (--section.key=value), the sweep's own included
    bases: tuple[Path, ...] = ()  # config files layered under `config` (train.py BASE... CONFIG)

    @property
    def config_files(self) -> list[Path]:
        return [*self.bases, self.config]


class SweepError(ValueError):
    """Bad command-line input: the message names the argument and what is allowed."""


def _default_train_script() -> Path:
    # the repo's train.py sits beside the altgrad package in a source checkout
    beside = Path(__file__).resolve().parent.parent / "train.py"
    return beside if beside.is_file() else Path("train.py")


def _config_seed(paths: list[Path]) -> int:
    from altgrad.runconfig import ConfigError, merge_configs, read_yaml

    try:
        raw = merge_configs([read_yaml(p) for p in paths])
    except ConfigError as err:
        raise SweepError(str(err)) from None
    seed = (raw.get("train") or {}).get("seed", 42) if isinstance(raw.get("train"), dict) else 42
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else 42


def _normalize(overrides: list[str]) -> list[str]:
    """`--section.key=value` or `section.key=value` (from --set) -> `--section.key=value`."""
    out = []
    for item in overrides:
        if not (_OVERRIDE_RE.match(item) or _SET_RE.match(item)):
            raise SweepError(f"{item!r}: overrides are written --section.key=value (e.g. --train.max_steps=50)")
        item = item if item.startswith("--") else f"--{item}"
        key = item[2:].split("=", 1)[0]
        if key in _OWNED_KEYS:
            raise SweepError(f"{item!r}: {key} is set by the sweep (use --seeds / --out-root instead)")
        out.append(item)
    return out


def plan(configs: list[str | Path], seeds: list[int] | None = None, sets: list[str] = (),
         out_root: str | Path = "out", train_script: str | Path | None = None,
         python: str = sys.executable, bases: list[str | Path] = ()) -> list[SweepRun]:
    """The runs of a sweep, in order: every seed of the first config, then of the next, ...

    `sets` are overrides, `--section.key=value` or `section.key=value`; `bases` are config files
    layered under every config. Checks only the command line; `validate` checks the configs.
    """
    overrides = _normalize(list(sets))
    if seeds is not None and (not seeds or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**32
                                               for s in seeds)):
        raise SweepError(f"--seeds must be one or more integers in [0, 2**32) (got {seeds!r})")
    script = Path(train_script) if train_script else _default_train_script()
    bases = tuple(map(Path, bases))
    for base in bases:
        if not base.is_file():
            raise SweepError(f"--base {str(base)!r} does not exist")
    runs, names = [], set()
    for config in map(Path, configs):
        if not config.is_file():
            raise SweepError(f"config {str(config)!r} does not exist")
        for seed in seeds if seeds is not None else [_config_seed([*bases, config])]:
            name = f"{config.stem}_s{seed}"
            if name in names:
                raise SweepError(f"two runs would both be named {name!r}: give each config a distinct file name")
            names.add(name)
            own = (f"--train.seed={seed}", f"--log.run_name={name}", f"--log.out_dir={out_root}", *overrides)
            cmd = (python, str(script), *map(str, bases), str(config), *own)
            runs.append(SweepRun(config, seed, name, Path(out_root) / name, cmd, own, bases))
    return runs


def validate(runs: list[SweepRun]) -> None:
    """Check every run as train.py will, before any starts: config and overrides, data, run locks.

    Raises SweepError naming the run and the problem (one line).
    """
    from altgrad.data import DataError, DataNotFoundError, check_data
    from altgrad.rundir import lock_holder
    from altgrad.runconfig import ConfigError, load_config

    checked_data = set()
    for run in runs:
        try:
            cfg = load_config(run.config_files, list(run.overrides))
        except ConfigError as err:
            raise SweepError(f"{run.run_name} ({run.config}): {err}") from None
        key = (str(cfg.data_dir), cfg.model.block_size, cfg.model.vocab_size)
        if key not in checked_data:
            try:
                check_data(*key)
            except (DataError, DataNotFoundError) as err:
                raise SweepError(f"{run.run_name} ({run.config}): {err}") from None
            checked_data.add(key)
        holder = lock_holder(cfg.run_dir)
        if holder is not None:
            raise SweepError(f"{run.run_name}: {cfg.run_dir} is in use by a live run (pid {holder.get('pid')} on "
                             f"host {holder.get('host')}); wait for it, or use another --out-root")


def _outcome(code: int) -> str:
    if code == 0:
        return "completed"
    if code == DIVERGED_EXIT_CODE:
        return "diverged"  # a result, not a failure of the sweep
    if code == STOPPED_EXIT_CODE:
        return "stopped"
    return f"failed (exit {code})"


class _Printer:
    """Whole lines from several runs, each prefixed with its run's name, never interleaved mid-line."""

    def __init__(self):
        self._lock = threading.Lock()

    def line(self, text: str, err: bool = False) -> None:
        with self._lock:
            stream = sys.stderr if err else sys.stdout
            stream.write(text if text.endswith("\n") else text + "\n")
            stream.flush()

    def pump(self, name: str, pipe, log_path: Path) -> threading.Thread:
        def run():
            with open(log_path, "w") as log:
                for raw in pipe:
                    log.write(raw)
                    log.flush()
                    self.line(f"[{name}] {raw}")
            pipe.close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread


def _child_env(jobs: int) -> dict:
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:  # N runs on one CPU: share the cores, no oversubscription
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    env.setdefault("PYTHONUNBUFFERED", "1")  # lines as they come, not at exit
    return env


def run_sweep(runs: list[SweepRun], jobs: int = 1, log_dir: str | Path | None = None) -> tuple[dict[str, str], bool]:
    """Run the commands, `jobs` at a time; returns ({run_name: outcome}, interrupted).

    Outcomes: "completed", "diverged", "stopped", "failed (exit N)"; runs never started are absent.
    """
    printer = _Printer()
    pending, running, outcome = list(enumerate(runs, 1)), {}, {}
    signals = {"count": 0}

    def forward(signum, frame):
        signals["count"] += 1
        for proc, _, _ in running.values():
            try:
                proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass
        if signals["count"] == 1:
            printer.line(f"sweep: {signal.Signals(signum).name}: asked {len(running)} running run(s) to save and stop; "
                         f"{len(pending)} not started; again to abort without saving", err=True)
        else:
            printer.line("sweep: aborting the running runs (no save)", err=True)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while pending or running:
            while pending and len(running) < jobs and not signals["count"]:
                i, run = pending.pop(0)
                printer.line(f"[sweep {i}/{len(runs)}] {' '.join(run.cmd)}")
                capture = jobs > 1
                proc = subprocess.Popen(run.cmd, start_new_session=True, env=_child_env(jobs), text=True,
                                        stdout=subprocess.PIPE if capture else None,
                                        stderr=subprocess.STDOUT if capture else None)
                thread = None
                if capture:
                    log_root = Path(log_dir) if log_dir is not None else run.run_dir.parent
                    log_root.mkdir(parents=True, exist_ok=True)
                    thread = printer.pump(run.run_name, proc.stdout, log_root / f"{run.run_name}.log")
                running[run.run_name] = (proc, i, thread)
            if signals["count"]:
                pending.clear()
            for name, (proc, i, thread) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                if thread is not None:
                    thread.join()
                del running[name]
                outcome[name] = _outcome(code)
                printer.line(f"[sweep {i}/{len(runs)}] {name}: {outcome[name]}")
            if running:
                time.sleep(0.1)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return outcome, signals["count"] > 0


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m altgrad.sweep", description=__doc__.split("\n")[0],
                                epilog="Overrides: --section.key=value, as train.py (or --set section.key=value).")
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML configs; the first is the baseline")
    p.add_argument("--seeds", nargs="+", type=int, metavar="S", help="seeds to run each config with")
    p.add_argument("--base", dest="bases", action="append", default=[], metavar="FILE",
                   help="config layered under every CONFIG (repeatable), e.g. configs/cpu_quick.yaml")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override passed to every run (repeatable); same as --section.key=value")
    p.add_argument("--jobs", "-j", type=int, default=1, metavar="N", help="runs at once (default 1)")
    p.add_argument("--out-root", default="out", metavar="DIR", help="parent of the run directories (default: out)")
    p.add_argument("--report-out", metavar="DIR", help="report directory (default: <out-root>/report)")
    p.add_argument("--train-script", metavar="PATH", help="train.py to run (default: the repo's)")
    p.add_argument("--dry-run", action="store_true", help="check everything, print the commands, run nothing")
    args, unknown = p.parse_known_args(argv)
    overrides = [a for a in unknown if _OVERRIDE_RE.match(a)]
    others = [a for a in unknown if not _OVERRIDE_RE.match(a)]
    if others:
        p.error(f"unrecognized arguments: {' '.join(others)} (overrides are written --section.key=value)")
    args.sets = overrides + args.sets
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        if args.jobs < 1:
            raise SweepError(f"--jobs must be >= 1 (got {args.jobs})")
        runs = plan(args.configs, args.seeds, args.sets, args.out_root, args.train_script, bases=args.bases)
        validate(runs)
    except SweepError as err:
        print(f"sweep: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("\n".join(" ".join(r.cmd) for r in runs))
        return 0
    outcome, interrupted = run_sweep(runs, jobs=args.jobs)
    failed = [f"{name}: {what}" for name, what in outcome.items() if what.startswith("failed")]
    dirs = [str(r.run_dir) for r in runs if r.run_name in outcome and ((r.run_dir / "summary.json").is_file()
            or (r.run_dir / "metrics.jsonl").is_file())]
    if dirs:
        report_out = args.report_out or str(Path(args.out_root) / "report")
        report.main(dirs + ["--out", report_out])
    if interrupted:
        done = ", ".join(f"{n} {w}" for n, w in outcome.items()) or "none"
        skipped = len(runs) - len(outcome)
        print(f"sweep: interrupted; finished: {done}; {skipped} run(s) not started", file=sys.stderr)
        return STOPPED_EXIT_CODE
    if failed:
        print("sweep: runs failed: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed or not dirs else 0


if __name__ == "__main__":
    sys.exit(main())
