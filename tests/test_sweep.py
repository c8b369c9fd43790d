"""altgrad.sweep: the run plan, exit-code handling and the report at the end.

The real train.py chain (two tiny runs + report) is in tests/test_report.py; here a small stand-in
script plays train.py's command-line contract (writes the run files, exits 0 / 3 / other) so the
sweep's own logic is tested in a second.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from altgrad import sweep

STAND_IN = textwrap.dedent("""
    import json, os, signal, sys, time, pathlib, yaml
    cfg = yaml.safe_load(open(sys.argv[1]))
    tags = dict(t.split("=", 1) for t in cfg["log"]["tags"])
    opts = dict(a[2:].split("=", 1) for a in sys.argv[2:])
    run = pathlib.Path(opts["log.out_dir"]) / opts["log.run_name"]
    run.mkdir(parents=True, exist_ok=True)
    (run / "argv.json").write_text(json.dumps(sys.argv[1:]))
    (run / "env.json").write_text(json.dumps({"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}))
    outcome = tags["outcome"]
    if outcome == "crash":
        sys.exit(1)
    seed = int(opts["train.seed"])
    loss = float(tags["loss"]) + 0.01 * (seed - 42)
    signals = []
    if outcome == "slow":  # plays train.py's Ctrl-C contract: finish the step, save, exit 130
        signal.signal(signal.SIGINT, lambda *a: signals.append(time.time()))
        (run / "started").write_text("")
        deadline = time.time() + 60
        while not signals and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the step and the save take a while: the sweep must wait
        (run / "saved").write_text(str(len(signals)))
    with open(run / "metrics.jsonl", "w") as f:
        for step in (0, 10):
            f.write(json.dumps({"step": step, "val/loss": loss + (10 - step) / 10}) + "\\n")
    diverged = outcome == "diverged"
    status = "diverged" if diverged else "stopped" if signals else "completed"
    (run / "summary.json").write_text(json.dumps({
        "run_name": opts["log.run_name"], "status": status,
        "diverged_step": 10 if diverged else None, "final_val_loss": None if diverged else loss,
        "config": {"train": {"seed": seed}, "quant": cfg.get("quant")}}))
    print("line one of", opts["log.run_name"]); print("line two of", opts["log.run_name"])
    sys.exit(3 if diverged else 130 if signals else 0)
""")


def _config(tmp_path, name, data, *, outcome, loss=2.0, quant=None, seed=None):
    body = {"train": {"seed": seed} if seed is not None else {}, "quant": quant,
            "data": {"dir": str(data)}, "log": {"tags": [f"outcome={outcome}", f"loss={loss}"]}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


@pytest.fixture
def setup(tmp_path, fixture_text, prepare_module):
    script = tmp_path / "train_stand_in.py"
    script.write_text(STAND_IN)
    data = tmp_path / "data"
    prepare_module.prepare(fixture_text, data)
    configs = {
        "bf16": _config(tmp_path, "bf16", data, outcome="completed", loss=2.0, seed=7),
        "e5m2": _config(tmp_path, "e5m2", data, outcome="completed", loss=2.005, quant={"default_format": "E5M2"}),
        "e7m0": _config(tmp_path, "e7m0", data, outcome="diverged", loss=9.0, quant={"default_format": "E7M0"}),
        "broken": _config(tmp_path, "broken", data, outcome="crash"),
        "slow": _config(tmp_path, "slow", data, outcome="slow", loss=2.1, quant={"default_format": "E4M3"}),
    }
    return tmp_path, script, configs


def test_plan_commands_names_and_order(setup):
    tmp_path, script, cfg = setup
    runs = sweep.plan([cfg["bf16"], cfg["e5m2"]], seeds=[42, 43], sets=["train.max_steps=5", "--log.wandb_mode=disabled"],
                      out_root=tmp_path / "out", train_script=script, python="py")
    assert [r.run_name for r in runs] == ["bf16_s42", "bf16_s43", "e5m2_s42", "e5m2_s43"]
    assert runs[1].cmd == ("py", str(script), str(cfg["bf16"]), "--train.seed=43", "--log.run_name=bf16_s43",
                           f"--log.out_dir={tmp_path / 'out'}", "--train.max_steps=5", "--log.wandb_mode=disabled")
    assert runs[3].run_dir == tmp_path / "out" / "e5m2_s43"
    # without --seeds each config keeps its own seed (42 when the config has none)
    assert [r.seed for r in sweep.plan([cfg["bf16"], cfg["e5m2"]], train_script=script)] == [7, 42]


def test_plan_layers_base_configs_under_every_config(setup, tmp_path):
    _, script, cfg = setup
    base = tmp_path / "small.yaml"
    base.write_text("train: {seed: 5, max_steps: 3}\nmodel: {n_layer: 1}\n")
    runs = sweep.plan([cfg["bf16"], cfg["e5m2"]], bases=[base], out_root=tmp_path / "o", train_script=script,
                      python="py")
    assert runs[1].cmd[:4] == ("py", str(script), str(base), str(cfg["e5m2"]))
    assert [r.seed for r in runs] == [7, 5]  # bf16 sets its own seed over the base's; e5m2 has none
    sweep.validate(runs)  # the layered config is what validate checks
    assert runs[1].config_files == [base, cfg["e5m2"]]
    with pytest.raises(sweep.SweepError, match="--base .*does not exist"):
        sweep.plan([cfg["bf16"]], bases=[tmp_path / "nope.yaml"], train_script=script)


@pytest.mark.parametrize("kwargs, message", [
    ({"sets": ["train.max_steps"]}, "overrides are written --section.key=value"),
    ({"sets": ["max_steps=5"]}, "overrides are written --section.key=value"),
    ({"sets": ["train.seed=3"]}, "set by the sweep"),
    ({"sets": ["--log.out_dir=x"]}, "set by the sweep"),
    ({"seeds": []}, "--seeds must be"),
    ({"seeds": [-1]}, "--seeds must be"),
    ({"seeds": [2**32]}, "--seeds must be"),
])
def test_plan_rejects_bad_input(setup, kwargs, message):
    _, script, cfg = setup
    with pytest.raises(sweep.SweepError, match=message):
        sweep.plan([cfg["bf16"]], train_script=script, **kwargs)


def test_plan_rejects_missing_config_and_name_clash(setup, tmp_path):
    _, script, cfg = setup
    with pytest.raises(sweep.SweepError, match="does not exist"):
        sweep.plan([tmp_path / "nope.yaml"], train_script=script)
    with pytest.raises(sweep.SweepError, match="both be named 'bf16_s1'"):
        sweep.plan([cfg["bf16"], cfg["bf16"]], seeds=[1], train_script=script)


def test_sweep_runs_reports_and_treats_divergence_as_a_result(setup, capsys):
    tmp_path, script, cfg = setup
    out = tmp_path / "out"
    argv = [str(cfg["bf16"]), str(cfg["e5m2"]), str(cfg["e7m0"]), "--seeds", "42", "43",
            "--train.max_steps=5", "--out-root", str(out), "--train-script", str(script)]
    assert sweep.main(argv) == 0
    printed = capsys.readouterr().out
    assert "e7m0_s42: diverged" in printed
    # train.py received the seed, name, out dir and the --set override
    assert json.loads((out / "e5m2_s43" / "argv.json").read_text())[1:] == [
        "--train.seed=43", "--log.run_name=e5m2_s43", f"--log.out_dir={out}", "--train.max_steps=5"]
    table = {line.split()[0]: line for line in printed.splitlines() if line.startswith(("bf16_", "e5m2_", "e7m0_"))}
    assert set(table) == {"bf16_s42", "bf16_s43", "e5m2_s42", "e5m2_s43", "e7m0_s42", "e7m0_s43"}
    assert table["e5m2_s43"].rstrip().endswith("PASS") and table["e7m0_s42"].rstrip().endswith("DIVERGED")
    assert "bf16 (baseline): final val loss 2.0050 ± 0.0071 over 2 seeds" in printed
    assert (out / "report" / "report.md").is_file() and (out / "report" / "loss.png").is_file()


def test_failed_run_makes_the_sweep_fail_after_reporting_the_others(setup, capsys):
    tmp_path, script, cfg = setup
    out = tmp_path / "out"
    code = sweep.main([str(cfg["bf16"]), str(cfg["broken"]), "--out-root", str(out), "--train-script", str(script),
                       "--report-out", str(tmp_path / "rep")])
    assert code == 1
    captured = capsys.readouterr()
    assert "broken_s42: failed (exit 1)" in captured.err
    assert (tmp_path / "rep" / "report.md").is_file()


def test_dry_run_and_cli_error(setup, capsys):
    tmp_path, script, cfg = setup
    assert sweep.main([str(cfg["bf16"]), "--dry-run", "--train-script", str(script)]) == 0
    assert capsys.readouterr().out.strip() == " ".join(
        [sys.executable, str(script), str(cfg["bf16"]), "--train.seed=7", "--log.run_name=bf16_s7",
         "--log.out_dir=out"])
    assert sweep.main([str(cfg["bf16"]), "--set", "oops"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sweep: 'oops': overrides are written --section.key=value") and "\n" not in err


# ---- everything is checked before the first run -------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--train.max_steps=abc"], "bf16_s7 ({bf16}): train.max_steps: expected an integer, got 'abc'"),
    (["--set", "train.max_steps=abc"], "bf16_s7 ({bf16}): train.max_steps: expected an integer, got 'abc'"),
    (["--train.lrr=1"], "train.lrr: unknown key (did you mean lr?)"),
    (["--model.block_size=100000"], "block_size=100000 needs at least 100001"),
    (["--jobs", "0"], "--jobs must be >= 1"),
])
def test_every_config_and_override_is_checked_before_anything_runs(setup, capsys, extra, message):
    tmp_path, script, cfg = setup
    out = tmp_path / "out"
    for dry in ([], ["--dry-run"]):
        code = sweep.main([str(cfg["bf16"]), str(cfg["e5m2"]), "--out-root", str(out), "--train-script", str(script),
                           *extra, *dry])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert message.format(bf16=cfg["bf16"]) in err, err
        assert not out.exists()  # nothing ran


def test_a_broken_later_config_stops_the_sweep_before_the_first_run(setup, capsys):
    tmp_path, script, cfg = setup
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {max_steps: 5, max_steps: 6}\n")
    out = tmp_path / "out"
    assert sweep.main([str(cfg["bf16"]), str(bad), "--out-root", str(out), "--train-script", str(script)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"sweep: {bad}: line 1: key 'max_steps' is given twice") and not out.exists()


# ---- --jobs: N at once, whole lines, per-run logs -----------------------------------------------------


def test_jobs_run_at_once_with_whole_prefixed_lines_and_logs(setup, capsys):
    tmp_path, script, cfg = setup
    out = tmp_path / "out"
    code = sweep.main([str(cfg["bf16"]), str(cfg["e5m2"]), str(cfg["e7m0"]), "--seeds", "42", "43", "--jobs", "3",
                       "--out-root", str(out), "--train-script", str(script)])
    assert code == 0
    printed = capsys.readouterr().out
    names = [f"{c}_s{s}" for c in ("bf16", "e5m2", "e7m0") for s in (42, 43)]
    for name in names:
        assert f"[{name}] line one of {name}\n[" in printed or f"[{name}] line one of {name}\n" in printed
        assert (out / f"{name}.log").read_text() == f"line one of {name}\nline two of {name}\n"
        env = json.loads((out / name / "env.json").read_text())
        assert env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 3))
    # the rest is the report: its run table and, with seeds, its table by config
    assert all(line.startswith(("[", "compared", "run ", "---", "baseline:", "seed spread", "report:", "by config",
                                "config ")) or not line.strip()
               or line.split()[0] in names + ["bf16", "e5m2", "e7m0"] for line in printed.splitlines())


# ---- Ctrl-C: forwarded once, the runs save, the sweep reports and exits 130 ----------------------------


REPO = Path(__file__).resolve().parent.parent


def tiny_real_runs(tmp_path, fixture_text, prepare_module, max_steps: int) -> tuple[Path, list[str]]:
    """(out root, overrides) for real train.py runs of a 1-layer model on the prepared fixture corpus."""
    data = tmp_path / "data"
    prepare_module.prepare(fixture_text, data)
    return tmp_path / "out", ["--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
                              "--train.batch_size=4", f"--train.max_steps={max_steps}", f"--data.dir={data}"]


def _wait(predicate, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_ctrl_c_is_forwarded_once_waits_for_the_saves_and_reports(setup):
    tmp_path, script, cfg = setup
    out = tmp_path / "out"
    # bf16_s1..s3 finish at once, then slow_s1 and slow_s2 run; slow_s3 must never start
    cmd = [sys.executable, "-m", "altgrad.sweep", str(cfg["bf16"]), str(cfg["slow"]), "--seeds", "1", "2", "3",
           "--jobs", "2", "--out-root", str(out), "--train-script", str(script)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: (out / "slow_s1" / "started").exists() and (out / "slow_s2" / "started").exists())
    proc.send_signal(signal.SIGINT)  # what Ctrl-C does: the sweep alone, its runs are in their own sessions
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    for name in ("slow_s1", "slow_s2"):
        assert (out / name / "saved").read_text() == "1"  # one SIGINT each, and it waited for the save
        assert json.loads((out / name / "summary.json").read_text())["status"] == "stopped"
    assert "asked 2 running run(s) to save and stop; 1 not started" in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("sweep: interrupted; finished: ") and "slow_s1 stopped" in last and "bf16_s1 completed" in last
    assert last.endswith("; 1 run(s) not started") and not (out / "slow_s3").exists()
    assert (out / "report" / "report.md").is_file() and "compared at step" in stdout


@pytest.mark.slow
def test_ctrl_c_during_a_real_run_leaves_it_saved_and_resumable(tmp_path, fixture_text, prepare_module):
    from altgrad.checkpoint import CKPT_LAST, load_checkpoint
    from altgrad.tracking import read_metrics

    out, tiny = tiny_real_runs(tmp_path, fixture_text, prepare_module, max_steps=100000)
    tiny += ["--train.device=cpu", "--train.eval_interval=50", "--train.eval_iters=2", "--train.log_interval=1",
             "--log.wandb_mode=disabled"]
    cmd = [sys.executable, "-m", "altgrad.sweep", str(REPO / "configs" / "baseline.yaml"), *tiny,
           "--out-root", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics = out / "baseline_s42" / "metrics.jsonl"
    _wait(lambda: metrics.is_file() and len(read_metrics(metrics)) > 5, timeout=120)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    run = out / "baseline_s42"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["steps"] > 5
    assert load_checkpoint(run / CKPT_LAST)["step"] == summary["steps"]
    assert "SIGINT: stopping after this step" in stderr  # train.py got exactly one signal: it saved
    assert "baseline_s42 stopped" in stderr.strip().splitlines()[-1]
    assert (out / "report" / "report.md").is_file() and "compared at step" in stdout


@pytest.mark.slow
def test_the_full_size_set_runs_end_to_end_at_tiny_size(tmp_path, fixture_text, prepare_module):
    """scripts/full_size_sweep.sh as written, shrunk by overrides: 9 real runs, 3 at a time, one report."""
    out, tiny = tiny_real_runs(tmp_path, fixture_text, prepare_module, max_steps=4)
    tiny += ["--train.device=cpu", "--train.warmup=1", "--train.eval_interval=2", "--train.eval_iters=1",
             "--train.shadow_interval=2"]
    proc = subprocess.run([str(REPO / "scripts" / "full_size_sweep.sh"), *tiny], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHON=sys.executable, OUT=str(out), JOBS="3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = ["baseline", "e5m2_fp8", "e4m3_e5m2_hybrid", "e3m4", "e2m5", "e1m6", "e6m1", "e7m0", "e0m7"]
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.split()
            and line.split()[0] in [f"{n}_s42" for n in names]}
    assert list(rows) == [f"{n}_s42" for n in names]
    fmt = {name: row[2] for name, row in rows.items()}
    assert fmt["e5m2_fp8_s42"] == "E5M2" and fmt["e0m7_s42"] == "E0M7" and fmt["baseline_s42"] == "FP32"
    assert rows["e4m3_e5m2_hybrid_s42"][2:5] == ["i:E4M3", "w:E4M3", "go:E5M2"]
    for n in names:
        summary = json.loads((out / f"{n}_s42" / "summary.json").read_text())
        assert summary["status"] in ("completed", "diverged") and summary["config"]["train"]["max_steps"] == 4
        assert summary["config"]["model"]["n_embd"] == 32 and summary["config"]["log"]["wandb_mode"] == "disabled"
    assert "compared at step 4:" in proc.stdout and (out / "report" / "report.md").is_file()


@pytest.mark.slow
def test_the_granularity_sweep_runs_end_to_end_at_tiny_size(tmp_path, fixture_text, prepare_module):
    """scripts/granularity_sweep.sh as written, shrunk by overrides and one seed: 16 real runs, one report
    whose format column names each run's granularity."""
    out, tiny = tiny_real_runs(tmp_path, fixture_text, prepare_module, max_steps=2)
    tiny += ["--train.warmup=1", "--train.eval_interval=2", "--train.eval_iters=1", "--train.shadow_interval=2",
             "--seeds", "42"]
    proc = subprocess.run([str(REPO / "scripts" / "granularity_sweep.sh"), *tiny], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, PYTHON=sys.executable, OUT=str(out), JOBS="3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    fmt = {line.split()[0]: " ".join(line.split()[2:5]) for line in proc.stdout.splitlines()
           if line.split() and line.split()[0].endswith("_s42") and line.split()[1] == "completed"}
    assert len(fmt) == 16 and fmt["baseline_s42"].startswith("FP32")
    assert fmt["e2m5_tensor_s42"].split()[:2] == ["E2M5", "scaling:current"]  # then the loss: no granularity tag
    float(fmt["e2m5_tensor_s42"].split()[2])
    assert fmt["e0m7_row_s42"] == "E0M7 scaling:current row" and fmt["e4m3_block32_s42"] == "E4M3 scaling:current block32"
    cfg = json.loads((out / "e3m4_block32_s42" / "summary.json").read_text())["config"]
    assert cfg["model"]["n_embd"] == 32 and cfg["train"]["lr"] == 2e-3  # cpu_quick's lr under the tiny overrides
    assert cfg["quant"]["granularity"] == "block" and cfg["quant"]["scaling"] == "current"
