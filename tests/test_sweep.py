"""altgrad.sweep: the run plan, exit-code handling and the report at the end.

The real train.py chain (two tiny runs + report) is in tests/test_report.py; here a small stand-in
script plays train.py's command-line contract (writes the run files, exits 0 / 3 / other) so the
sweep's own logic is tested in a second.
"""

import json
import sys
import textwrap

import pytest

from altgrad import sweep

STAND_IN = textwrap.dedent("""
    import json, sys, pathlib, yaml
    cfg = yaml.safe_load(open(sys.argv[1]))
    opts = dict(a[2:].split("=", 1) for a in sys.argv[2:])
    run = pathlib.Path(opts["log.out_dir"]) / opts["log.run_name"]
    run.mkdir(parents=True, exist_ok=True)
    (run / "argv.json").write_text(json.dumps(sys.argv[1:]))
    outcome = cfg["outcome"]
    if outcome == "crash":
        sys.exit(1)
    seed = int(opts["train.seed"])
    loss = cfg["loss"] + 0.01 * (seed - 42)
    with open(run / "metrics.jsonl", "w") as f:
        for step in (0, 10):
            f.write(json.dumps({"step": step, "val/loss": loss + (10 - step) / 10}) + "\\n")
    diverged = outcome == "diverged"
    (run / "summary.json").write_text(json.dumps({
        "run_name": opts["log.run_name"], "status": "diverged" if diverged else "completed",
        "diverged_step": 10 if diverged else None, "final_val_loss": None if diverged else loss,
        "config": {"train": {"seed": seed}, "quant": cfg.get("quant")}}))
    sys.exit(3 if diverged else 0)
""")


@pytest.fixture
def setup(tmp_path):
    script = tmp_path / "train_stand_in.py"
    script.write_text(STAND_IN)
    configs = {}
    for name, body in {
        "bf16": {"outcome": "completed", "loss": 2.0, "train": {"seed": 7}},
        "e5m2": {"outcome": "completed", "loss": 2.05, "quant": {"default_format": "E5M2"}},
        "e7m0": {"outcome": "diverged", "loss": 9.0, "quant": {"default_format": "E7M0"}},
        "broken": {"outcome": "crash", "loss": 0.0},
    }.items():
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(json.dumps(body))  # JSON is YAML
    return tmp_path, script, configs


def test_plan_commands_names_and_order(setup):
    tmp_path, script, cfg = setup
    runs = sweep.plan([cfg["bf16"], cfg["e5m2"]], seeds=[42, 43], sets=["train.max_steps=5", "log.wandb_mode=disabled"],
                      out_root=tmp_path / "out", train_script=script, python="py")
    assert [r.run_name for r in runs] == ["bf16_s42", "bf16_s43", "e5m2_s42", "e5m2_s43"]
    assert runs[1].cmd == ("py", str(script), str(cfg["bf16"]), "--train.seed=43", "--log.run_name=bf16_s43",
                           f"--log.out_dir={tmp_path / 'out'}", "--train.max_steps=5", "--log.wandb_mode=disabled")
    assert runs[3].run_dir == tmp_path / "out" / "e5m2_s43"
    # without --seeds each config keeps its own seed (42 when the config has none)
    assert [r.seed for r in sweep.plan([cfg["bf16"], cfg["e5m2"]], train_script=script)] == [7, 42]


@pytest.mark.parametrize("kwargs, message", [
    ({"sets": ["train.max_steps"]}, "expected section.key=value"),
    ({"sets": ["max_steps=5"]}, "expected section.key=value"),
    ({"sets": ["train.seed=3"]}, "set by the sweep"),
    ({"seeds": []}, "--seeds must be"),
    ({"seeds": [-1]}, "--seeds must be"),
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
            "--set", "train.max_steps=5", "--out-root", str(out), "--train-script", str(script)]
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
    assert err.startswith("sweep: --set 'oops'") and "\n" not in err
