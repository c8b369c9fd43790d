"""scripts/gpu_checks.sh --dry-run: the prepared GPU run lists its steps in priority order with
budgets inside 8 minutes, its carry list and commands, and every file those commands name exists."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "gpu_checks.sh"


@pytest.fixture(scope="module")
def dry_run():
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_steps_in_priority_order_within_budget(dry_run):
    steps = re.findall(r"^(\d)\s+(\w+)\s+(\d+)s\s", dry_run, re.M)
    assert [name for _, name, _ in steps] == ["setup", "tests", "linear", "kernels", "sweep"]
    total = sum(int(b) for _, _, b in steps)
    assert total <= 480 and f"sum of budgets: {total} s" in dry_run
    assert "total budget 480 s" in dry_run


def test_carry_list_and_command_line_are_stated(dry_run):
    carry = re.search(r"^carry: (.*)$", dry_run, re.M).group(1).split()
    assert carry == [".whl", "data/shakespeare_complete_char/train.bin", "data/shakespeare_complete_char/val.bin",
                     "data/shakespeare_complete_char/meta.pkl"]
    assert len(carry) <= 8  # the device tool's limit
    assert "run: bash scripts/gpu_checks.sh" in dry_run
    header = SCRIPT.read_text()
    assert 'carry=[".whl", "data/shakespeare_complete_char/train.bin"' in header  # the same list, in the header


def test_every_named_file_exists(dry_run):
    commands = [line.strip()[2:] for line in dry_run.splitlines() if line.strip().startswith("$ ")]
    assert len(commands) == 4
    named = [w for c in commands for w in shlex.split(c.replace("$XDIST", ""))
             if re.match(r"^(tests|benchmarks|configs|scripts)/", w)]
    assert any(w.startswith("benchmarks/test_bench_linear") for w in named)
    assert "scripts/full_size_sweep.sh" in named
    missing = [w for w in named if not (REPO_ROOT / w).is_file()]
    assert not missing, missing


def _collect(args):
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    return {line for line in out.stdout.splitlines() if "::" in line}


def test_gpu_test_selection_drops_only_format_parametrisations(dry_run):
    """The tests step's -k expression deselects parametrisations of non-representative formats
    (their ids name the format), never a test as a whole, and keeps E4M3, E5M2, E7M0, E0M7."""
    cmd = next(line.strip()[2:] for line in dry_run.splitlines() if "pytest" in line and "tests/" in line)
    words = shlex.split(cmd.replace("$XDIST", ""))
    files = [w for w in words if w.startswith("tests/")]
    k = words[words.index("-k") + 1]
    dropped_formats = re.findall(r"[A-Z0-9_]+", k.replace("not", ""))
    for fmt in ("E4M3", "E5M2", "E7M0", "E0M7"):
        assert fmt not in dropped_formats
    everything, selected = _collect(files), _collect([*files, "-k", k])
    dropped = everything - selected
    assert dropped and len(selected) > len(dropped) / 2
    for test_id in dropped:
        params = test_id.partition("[")[2]
        assert any(f.lower() in params.lower() for f in dropped_formats), test_id
    base = {t.partition("[")[0] for t in everything}
    assert base == {t.partition("[")[0] for t in selected}  # every test keeps at least one case


def test_unknown_step_is_refused():
    out = subprocess.run(["bash", str(SCRIPT), "bogus"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown step 'bogus'" in out.stderr
