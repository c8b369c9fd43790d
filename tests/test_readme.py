"""Every command in the README's ```bash blocks runs as written (tiny sizes, CPU).

The commands run in order, in a scratch directory laid out like the repository (configs/, train.py,
sample.py, scripts/ linked; data/shakespeare_complete_char/ prepared from the Hamlet fixture), so `out/`
paths in the README resolve there. What a test must change, and nothing else:
- `python` is this interpreter and `torchrun` is `python -m torch.distributed.run` (the same launcher);
- training commands (train.py, torchrun, the sweep, full_size_sweep.sh, make run) get tiny-model
  overrides appended: later overrides win, so the README's own arguments still apply;
- `make test` is this suite and is not run from inside it; `make run` runs what it runs after the
  set-up, `scripts/quickstart.sh`.
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
        "--train.device=cpu", "--train.batch_size=4", "--train.max_steps=4", "--train.warmup=1",
        "--train.eval_interval=2", "--train.eval_iters=1", "--train.log_interval=1",
        "--train.checkpoint_interval=2", "--train.shadow_interval=2"]


def readme_commands() -> list[str]:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands


def as_run(command: str) -> list[str] | None:
    """argv for `command` with the test's substitutions (module docstring), or None for `make test`."""
    argv = shlex.split(command, comments=True)
    if argv[:2] == ["make", "test"]:
        return None
    if argv[:2] == ["make", "run"]:
        return ["scripts/quickstart.sh", *TINY]
    if argv[0] == "python":
        argv[0] = sys.executable
    elif argv[0] == "torchrun":
        argv[:1] = [sys.executable, "-m", "torch.distributed.run"]
    training = (("train.py" in argv and "--help" not in argv) or "altgrad.sweep" in argv
                or argv[0] == "scripts/full_size_sweep.sh")
    return argv + TINY if training else argv


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, prepare_module):
    work = tmp_path_factory.mktemp("readme")
    for name in ("configs", "train.py", "sample.py", "scripts"):
        (work / name).symlink_to(REPO_ROOT / name)
    text = (REPO_ROOT / "tests" / "fixtures" / "hamlet_slice.txt").read_text(encoding="utf-8")
    prepare_module.prepare(text, work / "data" / "shakespeare_complete_char")
    return work


def test_the_readme_has_the_commands_this_test_knows():
    commands = readme_commands()
    assert any(c.startswith("torchrun ") for c in commands) and any("altgrad.sweep" in c for c in commands)
    assert any(c.startswith("python sample.py") for c in commands) and "python train.py --help" in " ".join(commands)
    for command in commands:
        argv = shlex.split(command, comments=True)
        assert argv[0] in ("python", "torchrun", "make", "scripts/full_size_sweep.sh"), command


@pytest.mark.slow
def test_every_readme_command_runs_as_written(workdir):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHON=sys.executable, WANDB_API_KEY="", WANDB_BASE_URL="http://127.0.0.1:9")
    env.pop("WANDB_API_KEY")
    ran = []
    for command in readme_commands():
        argv = as_run(command)
        if argv is None:
            continue
        proc = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        ran.append((command, proc))
    outputs = {c: p for c, p in ran}
    out = workdir / "out"
    assert (out / "e5m2_fp8" / "summary.json").is_file() and (out / "quickstart" / "report" / "report.md").is_file()
    torchrun = next(p for c, p in outputs.items() if c.startswith("torchrun"))
    assert "world 2" in torchrun.stdout
    helptext = next(p for c, p in outputs.items() if "--help" in c)
    assert "train.max_steps (an integer; default 2000)" in helptext.stdout
    samples = next(p for c, p in outputs.items() if "--start" in c)
    assert samples.stdout.startswith("ROMEO:") and samples.stdout.count("---------------") == 3
    assert (out / "full_size" / "report" / "report.md").is_file()
