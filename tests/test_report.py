"""altgrad.report: table, verdicts, seed spread and plots from run directories."""

import json
import math
import os
import random
from pathlib import Path

import pytest

from altgrad import report

REPO_ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc", "lm_head")


def write_run(root, name, *, val_losses, status="completed", quant=None, seed=42, diverged_step=None,
              shadow=None, stall=None, overflow=None, underflow=None, extra_lines=()):
    """A run directory as train.py writes it: summary.json + metrics.jsonl (one record per step)."""
    run = root / name
    run.mkdir(parents=True)
    steps = sorted(val_losses)
    rng = random.Random(name)
    with open(run / "metrics.jsonl", "w") as f:
        for step in steps:
            noisy = val_losses[step] + rng.uniform(-0.05, 0.05)
            rec = {"step": step, "train/loss": noisy, "val/loss": val_losses[step]}
            if shadow is not None:
                rec["shadow/grad_cos_mean"] = shadow[step]
                rec.update({f"shadow/{layer}/grad_cos": shadow[step] - 0.01 * i for i, layer in enumerate(LAYERS)})
            if stall is not None:
                rec["update/bit_stall"] = stall[step]
            for role, vals in (overflow or {}).items():
                rec[f"quant/{role}/overflow"] = vals[step]
            for role, vals in (underflow or {}).items():
                rec[f"quant/{role}/underflow"] = vals[step]
            f.write(json.dumps(rec) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    final = val_losses[steps[-1]]
    summary = {
        "run_name": name, "status": status, "steps": steps[-1], "diverged_step": diverged_step,
        "final_train_loss": final, "final_val_loss": final if math.isfinite(final) else None,
        "best_val_loss": min(v for v in val_losses.values() if math.isfinite(v)), "best_val_step": 0,
        "wall_time_s": 12.5, "versions": {"torch": "2.13"}, "device": "cpu", "git_commit": "abc",
        "config": {"train": {"seed": seed, "dtype": "fp32"}, "quant": quant, "model": {}, "data": {}, "log": {}},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


STEPS = (0, 10, 20, 30)


def curve(start, end):
    return {s: start + (end - start) * i / (len(STEPS) - 1) for i, s in enumerate(STEPS)}


@pytest.fixture
def runs(tmp_path):
    base = write_run(tmp_path, "bf16_baseline_s42", val_losses=curve(4.0, 2.0))
    e5m2 = write_run(
        tmp_path, "e5m2_fp8_s42", val_losses=curve(4.0, 2.1), quant={"default_format": "E5M2"},
        shadow={s: 0.99 - 0.01 * i for i, s in enumerate(STEPS)}, stall={s: 0.2 + 0.1 * i for i, s in enumerate(STEPS)},
        overflow={"input": {s: 0.0 for s in STEPS}, "grad_output": {s: 1e-3 * i for i, s in enumerate(STEPS)}},
        underflow={"input": {s: 0.01 for s in STEPS}, "grad_output": {s: 0.1 * i for i, s in enumerate(STEPS)}},
    )
    e7m0 = write_run(
        tmp_path, "e7m0_s42", val_losses={0: 4.0, 10: 3.9, 20: float("nan")}, status="diverged", diverged_step=20,
        quant={"default_format": "E7M0"},
    )
    e2m5 = write_run(tmp_path, "e2m5_s42", val_losses=curve(4.0, 2.6), quant={
        "default_format": "E4M3", "grad_output_format": "E5M2", "rounding": "stochastic"})
    return base, e5m2, e7m0, e2m5


def test_verdicts_ratios_and_aggregates(runs):
    loaded = [report.load_run(p) for p in runs]
    rows = {r.run: r for r in report.summarize(loaded, loaded[0])}
    assert [r for r in rows] == ["bf16_baseline_s42", "e5m2_fp8_s42", "e7m0_s42", "e2m5_s42"]
    assert rows["bf16_baseline_s42"].verdict == "baseline"
    e5 = rows["e5m2_fp8_s42"]
    assert e5.verdict == "PASS" and e5.status == "completed"
    assert e5.ratio == pytest.approx(2.1 / 2.0) and e5.ratio_step == 30 and e5.loss == pytest.approx(2.1)
    assert e5.val_loss == pytest.approx(2.1) and e5.val_step == 30 and e5.ppl == pytest.approx(math.exp(2.1))
    assert e5.grad_cos == pytest.approx((0.99 + 0.98 + 0.97 + 0.96) / 4)
    assert e5.bit_stall == pytest.approx((0.2 + 0.3 + 0.4 + 0.5) / 4)
    assert e5.max_overflow == pytest.approx(3e-3)
    # worst role's mean over steps: grad_output (0 + .1 + .2 + .3) / 4 beats input's 0.01
    assert e5.mean_underflow == pytest.approx(0.15)
    assert e5.fmt == "E5M2"
    e7 = rows["e7m0_s42"]
    # a diverged run keeps its verdict and does not hold the others' comparison step back
    assert e7.verdict == "DIVERGED" and e7.diverged_step == 20 and e7.status == "diverged"
    assert math.isnan(e7.val_loss) and e7.val_step == 20  # its final loss as logged: NaN
    assert e7.ratio_step == 30 and e7.loss is None and e7.ratio is None
    e2 = rows["e2m5_s42"]
    assert e2.verdict == "INVESTIGATE" and e2.ratio == pytest.approx(1.3)
    assert e2.fmt == "i:E4M3 w:E4M3 go:E5M2 SR"
    assert rows["bf16_baseline_s42"].fmt == "FP32"


@pytest.mark.parametrize("config, device, expected", [
    ({"train": {"dtype": "auto"}, "quant": None}, "cuda:0 (NVIDIA H100)", "BF16"),
    ({"train": {"dtype": "auto"}, "quant": None}, "cpu (2 threads)", "FP32"),
    ({"train": {"dtype": "bf16"}, "quant": None}, "cpu (2 threads)", "BF16"),
    ({"quant": {"default_format": "E4M3", "grad_output_format": "E5M2"}}, "cpu", "i:E4M3 w:E4M3 go:E5M2"),
    ({"quant": {"default_format": "E5M2", "master_weights": "E5M2", "scaling": "current"}}, "cpu",
     "E5M2 master:E5M2 scaling:current"),
    ({"quant": {"default_format": None,
                "layer_rules": [{"pattern": "attn", "format": None}, {"pattern": "mlp", "format": "E5M2"}]}},
     "cpu", "mixed hp/E5M2"),
    ({"quant": {"default_format": "E2M5", "scaling": "current", "granularity": "block"}}, "cpu",
     "E2M5 scaling:current block32"),
    ({"quant": {"default_format": "E4M3", "scaling": "current", "granularity": "block", "block_size": 16,
                "block_2d": True, "scale_rounding": "ceil"}}, "cpu", "E4M3 scaling:current block16x16-ceil"),
    ({"quant": {"default_format": "E0M7", "scaling": "current", "granularity": "row", "scale_format": "fp32"}},
     "cpu", "E0M7 scaling:current row-fp32"),
    ({"quant": {"default_format": "E4M3", "scaling": "current", "granularity": {"input": "row"}}}, "cpu",
     "E4M3 scaling:current granularity:{'input': 'row'}"),
    ({}, "cpu", "—"),
    # a quant section whose formats are all high-precision names ran unquantized: say what ran
    ({"train": {"dtype": "auto"}, "quant": {"default_format": "bf16"}}, "cpu (2 threads)", "FP32"),
    ({"train": {"dtype": "auto"}, "quant": {"default_format": "E5M2", "input_format": None, "weight_format": "fp32",
                                           "grad_output_format": "none"}}, "cpu", "FP32"),
])
def test_format_description(tmp_path, config, device, expected):
    run = report.Run(tmp_path, {"config": config, "device": device})
    assert report.describe_format(run) == expected


def test_table_prints_dash_for_missing_metrics(runs):
    loaded = [report.load_run(p) for p in runs]
    text = report.format_table(report.summarize(loaded, loaded[0]))
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["run", "status", "format"]
    base_line = next(line for line in lines if line.startswith("bf16_baseline_s42"))
    assert "—" in base_line and "2.0000" in base_line and "baseline" in base_line
    assert "DIVERGED" in next(line for line in lines if line.startswith("e7m0_s42"))
    md = report.format_table(report.summarize(loaded, loaded[0]), markdown=True)
    assert md.splitlines()[1].startswith("|---|") and md.count("\n") == len(loaded) + 1


def test_main_writes_report_and_plots(runs, tmp_path, capsys):
    out = tmp_path / "rep"
    assert report.main([str(p) for p in runs] + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "PASS" in printed and "DIVERGED" in printed and "INVESTIGATE" in printed
    md = (out / "report.md").read_text()
    assert "| e5m2_fp8_s42 | completed | E5M2 |" in md
    assert printed.startswith("compared at step 30: the last step at which all 3 compared runs logged a validation loss")
    assert "fixed-percentage fallback rule" in printed
    expected = {"loss.png", "grad_cos.png", "bit_stall.png", "overflow_underflow.png",
                "grad_cos_heatmap_e5m2_fp8_s42.png"}
    made = {p.name for p in out.glob("*.png")}
    assert made == expected  # no heat-map for runs without shadow data
    for name in expected:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in md


def test_baseline_option_and_default_out_dir(runs, capsys):
    base, e5m2, _, _ = runs
    assert report.main([str(e5m2), "--baseline", str(base)]) == 0
    out = capsys.readouterr().out
    # the baseline is added to the table and the other run compared with it
    assert out.index("bf16_baseline_s42") < out.index("e5m2_fp8_s42")
    assert (e5m2.parent / "report" / "report.md").is_file()


def test_runs_without_any_optional_metric(tmp_path):
    # only a loss and no summary at all (a run killed early): still a row, dashes elsewhere
    a = write_run(tmp_path, "a", val_losses=curve(3.0, 2.0))
    b = tmp_path / "b"
    b.mkdir()
    (b / "metrics.jsonl").write_text('{"step": 0, "train/loss": 3.0}\n{"step": 10, "train/loss": 2.5}\n{"step": 2')
    loaded = [report.load_run(a), report.load_run(b)]
    rows = report.summarize(loaded, loaded[0])
    # b never evaluated: compared on training loss at the last common step (10)
    a_train = dict(loaded[0].series["train/loss"])
    assert rows[1].val_loss is None and rows[1].ratio == pytest.approx(2.5 / a_train[10]) and rows[1].ratio_step == 10
    assert rows[1].fmt == "—" and rows[1].verdict == "PARTIAL" and rows[1].status == "INCOMPLETE"
    assert "—" in report.format_table(rows)
    text, md, plots = report.write_report(loaded, loaded[0], tmp_path / "rep")
    assert [p.name for p in plots] == ["loss.png"]


def test_seed_spread_of_the_baseline(tmp_path, capsys):
    finals = {42: 2.00, 43: 2.10, 44: 1.96}
    dirs = [write_run(tmp_path, f"bf16_baseline_s{s}", val_losses=curve(4.0, v), seed=s) for s, v in finals.items()]
    dirs.append(write_run(tmp_path, "e5m2_fp8_s43", val_losses=curve(4.0, 2.15), seed=43,
                          quant={"default_format": "E5M2"}))
    assert report.main([str(d) for d in dirs] + ["--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    mean = sum(finals.values()) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in finals.values()) / 2)
    assert f"bf16_baseline (baseline): final val loss {mean:.4f} ± {std:.4f} over 3 seeds" in out
    assert f"sigma = {std:.4f}, the std of the baseline's 3 seeds" in out and "seed-spread rule" in out
    # e5m2 seed 43 is compared with the baseline's seed-43 run (2.10), not the first baseline (2.00)
    loaded = [report.load_run(d) for d in dirs]
    row = report.summarize(loaded, loaded[0])[-1]
    assert row.ratio == pytest.approx(2.15 / 2.10)


# ---- honesty: one comparison step, status, non-finite losses, seed noise -------------------------------


def test_all_runs_are_compared_at_the_last_step_they_share(tmp_path):
    base = write_run(tmp_path, "base", val_losses=curve(4.0, 2.0))
    # killed at step 20 without a chance to update its summary: still says running, no live process
    killed = write_run(tmp_path, "killed", val_losses={0: 4.0, 10: 3.3, 20: 2.6}, status="running",
                       quant={"default_format": "E5M2"})
    done = write_run(tmp_path, "done", val_losses=curve(4.0, 2.9), quant={"default_format": "E3M4"})
    loaded = [report.load_run(p) for p in (base, killed, done)]
    cmp = report.comparison(loaded, loaded[0])
    assert cmp.step == 20 and cmp.key == "val/loss" and cmp.header.startswith("compared at step 20:")
    rows = {r.run: r for r in report.summarize(loaded, loaded[0])}
    base20 = curve(4.0, 2.0)[20]
    assert rows["killed"].status == "INCOMPLETE" and rows["killed"].ratio == pytest.approx(2.6 / base20)
    # "done" is compared at step 20 too (2.9 at its end would be INVESTIGATE): its final value sits beside
    assert rows["done"].ratio == pytest.approx(curve(4.0, 2.9)[20] / base20) and rows["done"].ratio_step == 20
    assert rows["done"].val_loss == pytest.approx(2.9) and rows["done"].val_step == 30
    table = report.format_table(list(rows.values()))
    assert "2.9000 (30)" in table and "INCOMPLETE" in table


def test_a_running_run_with_a_live_lock_reads_running(tmp_path):
    from altgrad.rundir import RunLock

    run = write_run(tmp_path, "live", val_losses=curve(4.0, 2.0), status="running")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps(summary | {"pid": os.getpid()}))
    with RunLock(run):
        assert report.load_run(run).status == "running"
    assert report.load_run(run).status == "INCOMPLETE"


def test_a_non_finite_loss_is_never_pass(tmp_path, capsys):
    base = write_run(tmp_path, "base", val_losses=curve(4.0, 2.0))
    # completed, but its weights went NaN before the last evaluation (null in metrics.jsonl)
    nan = write_run(tmp_path, "nan", val_losses={**curve(4.0, 2.0), 30: float("nan")}, quant={"default_format": "E5M2"})
    failed = write_run(tmp_path, "crashed", val_losses={0: 4.0, 10: 3.3}, status="failed",
                       quant={"default_format": "E4M3"})
    assert report.main([str(base), str(nan), str(failed), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    loaded = [report.load_run(p) for p in (base, nan, failed)]
    rows = {r.run: r for r in report.summarize(loaded, loaded[0])}
    # compared at the last common step (30), where its loss is NaN; the failed run does not pull S back to 10
    assert rows["nan"].ratio_step == 30 and math.isnan(rows["nan"].loss) and rows["nan"].verdict == "NON-FINITE"
    assert rows["crashed"].verdict == "FAILED" and rows["crashed"].status == "FAILED"
    assert not any(line.rstrip().endswith("PASS") for line in out.splitlines()) and "compared at step 30" in out


def test_the_verdict_uses_the_baselines_seed_spread(tmp_path, capsys):
    # baseline seeds within ±1 %, a format 7.4 % worse: far outside the noise, whatever 10 % says
    dirs = [write_run(tmp_path, f"base_s{s}", val_losses={0: 4.0, 30: v}, seed=s)
            for s, v in ((42, 2.00), (43, 2.02), (44, 1.98))]
    dirs.append(write_run(tmp_path, "e7m0_s42", val_losses={0: 4.0, 30: 2.148}, quant={"default_format": "E7M0"}))
    dirs.append(write_run(tmp_path, "e5m2_s42", val_losses={0: 4.0, 30: 2.03}, quant={"default_format": "E5M2"}))
    assert report.main([str(d) for d in dirs] + ["--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    rows = {r.run: r for r in report.summarize([report.load_run(d) for d in dirs], report.load_run(dirs[0]))}
    assert rows["e7m0_s42"].ratio == pytest.approx(1.074)  # PASS under the 10 % rule ...
    assert rows["e7m0_s42"].gap_sigma == pytest.approx(7.4) and rows["e7m0_s42"].verdict == "INVESTIGATE"
    assert rows["e5m2_s42"].gap_sigma == pytest.approx(1.5) and rows["e5m2_s42"].verdict == "PASS"
    assert "Δ/σ" in out and "+7.4" in out
    assert "PASS = |loss - baseline mean| <= 3 sigma at step 30; sigma = 0.0200" in out and "seed-spread rule" in out


def test_a_sweep_with_seeds_gets_one_line_per_config(tmp_path, capsys):
    base = {42: 2.00, 43: 2.02, 44: 1.98}
    fmt = {42: 2.10, 43: 2.16, 44: 2.13}  # mean 2.13: 6.5 baseline sigmas away
    dirs = [write_run(tmp_path, f"base_s{s}", val_losses={0: 4.0, 30: v}, seed=s) for s, v in base.items()]
    dirs += [write_run(tmp_path, f"e2m5_block32_s{s}", val_losses={0: 4.0, 30: v}, seed=s,
                       quant={"default_format": "E2M5", "scaling": "current", "granularity": "block"},
                       shadow={0: 1.0, 30: 0.9 + 0.01 * (s - 42)}, underflow={"input": {0: 0.1, 30: 0.3}})
             for s, v in fmt.items()]
    dirs.append(write_run(tmp_path, "e0m7_s42", val_losses={0: 4.0, 30: 2.01}, quant={"default_format": "E0M7"}))
    assert report.main([str(d) for d in dirs] + ["--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    table = out.split("by config, over its seeds")[1]
    lines = {line.split()[0]: line for line in table.splitlines()[3:] if line.strip() and not line.startswith("report")}
    assert set(lines) == {"base", "e2m5_block32", "e0m7"}
    e2 = lines["e2m5_block32"]
    assert "E2M5 scaling:current block32" in e2 and " 3 " in e2 and "2.1300 ± 0.0300" in e2
    assert "+6.5" in e2 and "0.9550" in e2 and "2.00e-01" in e2 and e2.rstrip().endswith("0/3")
    assert lines["e0m7"].rstrip().endswith("1/1") and "2.0100" in lines["e0m7"]
    assert "## By config, over its seeds" in (tmp_path / "rep" / "report.md").read_text()
    assert (tmp_path / "rep" / "by_config.png").stat().st_size > 0
    assert (tmp_path / "rep" / "grad_cos_heatmap_e2m5_block32_s42.png").is_file()
    # one seed per config: no such table; --no-heatmaps leaves the per-run heatmaps out
    assert report.main([str(dirs[0]), str(dirs[-1]), "--out", str(tmp_path / "rep2"), "--no-heatmaps"]) == 0
    assert "by config" not in capsys.readouterr().out
    assert not list((tmp_path / "rep2").glob("grad_cos_heatmap_*")) and (tmp_path / "rep2" / "loss.png").is_file()
    assert "heatmap" not in (tmp_path / "rep2" / "report.md").read_text()


def test_missing_run_dir_is_a_one_line_error(tmp_path, capsys):
    assert report.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "neither summary.json nor metrics.jsonl" in err


# ---- the whole chain: two real train.py runs (via the sweep) and the report -------------------------

TINY = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "train.batch_size=4",
        "train.max_steps=10", "train.warmup=2", "train.eval_interval=5", "train.eval_iters=2",
        "train.log_interval=5", "train.shadow_interval=5", "train.checkpoint_interval=0", "log.wandb_mode=disabled"]


@pytest.mark.slow
def test_whole_chain_two_real_runs_and_report(tmp_path, fixture_text, prepare_module, capsys):
    from altgrad import sweep

    data = tmp_path / "data"
    prepare_module.prepare(fixture_text, data)
    out = tmp_path / "out"
    configs = [str(REPO_ROOT / "configs" / f) for f in ("baseline.yaml", "e5m2_fp8.yaml")]  # the shipped ones
    sets = [a for s in TINY + [f"data.dir={data}"] for a in ("--set", s)]
    assert sweep.main(configs + sets + ["--out-root", str(out)]) == 0
    printed = capsys.readouterr().out

    # train.py logged every diagnostic family under the docs/design.md §8 keys
    lines = (out / "e5m2_fp8_s42" / "metrics.jsonl").read_text().splitlines()
    keys = set().union(*(json.loads(line) for line in lines))
    for key in ("quant/input/overflow", "quant/grad_output/underflow", "quant/transformer.h.0.mlp.c_fc/weight/rel_err",
                "update/bit_stall", "update/ulp_ratio", "shadow/grad_cos_mean", "shadow/lm_head/grad_snr_db",
                "mlp/dead_frac", "grad/transformer.h.0.mlp.c_fc/l2", "perf/shadow_ms"):
        assert key in keys, key
    names = ("baseline_s42", "e5m2_fp8_s42")
    row = {line.split()[0]: line for line in printed.splitlines() if line.startswith(names)}
    assert row["baseline_s42"].rstrip().endswith("baseline")
    assert row["e5m2_fp8_s42"].rstrip().endswith(("PASS", "INVESTIGATE")) and " E5M2 " in row["e5m2_fp8_s42"]
    loaded = [report.load_run(out / n) for n in ("baseline_s42", "e5m2_fp8_s42")]
    base, e5 = report.summarize(loaded, loaded[0])
    # the fp32 baseline's shadow is itself: cosine 1; E5M2 gradients are close but not equal
    assert base.grad_cos == pytest.approx(1.0, abs=1e-6) and 0.9 < e5.grad_cos < 1.0
    assert 0 < e5.bit_stall < 1 and base.bit_stall is None
    assert e5.ratio_step == 10 and e5.ratio == pytest.approx(e5.val_loss / base.val_loss)
    assert "compared at step 10:" in printed
    made = {p.name for p in (out / "report").glob("*.png")}
    assert {"loss.png", "grad_cos.png", "bit_stall.png", "overflow_underflow.png",
            "grad_cos_heatmap_e5m2_fp8_s42.png"} <= made


def test_step_zero_is_too_early_and_unfinished_runs_only_pass_partially(tmp_path, capsys):
    """At step 0 every run with the baseline's seed is the same untrained model (ratio 1 by
    construction): no verdict. A run that did not finish passes only as far as it got."""
    base = write_run(tmp_path, "base", val_losses={0: 4.0, 2: 3.8, 4: 3.6})
    early = write_run(tmp_path, "stopped_at_1", val_losses={0: 4.0}, status="stopped",
                      quant={"default_format": "E5M2"})
    assert report.main([str(base), str(early), "--out", str(tmp_path / "rep0")]) == 0
    out = capsys.readouterr().out
    rows = {r.run: r for r in report.summarize([report.load_run(p) for p in (base, early)], report.load_run(base))}
    assert rows["stopped_at_1"].ratio == pytest.approx(1.0) and rows["stopped_at_1"].verdict == "TOO EARLY"
    assert "PASS" not in out.replace("PASS =", "") and "before any update" in out

    killed = write_run(tmp_path, "killed", val_losses={0: 4.0, 2: 3.81}, status="running",
                       quant={"default_format": "E4M3"})
    done = write_run(tmp_path, "done", val_losses={0: 4.0, 2: 3.82, 4: 3.61}, quant={"default_format": "E3M4"})
    loaded = [report.load_run(p) for p in (base, killed, done)]
    rows = {r.run: r for r in report.summarize(loaded, loaded[0])}
    assert rows["killed"].status == "INCOMPLETE" and rows["killed"].verdict == "PARTIAL"
    assert rows["done"].verdict == "PASS"
