"""sample.py: text from a trained (quantized) run, and --eval equal to train.py's logged val loss."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import TINY, data_dir, ok, train  # noqa: F401 (data_dir is a fixture)

REPO_ROOT = Path(__file__).resolve().parent.parent


def sample(*args):
    return subprocess.run([sys.executable, str(REPO_ROOT / "sample.py"), *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):  # noqa: F811
    out = tmp_path_factory.mktemp("out")
    ok(train(out, data_dir, "--train.max_steps=10", "--log.run_name=q", "--quant.default_format=E5M2",
             "--train.shadow_interval=0"))
    return out / "q"


def test_eval_equals_the_val_loss_train_py_logged(run, data_dir):  # noqa: F811
    summary = json.loads((run / "summary.json").read_text())
    proc = ok(sample(f"--out_dir={run}", "--eval", f"--data_dir={data_dir}"))
    assert proc.stdout.startswith(f"val loss {summary['final_val_loss']:.4f} ({summary['final_val_loss']!r}) over 2 ")
    assert "(step 10)" in proc.stdout
    # another split and batch count are another number
    other = ok(sample(str(run), "--eval", "--split=train", "--eval_iters=3", f"--data_dir={data_dir}"))
    assert other.stdout.startswith("train loss ") and "over 3 batches" in other.stdout


def test_samples_start_with_the_prompt_and_repeat_with_the_seed(run, data_dir):  # noqa: F811
    args = [f"--out_dir={run}", f"--data_dir={data_dir}", "--start=HAMLET", "--num_samples=2", "--max_new_tokens=25",
            "--temperature=0.9", "--top_k=5"]
    a, b = ok(sample(*args, "--seed=1")), ok(sample(*args, "--seed=1"))
    c = ok(sample(*args, "--seed=2"))
    samples = a.stdout.split("---------------\n")[:-1]
    assert len(samples) == 2 and all(s.startswith("HAMLET") and len(s.rstrip("\n")) == 6 + 25 for s in samples)
    assert a.stdout == b.stdout and a.stdout != c.stdout


def test_prompt_from_a_file(run, data_dir, tmp_path):  # noqa: F811
    prompt = tmp_path / "p.txt"
    prompt.write_text("To be", encoding="utf-8")
    proc = ok(sample(f"--out_dir={run}", f"--data_dir={data_dir}", f"--start=FILE:{prompt}", "--num_samples=1",
                     "--max_new_tokens=3"))
    assert proc.stdout.startswith("To be") and proc.stdout.count("---------------") == 1


@pytest.mark.parametrize("args, message", [
    (["--out_dir=/nonexistent/run"], "error: /nonexistent/run: no such checkpoint"),
    (["--start=\u2603"], "error: --start has characters outside the run's vocabulary"),
    (["--temperature=0"], "error: --temperature must be > 0"),
    ([], "error: name the run"),
])
def test_bad_input_is_one_line(run, data_dir, args, message):  # noqa: F811
    base = [] if not args or args[0].startswith("--out_dir") or not args else [f"--out_dir={run}", f"--data_dir={data_dir}"]
    proc = sample(*base, *args)
    assert proc.returncode == 2 and proc.stderr.strip().startswith(message), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
