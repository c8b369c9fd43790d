"""train.py end to end on a tiny model (CPU): role combinations, resume bit-identity,
divergence, W&B offline, DDP on gloo, user errors. Each run is a subprocess, as a user runs it."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from altgrad.checkpoint import CKPT_LAST, list_checkpoints, load_checkpoint
from altgrad.tracking import git_commit, git_diff, read_metrics

from test_tracking import wandb_history

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN = REPO_ROOT / "train.py"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

TINY = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
        "--train.device=cpu", "--train.batch_size=8", "--train.lr=3e-3", "--train.min_lr=3e-4",
        "--train.warmup=5", "--train.eval_interval=10", "--train.eval_iters=2", "--train.log_interval=1",
        "--train.checkpoint_interval=10", "--train.max_checkpoints=2", "--train.shadow_interval=10",
        "--log.wandb_mode=disabled"]
ROLE_COMBINATIONS = {
    "bf16": ["--quant=null"],
    "e5m2": ["--quant.default_format=E5M2"],
    "hybrid": ["--quant.default_format=E4M3", "--quant.grad_output_format=E5M2"],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Char-level bins of the Hamlet fixture (90/10 split), written as prepare.py does."""
    text = (FIXTURES / "hamlet_slice.txt").read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    out = tmp_path_factory.mktemp("hamlet_char")
    split = int(0.9 * len(ids))
    ids[:split].tofile(out / "train.bin")
    ids[split:].tofile(out / "val.bin")
    with open(out / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    return out


def train(out_dir, data_dir, *args, config="configs/baseline.yaml", torchrun=0, timeout=300):
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    cmd = launcher + [str(TRAIN), config, *TINY, f"--data.dir={data_dir}", f"--log.out_dir={out_dir}", *args]
    # one thread: a tiny model gains nothing from more, and on a busy 2-core machine OpenMP
    # threads spinning against other processes make steps 3-10x slower
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def losses(run_dir):
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r}


def val_losses(run_dir):
    return {r["step"]: r["val/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "val/loss" in r}


# ---- one short run per role combination ------------------------------------------------------------


@pytest.mark.parametrize("combo", list(ROLE_COMBINATIONS))
def test_short_run_learns_and_writes_its_files(tmp_path, data_dir, combo):
    wandb = ["--log.wandb_mode=offline"] if combo == "bf16" else []  # one run proves the W&B sink
    proc = ok(train(tmp_path, data_dir, "--train.max_steps=30", f"--log.run_name={combo}",
                    *ROLE_COMBINATIONS[combo], *wandb))
    run = tmp_path / combo
    # files of docs/design.md §7, checkpoints rotated to the newest two plus ckpt_last.pt
    assert {"config.yaml", "metrics.jsonl", "summary.json", CKPT_LAST} <= {p.name for p in run.iterdir()}
    assert [s for s, _ in list_checkpoints(run)] == [20, 30]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 30 and summary["diverged_step"] is None
    assert summary["versions"]["torch"] == torch.__version__ and summary["device"].startswith("cpu")
    quant = summary["config"]["quant"]
    assert quant is None if combo == "bf16" else quant["default_format"] == ("E4M3" if combo == "hybrid" else "E5M2")
    assert summary["config"]["model"]["vocab_size"] == pickle.loads((data_dir / "meta.pkl").read_bytes())["vocab_size"]
    # provenance: the commit, and with a dirty tree the diff against it beside summary.json
    commit = git_commit()
    assert summary["git_commit"] == commit
    if commit is not None and commit.endswith("-dirty"):
        assert summary["git_diff"] == "git_diff.patch" and (run / "git_diff.patch").read_text() == git_diff()
    else:
        assert summary["git_diff"] is None and not (run / "git_diff.patch").exists()

    # falling loss: training and validation
    train_loss = losses(run)
    assert sorted(train_loss) == list(range(1, 31))
    first, last = np.mean([train_loss[s] for s in range(1, 6)]), np.mean([train_loss[s] for s in range(26, 31)])
    assert last < first - 0.4, (first, last)
    val = val_losses(run)
    assert sorted(val) == [0, 10, 20, 30] and val[30] < val[0] - 0.4
    assert summary["final_val_loss"] == val[30] and summary["best_val_loss"] == min(val.values())

    records = read_metrics(run / "metrics.jsonl")
    keys = set().union(*records)
    assert {"train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/step_ms", "val/ppl",
            "shadow/grad_cos_mean", "mlp/dead_frac"} <= keys
    if combo == "bf16":
        assert not any(k.startswith("quant/") for k in keys)
        _, history, config = wandb_history(run)
        assert [h.pop("_step") for h in history] == [r["step"] for r in records]
        # the same keys, plus one chart per per-layer metric (a line per layer) in the last row
        charts = {k for k in history[-1] if k.startswith("layers/")}
        assert any(k.startswith("layers/grad/l2") for k in charts), charts
        assert [{k for k in h if not k.startswith("layers/")} for h in history] == [set(r) - {"step"} for r in records]
        assert config["train"]["max_steps"] == 30
    else:
        assert {"quant/input/overflow", "quant/grad_output/underflow", "update/bit_stall"} <= keys
        # the shadow sees the quantization: gradients close to, but not equal to, fp32
        cos = [r["shadow/grad_cos_mean"] for r in records if "shadow/grad_cos_mean" in r]
        assert cos and all(0.9 < c < 1.0 for c in cos)
    expected = {"bf16": "quant: null", "e5m2": "i:E5M2 w:E5M2 go:E5M2", "hybrid": "i:E4M3 w:E4M3 go:E5M2"}
    assert expected[combo] in proc.stdout
    assert "step     30/30 | loss" in proc.stdout and "| eta " in proc.stdout


# ---- resume ----------------------------------------------------------------------------------------


def test_resume_is_bit_identical(tmp_path, data_dir):
    # E5M2 with delayed scaling: the amax histories must travel in the checkpoint too
    common = ["--quant.default_format=E5M2", "--train.lr_decay_steps=20", "--train.shadow_interval=0"]
    ok(train(tmp_path / "straight", data_dir, *common, "--train.max_steps=20", "--log.run_name=r"))
    ok(train(tmp_path / "split", data_dir, *common, "--train.max_steps=10", "--log.run_name=r"))
    proc = ok(train(tmp_path / "split", data_dir, *common, "--train.max_steps=20", "--log.run_name=r", "--resume"))
    assert "resuming from" in proc.stdout
    a, b = tmp_path / "straight" / "r", tmp_path / "split" / "r"
    assert losses(a) == losses(b) and sorted(losses(b)) == list(range(1, 21))
    assert val_losses(a) == val_losses(b)
    steps_b = [r["step"] for r in read_metrics(b / "metrics.jsonl") if "train/loss" in r]
    assert steps_b == sorted(set(steps_b))  # the resumed run appended, nothing logged twice
    ca, cb = load_checkpoint(a / CKPT_LAST), load_checkpoint(b / CKPT_LAST)
    assert ca["step"] == cb["step"] == 20
    assert ca["model"].keys() == cb["model"].keys()
    assert any("scaler" in k for k in ca["model"])  # QuantizedLinear scaling state is in there
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key
    for i, state in ca["optimizer"]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(tensor, cb["optimizer"]["state"][i][name]), (i, name)
    assert torch.equal(ca["rng"]["torch"], cb["rng"]["torch"]) and ca["data"]["batches_drawn"] == 20
    assert json.loads((b / "summary.json").read_text())["steps"] == 20
    # resuming into another precision would silently mix two experiments: refused in one line
    proc = train(tmp_path / "split", data_dir, *common, "--train.max_steps=30", "--log.run_name=r", "--resume",
                 "--quant.default_format=E4M3")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: quant: differs from the checkpoint")


# ---- divergence ------------------------------------------------------------------------------------


def test_divergence_skips_non_finite_steps_then_stops_with_exit_code_3(tmp_path, data_dir):
    # lr 1e30: the first update is finite but huge; every later step overflows to inf/NaN
    proc = train(tmp_path, data_dir, "--train.max_steps=30", "--train.lr=1e30", "--train.min_lr=0",
                 "--train.warmup=0", "--train.nan_patience=3", "--log.run_name=div")
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("diverged: 3 consecutive non-finite steps from step")
    run = tmp_path / "div"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["skipped_steps"] == 3
    first_bad, step = summary["diverged_step"], summary["steps"]
    assert step == first_bad + 2 and 2 <= first_bad < 28
    records = {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r}
    assert all(records[s]["train/loss"] is not None for s in range(1, first_bad))
    assert [records[s]["train/loss"] for s in range(first_bad, step + 1)] == [None] * 3  # logged as skipped
    assert records[step]["train/skipped_steps"] == 3
    state = load_checkpoint(run / CKPT_LAST)  # saved at divergence; skipped steps never touched the weights
    assert state["step"] == step
    assert all(torch.isfinite(t).all() for k, t in state["model"].items() if t.is_floating_point())


def test_a_logging_step_after_skipped_steps_records_its_own_weight_stats(tmp_path, data_dir):
    """Gradient accumulation caches each step's weight cast; a skipped step must not hand its cast
    (recorded at the "scale" stats level, without counts) to the next step: every logged step has
    the weight's overflow / nan / rel_err, skipped steps before it or not."""
    proc = train(tmp_path, data_dir, "--quant.default_format=E5M2", "--train.grad_accum=2", "--train.max_steps=9",
                 "--train.lr=1e30", "--train.min_lr=0", "--train.warmup=0", "--train.nan_patience=10",
                 "--train.log_interval=3", "--train.eval_interval=100", "--train.shadow_interval=0",
                 "--log.run_name=skip")
    ok(proc)
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["skipped_steps"] >= 3  # so some logging step follows skipped ones
    logged = [r for r in read_metrics(tmp_path / "skip" / "metrics.jsonl") if "quant/weight/overflow" in r]
    assert [r["step"] for r in logged] == [3, 6, 9]
    for r in logged:
        assert all(r[f"quant/weight/{k}"] is not None for k in ("overflow", "nan", "underflow", "rel_err")), r


def test_evaluation_does_not_change_the_logged_quant_metrics(tmp_path, data_dir):
    """The quant metrics of a logging step describe that step's casts: a run that also evaluates at
    every logging step logs the same quant/* values (and trains the same) as one that never does."""
    runs = {}
    for name, interval in (("eval3", 3), ("eval100", 100)):
        ok(train(tmp_path, data_dir, "--quant.default_format=E4M3", "--train.max_steps=6", "--train.log_interval=3",
                 f"--train.eval_interval={interval}", "--train.shadow_interval=0", f"--log.run_name={name}"))
        runs[name] = {r["step"]: r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "train/loss" in r}
    assert "val/loss" in runs["eval3"][3] and "val/loss" not in runs["eval100"][3]
    for step in (3, 6):
        a, b = runs["eval3"][step], runs["eval100"][step]
        quant = sorted(k for k in a if k.startswith("quant/"))
        assert quant and quant == sorted(k for k in b if k.startswith("quant/"))
        assert [a[k] for k in quant] == [b[k] for k in quant], step
        assert a["train/loss"] == b["train/loss"]


# ---- stop ------------------------------------------------------------------------------------------


def test_sigterm_finishes_the_step_saves_and_reports_stopped(tmp_path, data_dir):
    cmd = [sys.executable, str(TRAIN), "configs/baseline.yaml", *TINY, f"--data.dir={data_dir}",
           f"--log.out_dir={tmp_path}", "--log.run_name=stop", "--train.max_steps=100000"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics = tmp_path / "stop" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(read_metrics(metrics)) > 5):  # training is under way
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "SIGTERM: stopping after this step" in err and "Traceback" not in err
    summary = json.loads((tmp_path / "stop" / "summary.json").read_text())
    assert summary["status"] == "stopped" and 5 <= summary["steps"] < 100000
    # the saved state is the state after the last logged step, so a resume continues from it
    assert load_checkpoint(tmp_path / "stop" / CKPT_LAST)["step"] == summary["steps"]
    assert max(losses(tmp_path / "stop")) == summary["steps"]


# ---- DDP -------------------------------------------------------------------------------------------


def test_torchrun_two_ranks_on_gloo_agree_on_weights(tmp_path, data_dir):
    proc = ok(train(tmp_path, data_dir, "--train.max_steps=6", "--train.grad_accum=2",
                    "--quant.default_format=E5M2", "--train.shadow_interval=0", "--log.run_name=ddp",
                    torchrun=2, timeout=600))
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert summary["ddp_ranks_agree"] is True
    assert summary["tokens_per_step"] == 8 * 32 * 2
    assert proc.stdout.count("completed at step 6") == 1  # rank 0 alone reports
    assert sorted(losses(tmp_path / "ddp")) == list(range(1, 7))
    assert not (tmp_path / ".ddp.lock").exists()  # the atexit handlers ran (train.py's end_process)


def test_torchrun_ranks_stop_together_when_a_signal_reaches_one_rank_late_in_a_step(tmp_path, data_dir):
    """A stop signal that reaches rank 0 after the step's stop vote (here: while it clips, the other
    rank already waiting in the next step's gradient all-reduce, where it cannot see a signal) must
    stop both ranks after the same step: the run is saved and reported `stopped`, nothing hangs."""
    script = tmp_path / "signal_rank0.py"
    script.write_text(
        "import os, runpy, signal, sys, torch\n"
        "if os.environ['RANK'] == '0':\n"
        "    clip, calls = torch.nn.utils.clip_grad_norm_, []\n"
        "    def clip_then_signal(*args, **kwargs):\n"
        "        calls.append(1)\n"
        "        if len(calls) == 3:\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "        return clip(*args, **kwargs)\n"
        "    torch.nn.utils.clip_grad_norm_ = clip_then_signal\n"
        f"sys.argv[0] = {str(TRAIN)!r}\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           "configs/baseline.yaml", *TINY, f"--data.dir={data_dir}", f"--log.out_dir={tmp_path}",
           "--log.run_name=ddp_stop", "--train.max_steps=50", "--train.grad_accum=2",
           "--quant.default_format=E5M2", "--train.shadow_interval=0"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert "exitcode  : 130" in proc.stderr and "SIGTERM: stopping after this step" in proc.stderr, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp_stop" / "summary.json").read_text())
    # the signal came after step 3's vote: step 4's vote stops both ranks
    assert summary["status"] == "stopped" and summary["steps"] == 4 and summary["ddp_ranks_agree"] is True
    assert load_checkpoint(tmp_path / "ddp_stop" / CKPT_LAST)["step"] == 4
    assert not (tmp_path / ".ddp_stop.lock").exists()


def test_torchrun_user_error_exits_2_with_one_line(tmp_path, data_dir):
    """An error found after the process group is up: a one-line error, exit code 2 (not an abort of
    the interpreter's shutdown), nothing written."""
    proc = train(tmp_path, data_dir, "--train.grad_accum=3", "--log.run_name=ddp_bad", torchrun=2)
    assert proc.returncode != 0
    # one line per rank (a rank the launcher stops first, once the other has failed, prints none)
    assert 1 <= proc.stderr.count("error: train.grad_accum=3 must be a multiple of the 2 DDP processes") <= 2
    assert "exitcode  : 2" in proc.stderr and "SIGABRT" not in proc.stderr
    assert not (tmp_path / "ddp_bad").exists()


# ---- user errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--train.lrr=1"], "error: train.lrr: unknown key (did you mean lr?)"),
    (["--data.dir=/nonexistent/altgrad"], "error: no data directory /nonexistent/altgrad: create it with"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, data_dir, args, message):
    proc = train(tmp_path, data_dir, *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(message) and len(proc.stderr.strip().splitlines()) == 1


def test_a_fresh_run_never_overwrites_an_earlier_one(tmp_path, data_dir):
    ok(train(tmp_path, data_dir, "--train.max_steps=10", "--log.run_name=again", "--quant=null"))
    first = (tmp_path / "again" / "metrics.jsonl").read_text()
    proc = ok(train(tmp_path, data_dir, "--train.max_steps=10", "--log.run_name=again", "--quant=null",
                    "--train.seed=7"))
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("again.")]
    assert len(kept) == 1 and "moved it to" in proc.stdout
    assert (kept[0] / "metrics.jsonl").read_text() == first and list_checkpoints(kept[0])
    assert (tmp_path / "again" / "metrics.jsonl").read_text() != first


# ---- one live run per directory ----------------------------------------------------------------------


def start(out_dir, data_dir, *args, config="configs/baseline.yaml"):
    cmd = [sys.executable, str(TRAIN), config, *TINY, f"--data.dir={data_dir}", f"--log.out_dir={out_dir}", *args]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def wait_for_steps(proc, metrics, n, timeout=120):
    deadline = time.monotonic() + timeout
    while not (metrics.is_file() and len(read_metrics(metrics)) > n):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)


def test_a_second_run_of_a_live_run_name_stops_before_touching_anything(tmp_path, data_dir):
    first = start(tmp_path, data_dir, "--log.run_name=dup", "--train.max_steps=100000",
                  "--train.checkpoint_interval=5")
    try:
        wait_for_steps(first, tmp_path / "dup" / "metrics.jsonl", 6)
        before = sorted(p.name for p in tmp_path.iterdir())
        proc = train(tmp_path, data_dir, "--log.run_name=dup", "--train.max_steps=30", "--train.seed=7")
        assert proc.returncode == 2, proc.stderr
        line = proc.stderr.strip()
        assert len(line.splitlines()) == 1 and line.startswith(f"error: {tmp_path / 'dup'} is in use by a live run")
        assert f"pid {first.pid} on host " in line
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing moved, nothing created
        assert first.poll() is None  # the first run goes on undisturbed
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 130
    summary = json.loads((tmp_path / "dup" / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["config"]["train"]["seed"] == 42
    assert load_checkpoint(tmp_path / "dup" / CKPT_LAST)["step"] == summary["steps"]
    assert not (tmp_path / ".dup.lock").exists()  # released at exit
    # once it is gone, the name is free again: a fresh run moves the stopped one aside
    ok(train(tmp_path, data_dir, "--log.run_name=dup", "--train.max_steps=2"))
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("dup.")]) == 1


def test_a_stale_lock_of_a_dead_run_is_taken_over(tmp_path, data_dir):
    # a lock file nobody holds (its run was killed): the PID and host inside are only information
    (tmp_path / ".stale.lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": "gone-host"}))
    proc = ok(train(tmp_path, data_dir, "--log.run_name=stale", "--train.max_steps=2"))
    assert f"took over the stale lock of pid {2**22 + 12345} on host gone-host" in proc.stdout


# ---- crashes are recorded ----------------------------------------------------------------------------

CRASH_AT_SAVE = """
import errno, runpy, sys
import altgrad.checkpoint as ckpt
def disk_full(state, path):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))
ckpt.save_checkpoint = disk_full
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_crash_records_failed_with_its_reason_and_exits_1(tmp_path, data_dir):
    cmd = [sys.executable, "-c", CRASH_AT_SAVE, str(TRAIN), "configs/baseline.yaml", *TINY,
           f"--data.dir={data_dir}", f"--log.out_dir={tmp_path}", "--log.run_name=crash", "--train.max_steps=30"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr  # a crash is a bug or an environment failure: keep the trace
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("failed at step 10: OSError: [Errno 28] No space left on device"), last
    summary = json.loads((tmp_path / "crash" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 10
    assert summary["error"].startswith("OSError: [Errno 28] No space left on device")
    assert not (tmp_path / ".crash.lock").exists()


# ---- resume after damage -----------------------------------------------------------------------------


def test_resume_falls_back_past_a_damaged_checkpoint_and_cleans_partial_files(tmp_path, data_dir):
    common = ["--train.lr_decay_steps=30", "--train.shadow_interval=0"]
    ok(train(tmp_path / "straight", data_dir, *common, "--train.max_steps=30", "--log.run_name=r"))
    ok(train(tmp_path / "split", data_dir, *common, "--train.max_steps=20", "--log.run_name=r"))
    run = tmp_path / "split" / "r"
    assert [s for s, _ in list_checkpoints(run)] == [10, 20]
    # ckpt_last.pt is a hard link to ckpt_0000020.pt: one truncation ruins both names
    data = (run / CKPT_LAST).read_bytes()
    (run / CKPT_LAST).write_bytes(data[: len(data) // 3])
    partial = run / ".ckpt_0000030.pt.k3j9x_q1.tmp"  # what a write killed mid-way leaves
    partial.write_bytes(b"\0" * 100)
    proc = ok(train(tmp_path / "split", data_dir, *common, "--train.max_steps=30", "--log.run_name=r", "--resume"))
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "ckpt_last.pt: cannot be loaded" in warnings[0], proc.stderr
    assert f"resuming from {run / 'ckpt_0000010.pt'} at step 10" in proc.stdout
    assert "removed 1 partial file(s)" in proc.stdout and not partial.exists()
    straight = tmp_path / "straight" / "r"
    assert losses(run) == losses(straight)
    a, b = load_checkpoint(straight / CKPT_LAST), load_checkpoint(run / CKPT_LAST)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_resume_with_no_readable_checkpoint_is_one_line(tmp_path, data_dir):
    ok(train(tmp_path, data_dir, "--train.max_steps=10", "--log.run_name=bad"))
    for p in (tmp_path / "bad").glob("ckpt_*.pt"):
        p.write_bytes(b"garbage")
    proc = train(tmp_path, data_dir, "--train.max_steps=20", "--log.run_name=bad", "--resume")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: no readable checkpoint in {tmp_path / 'bad'}")


# ---- bad input: one line, exit 2, before any run directory is created or moved ------------------------


def _bad_data(data_dir, tmp_path, how):
    bad = tmp_path / "data"
    bad.mkdir()
    for p in data_dir.iterdir():
        (bad / p.name).write_bytes(p.read_bytes())
    if how == "odd":
        (bad / "train.bin").write_bytes((bad / "train.bin").read_bytes()[:-1])
    elif how == "empty":
        (bad / "train.bin").write_bytes(b"")
        (bad / "val.bin").write_bytes(b"")
    elif how == "no val":
        (bad / "val.bin").unlink()
    elif how == "garbage meta":
        (bad / "meta.pkl").write_bytes(b"not a pickle")
    elif how == "no meta":
        (bad / "meta.pkl").unlink()
    return bad


BAD_INPUTS = {
    # name: (extra args, data damage, expected start of the one stderr line)
    "block_size over the val split": (["--model.block_size=VAL_TOKENS"], None,
                                      "error: {data}/val.bin holds {val} tokens; model.block_size={val} needs"),
    "odd train.bin": ([], "odd", "error: {data}/train.bin: "),
    "empty bins": ([], "empty", "error: {data}/train.bin holds 0 tokens"),
    "missing val.bin": ([], "no val", "error: no {data}/val.bin: create it with"),
    "garbage meta.pkl": ([], "garbage meta", "error: {data}/meta.pkl: not a readable meta.pkl"),
    "missing meta.pkl": ([], "no meta", "error: {data} has no meta.pkl, so the vocabulary size is unknown"),
    "vocab below the token ids": (["--model.vocab_size=5"], None, "error: {data}/train.bin holds token id"),
    "seed out of range": (["--train.seed=4294967296"], None, "error: train.seed: must be in [0, 2**32)"),
    "run_name .": (["--log.run_name=."], None, "error: log.run_name: must be a directory name"),
    "run_name ..": (["--log.run_name=.."], None, "error: log.run_name: must be a directory name"),
    "run_name with /": (["--log.run_name=victim/x"], None, "error: log.run_name: must be a directory name"),
    "nothing quantized": (["--quant.default_format=E5M2", "--quant.layer_rules=[{pattern: ., format: null}]"], None,
                          "error: quant: this config quantizes none of the model's Linear layers"),
    "skip_patterns": (["--quant.default_format=E5M2", "--quant.skip_patterns=[lm_head]"], None,
                      "error: quant.skip_patterns: not a key; keep a layer in high precision with a rule"),
    "bf16 as a format": (["--quant.default_format=bf16"], None,
                         "error: quant.default_format: 'bf16' is not a format; write null"),
    "resume with another seed": (["--resume", "--train.seed=7"], None,
                                 "error: train.seed=7 differs from the checkpoint's {run}/ckpt_last.pt seed 42"),
    "not UTF-8": (["CONFIG:latin1"], None, "error: {config}: not UTF-8 text"),
    "duplicated key": (["CONFIG:dup"], None, "error: {config}: line 3: key 'max_steps' is given twice"),
}


@pytest.fixture(scope="module")
def victim(tmp_path_factory, data_dir):
    """An earlier finished run that no bad invocation may move or change."""
    out = tmp_path_factory.mktemp("out")
    ok(train(out, data_dir, "--train.max_steps=10", "--log.run_name=victim"))
    return out


def _snapshot(out):
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_before_any_directory_changes(tmp_path, data_dir, victim, case):
    args, damage, message = BAD_INPUTS[case]
    data = _bad_data(data_dir, tmp_path, damage) if damage else data_dir
    config = "configs/baseline.yaml"
    if args and args[0].startswith("CONFIG:"):
        config = tmp_path / "bad.yaml"
        if args[0] == "CONFIG:latin1":
            config.write_bytes("log: {run_name: caf\xe9}\n".encode("latin-1"))
        else:
            config.write_text("train:\n  max_steps: 5\n  max_steps: 7\n")
        args = []
    val_tokens = (data_dir / "val.bin").stat().st_size // 2
    args = [a.replace("VAL_TOKENS", str(val_tokens)) for a in args]
    before = _snapshot(victim)
    proc = train(victim, data, "--log.run_name=victim", *args, config=str(config))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(message.format(data=data, run=victim / "victim", config=config, val=val_tokens)), lines[0]
    assert _snapshot(victim) == before  # nothing created, moved or rewritten


def test_a_layer_rule_that_matches_nothing_is_a_loud_warning(tmp_path, data_dir):
    proc = ok(train(tmp_path, data_dir, "--train.max_steps=2", "--log.run_name=rules", "--quant.default_format=E5M2",
                    "--quant.layer_rules=[{pattern: 'mlp\\.c_fcc', format: E4M3}]"))
    assert "warning: quant.layer_rules[0] pattern 'mlp\\\\.c_fcc' matches no Linear layer" in proc.stderr


# ---- stochastic rounding: its stream travels in the checkpoint, evaluation stays out of it -------------

SR = ["--quant.default_format=E5M2", "--quant.rounding=stochastic", "--train.shadow_interval=0",
      "--train.lr_decay_steps=20"]


def _same_weights(a, b):
    ca, cb = load_checkpoint(a / CKPT_LAST), load_checkpoint(b / CKPT_LAST)
    assert ca["model"].keys() == cb["model"].keys()
    for key in ca["model"]:
        assert torch.equal(ca["model"][key], cb["model"][key]), key


def test_stochastic_rounding_resumes_bit_for_bit(tmp_path, data_dir):
    ok(train(tmp_path / "straight", data_dir, *SR, "--train.max_steps=20", "--log.run_name=sr"))
    ok(train(tmp_path / "split", data_dir, *SR, "--train.max_steps=10", "--log.run_name=sr"))
    ok(train(tmp_path / "split", data_dir, *SR, "--train.max_steps=20", "--log.run_name=sr", "--resume"))
    a, b = tmp_path / "straight" / "sr", tmp_path / "split" / "sr"
    assert losses(a) == losses(b) and sorted(losses(a)) == list(range(1, 21))
    assert val_losses(a) == val_losses(b)
    _same_weights(a, b)


def test_evaluating_more_often_does_not_change_training(tmp_path, data_dir):
    ok(train(tmp_path / "often", data_dir, *SR, "--train.max_steps=20", "--train.eval_interval=3",
             "--log.run_name=ev"))
    ok(train(tmp_path / "rarely", data_dir, *SR, "--train.max_steps=20", "--train.eval_interval=20",
             "--log.run_name=ev"))
    a, b = tmp_path / "often" / "ev", tmp_path / "rarely" / "ev"
    assert sorted(val_losses(a)) == [0, 3, 6, 9, 12, 15, 18, 20] and sorted(val_losses(b)) == [0, 20]
    assert losses(a) == losses(b) and val_losses(a)[20] == val_losses(b)[20]
    _same_weights(a, b)


# ---- smaller things a user sees -------------------------------------------------------------------------


def test_resuming_a_finished_run_keeps_its_final_losses(tmp_path, data_dir):
    ok(train(tmp_path, data_dir, "--train.max_steps=10", "--log.run_name=done"))
    before = json.loads((tmp_path / "done" / "summary.json").read_text())
    assert isinstance(before["final_train_loss"], float) and before["final_val_step"] == 10
    proc = ok(train(tmp_path, data_dir, "--train.max_steps=10", "--log.run_name=done", "--resume"))
    after = json.loads((tmp_path / "done" / "summary.json").read_text())
    for key in ("final_train_loss", "final_val_loss", "final_val_step", "best_val_loss", "steps", "status"):
        assert after[key] == before[key], key
    assert f"completed at step 10 in " in proc.stdout and "@ step 10 (best" in proc.stdout


def test_a_stopped_runs_last_line_says_which_step_its_val_loss_is_from(tmp_path, data_dir):
    proc = start(tmp_path, data_dir, "--log.run_name=stop2", "--train.max_steps=100000", "--train.eval_interval=4")
    wait_for_steps(proc, tmp_path / "stop2" / "metrics.jsonl", 6)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    summary = json.loads((tmp_path / "stop2" / "summary.json").read_text())
    last = out.strip().splitlines()[-1]
    val_step = summary["final_val_step"]
    assert val_step % 4 == 0 and val_step <= summary["steps"]
    assert last.startswith(f"stopped at step {summary['steps']} in ")
    assert f"val loss {summary['final_val_loss']:.4f} @ step {val_step} (best" in last


def test_summary_says_what_the_unsimulated_matmuls_ran_in(tmp_path, data_dir):
    proc = ok(train(tmp_path, data_dir, "--train.max_steps=2", "--log.run_name=prec"))
    summary = json.loads((tmp_path / "prec" / "summary.json").read_text())
    assert summary["dtype"] == "fp32" and summary["high_precision_matmul"] == "fp32"
    assert "high-precision matmuls fp32" in proc.stdout


def test_resume_without_a_checkpoint_keeps_the_earlier_runs_files(tmp_path, data_dir):
    # checkpoint_interval=0 and killed before the final save: metrics but no checkpoint
    ok(train(tmp_path, data_dir, "--train.max_steps=4", "--log.run_name=nock", "--train.checkpoint_interval=0"))
    (tmp_path / "nock" / CKPT_LAST).unlink()
    first = (tmp_path / "nock" / "metrics.jsonl").read_text()
    proc = ok(train(tmp_path, data_dir, "--train.max_steps=4", "--log.run_name=nock", "--resume"))
    assert "no checkpoint in" in proc.stdout and "moved it to" in proc.stdout
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("nock.")]
    assert len(kept) == 1 and (kept[0] / "metrics.jsonl").read_text() == first


def test_git_diff_holds_the_uncommitted_changes(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "empty")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "a.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "a")
    assert git_diff(tmp_path) == "" and not git_commit(tmp_path).endswith("-dirty")
    (tmp_path / "a.py").write_text("x = 2\n")
    diff = git_diff(tmp_path)
    assert git_commit(tmp_path).endswith("-dirty") and "-x = 1\n+x = 2\n" in diff
    subprocess.run(["git", "apply", "-R"], cwd=tmp_path, input=diff, text=True, check=True)
    assert (tmp_path / "a.py").read_text() == "x = 1\n"
    assert git_diff(tmp_path / "missing") is None
