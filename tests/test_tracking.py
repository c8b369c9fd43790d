"""altgrad.tracking: metrics.jsonl, W&B offline/disabled, atomic JSON, provenance."""

import json
import math
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from altgrad.tracking import RunLogger, git_commit, layer_panels, read_metrics, run_versions, write_json_atomic

REPO_ROOT = Path(__file__).resolve().parent.parent


# ---- reading a W&B offline run file ------------------------------------------------------------------
# wandb >= 0.19 has no Python reader for its .wandb transaction log, so the test reads it itself:
# a 7-byte file header (":W&B", magic, version), then LevelDB log records in 32 KiB blocks, each
# record a 7-byte header (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last) and
# a serialized wandb_internal.Record protobuf.

def wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, chunks, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # block trailer: too small for a header, zero-padded
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
    return [pb.Record.FromString(c) for c in chunks]


def wandb_history(run_dir: Path, timeout: float = 60.0):
    """(run record, [{key: value} per logged step], config dict) of the run's offline file.

    wandb's service process writes the file after `finish()` returns: wait for its exit record."""
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(files[0])
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    run, history, config = None, [], {}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run = rec.run
            config.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "history":
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            history.append({k: v for k, v in items.items() if not k.startswith("_")} | {"_step": items["_step"]})
    return run, history, config


# ---- metrics.jsonl -----------------------------------------------------------------------------------


def test_log_writes_one_json_object_per_call(tmp_path, seeded):
    loss = torch.rand(()) + 1
    with RunLogger(tmp_path / "run") as log:
        log.log(0, {"val/loss": loss, "val/ppl": math.exp(loss.item())})
        log.log(10, {"train/loss": float("nan"), "train/grad_norm": float("inf"), "train/skipped_steps": 3,
                     "perf/ok": True})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first == {"step": 0, "val/loss": loss.item(), "val/ppl": math.exp(loss.item())}
    # JSON has no NaN/inf: non-finite values are null, strictly valid JSON for every reader
    assert second == {"step": 10, "train/loss": None, "train/grad_norm": None, "train/skipped_steps": 3,
                      "perf/ok": 1}
    assert "NaN" not in lines[1] and "Infinity" not in lines[1]


def test_fresh_logger_starts_over_and_resume_drops_records_after_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    with RunLogger(run) as log:
        for step in range(0, 50, 10):
            log.log(step, {"train/loss": 1.0 / (step + 1)})
    with RunLogger(run, resume_step=20) as log:  # crashed after 40, resumed from the step-20 checkpoint
        log.log(30, {"train/loss": 0.5})
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [0, 10, 20, 30]
    with RunLogger(run) as log:
        log.log(0, {"train/loss": 2.0})
    assert read_metrics(run / "metrics.jsonl") == [{"step": 0, "train/loss": 2.0}]


def test_read_metrics_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 2}\n\n{"step": 2, "a"')
    assert read_metrics(path) == [{"step": 1, "a": 2}]


def test_bad_wandb_mode(tmp_path):
    with pytest.raises(ValueError, match="wandb_mode: must be one of online, offline, disabled"):
        RunLogger(tmp_path, wandb_mode="cloud")


def test_disabled_never_imports_wandb(tmp_path):
    code = ("import sys; from altgrad.tracking import RunLogger\n"
            f"log = RunLogger({str(tmp_path)!r}, config={{'a': 1}}, wandb_mode='disabled')\n"
            "log.log(1, {'x': 1.0}); log.close({'status': 'completed'})\n"
            "assert 'wandb' not in sys.modules, 'wandb was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert not (tmp_path / "wandb").exists()


# ---- W&B offline -------------------------------------------------------------------------------------


def test_wandb_offline_run_holds_the_same_keys_as_metrics_jsonl(tmp_path, seeded, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    config = {"model": {"n_layer": 2}, "train": {"lr": 1e-3}, "quant": None}
    steps = {0: {"val/loss": 4.2, "val/ppl": math.exp(4.2)},
             5: {"train/loss": torch.rand(()).item() + 1, "quant/input/overflow": 0.25, "train/lr": 1e-3}}
    with RunLogger(run_dir, config=config, project="altgrad-test", run_name="tiny", tags=["a", "b"],
                   wandb_mode="offline") as log:
        for step, metrics in steps.items():
            log.log(step, metrics)
    run, history, logged_config = wandb_history(run_dir)
    assert run.display_name == "tiny" and run.project == "altgrad-test" and list(run.tags) == ["a", "b"]
    assert logged_config["train"] == {"lr": 1e-3} and logged_config["quant"] is None
    assert [h.pop("_step") for h in history] == list(steps)
    assert history == list(steps.values())
    jsonl = read_metrics(run_dir / "metrics.jsonl")
    assert [set(r) - {"step"} for r in jsonl] == [set(h) for h in history]
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    assert run.run_id == run_id and re.fullmatch(r"[a-z0-9]+", run_id)


# ---- JSON and provenance -----------------------------------------------------------------------------


def test_write_json_atomic(tmp_path):
    path = tmp_path / "s" / "summary.json"
    write_json_atomic(path, {"loss": float("nan"), "nested": {"x": [1.0, float("-inf")]}, "ok": 2})
    assert json.loads(path.read_text()) == {"loss": None, "nested": {"x": [1.0, None]}, "ok": 2}
    assert [p.name for p in path.parent.iterdir()] == ["summary.json"]


def test_run_versions_and_git_commit(tmp_path):
    v = run_versions()
    assert v["torch"] == torch.__version__ and v["python"].count(".") == 2
    assert set(v) >= {"python", "torch", "cuda", "triton", "numpy", "altgrad"}
    assert git_commit(tmp_path) is None  # not a checkout
    if (REPO_ROOT / ".git").exists() and subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT,
                                                        capture_output=True).returncode == 0:
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", git_commit(REPO_ROOT))


# ---- W&B layer panels ------------------------------------------------------------------------------


def test_layer_panels_group_per_layer_keys_by_metric():
    records = [
        {"step": 0, "quant/h.0.fc/input/overflow": 0.1, "quant/h.1.fc/input/overflow": 0.2,
         "quant/input/overflow": 0.15, "update/h.0.fc/bit_stall": 0.5, "train/loss": 3.0},
        {"step": 10, "quant/h.0.fc/input/overflow": None, "quant/h.1.fc/input/overflow": 0.3,
         "shadow/h.1.fc/grad_cos": 0.99, "shadow/grad_cos_mean": 0.99},
    ]
    panels = layer_panels(records)
    assert set(panels) == {"quant/input/overflow", "update/bit_stall", "shadow/grad_cos"}
    xs, ys, layers = panels["quant/input/overflow"]
    assert layers == ["h.0.fc", "h.1.fc"] and xs == [[0], [0, 10]] and ys == [[0.1], [0.2, 0.3]]
    assert panels["shadow/grad_cos"] == ([[10]], [[0.99]], ["h.1.fc"])


def test_offline_run_logs_one_layer_panel_per_metric(tmp_path):
    run = tmp_path / "run"
    with RunLogger(run, project="altgrad", run_name="panels", wandb_mode="offline") as log:
        for step in range(3):
            log.log(step, {"quant/h.0.fc/input/overflow": 0.1 * step, "quant/h.1.fc/input/overflow": 0.2,
                           "quant/input/overflow": 0.15, "train/loss": 3.0 - step})
    _, history, _ = wandb_history(run)
    assert [row["_step"] for row in history] == [0, 1, 2]  # no extra row: the charts join step 2
    panel_keys = {k for row in history for k in row if k.startswith("layers/")}
    assert panel_keys and all(k in history[-1] for k in panel_keys)
    assert any(k.startswith("layers/quant/input/overflow") for k in panel_keys), panel_keys
    assert not any("train/loss" in k for k in panel_keys)


def test_wandb_online_without_network_says_so_and_falls_back_within_the_timeout(tmp_path, monkeypatch, capsys):
    import altgrad.tracking as tracking

    # a key (so wandb tries the server) and a server nobody answers on: as on a machine without network
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setattr(tracking, "WANDB_INIT_TIMEOUT_S", 3.0)
    t0 = time.monotonic()
    logger = RunLogger(tmp_path / "run", run_name="net", wandb_mode="online")
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert err.startswith("W&B online: connecting (up to 3 s, then offline)")  # before the wait, not after
    assert "W&B online failed" in err and logger.wandb_mode == "offline"
    assert elapsed < 25, elapsed  # wandb's own default waits 90 s
    logger.log(1, {"train/loss": 2.0})
    logger.close()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
