"""altgrad.checkpoint: atomic save, weights_only load, rotation, finding the latest."""

import os

import pytest
import torch

from altgrad import checkpoint as ckpt
from altgrad.reproducibility import get_rng_state, set_rng_state
from altgrad.scaling import TensorScaler


def _state(step):
    model = torch.nn.Linear(3, 5)
    scaler = TensorScaler("E5M2", "delayed", history_len=4)
    scaler.observe(torch.tensor(2.5))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(7, 3)).sum().backward()
    opt.step()
    return {"step": step, "model": model.state_dict(), "scaler": scaler.state_dict(), "optimizer": opt.state_dict(),
            "rng": get_rng_state(), "best_val_loss": None, "note": "x"}


def test_round_trip_is_exact_and_weights_only(tmp_path, seeded):
    state = _state(7)
    path = ckpt.save_checkpoint(state, tmp_path / "a" / "c.pt")
    # the file loads without unpickling code: plain torch.load(weights_only=True) works too
    assert torch.load(path, weights_only=True)["step"] == 7
    back = ckpt.load_checkpoint(path)
    assert back["schema"] == ckpt.SCHEMA_VERSION
    for key in ("model", "scaler"):
        assert back[key].keys() == state[key].keys()
        assert all(torch.equal(back[key][k], state[key][k]) for k in state[key])
    assert back["optimizer"]["state"][0]["exp_avg"].equal(state["optimizer"]["state"][0]["exp_avg"])
    # the RNG state survives, so draws after restore repeat
    set_rng_state(back["rng"])
    a = torch.rand(4)
    set_rng_state(state["rng"])
    assert torch.equal(a, torch.rand(4))
    assert back["best_val_loss"] is None and back["note"] == "x"


def test_failed_save_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = ckpt.save_checkpoint({"step": 1, "w": torch.arange(3)}, tmp_path / "c.pt")
    before = path.read_bytes()
    with pytest.raises(Exception):
        ckpt.save_checkpoint({"step": 2, "bad": lambda: 0}, path)  # a lambda cannot be pickled
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_saved_files_have_umask_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = ckpt.save_checkpoint({"step": 1}, tmp_path / "c.pt")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_rotation_keeps_the_newest_and_last_points_at_the_newest(tmp_path):
    for step in (5, 10, 100, 1000, 20000):
        ckpt.save_run_checkpoint({"step": step}, tmp_path, step, max_checkpoints=3)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [100, 1000, 20000]
    last = tmp_path / ckpt.CKPT_LAST
    assert ckpt.latest_checkpoint(tmp_path) == last
    assert ckpt.load_checkpoint(last)["step"] == 20000
    assert last.read_bytes() == ckpt.checkpoint_path(tmp_path, 20000).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_final_save_between_intervals_only_replaces_last(tmp_path):
    ckpt.save_run_checkpoint({"step": 10}, tmp_path, 10, max_checkpoints=2)
    ckpt.save_run_checkpoint({"step": 13}, tmp_path, 13, max_checkpoints=2, numbered=False)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [10]
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path, 10))["step"] == 10  # not overwritten via the link
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["step"] == 13


def test_latest_without_last_is_the_highest_step(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None
    for step in (9, 100, 10):
        ckpt.save_checkpoint({"step": step}, ckpt.checkpoint_path(tmp_path, step))
    (tmp_path / "ckpt_notes.pt").write_text("not a checkpoint name")
    assert ckpt.latest_checkpoint(tmp_path) == ckpt.checkpoint_path(tmp_path, 100)


def test_rotate_needs_keep_at_least_one(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        ckpt.rotate_checkpoints(tmp_path, 0)


@pytest.mark.parametrize("content, message", [
    (None, "no such checkpoint"),
    (b"\x00garbage", "cannot be loaded"),
    ({"step": 1}, "not an altgrad checkpoint"),
    ({"schema": ckpt.SCHEMA_VERSION + 1}, "newer than this code"),
])
def test_bad_checkpoints_give_one_line(tmp_path, content, message):
    path = tmp_path / "c.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(ckpt.CheckpointError, match=message) as err:
        ckpt.load_checkpoint(path)
    assert "\n" not in str(err.value)


def test_load_latest_falls_back_to_the_newest_readable(tmp_path):
    for step in (10, 20, 30):
        ckpt.save_run_checkpoint({"step": step}, tmp_path, step, max_checkpoints=3)
    last = tmp_path / ckpt.CKPT_LAST
    last.write_bytes(last.read_bytes()[:20])  # a hard link: ckpt_0000030.pt is truncated with it
    warnings = []
    path, state = ckpt.load_latest_checkpoint(tmp_path, warn=warnings.append)
    assert path == ckpt.checkpoint_path(tmp_path, 20) and state["step"] == 20
    assert len(warnings) == 2 and all("trying an older checkpoint" in w for w in warnings)
    for p in tmp_path.glob("*.pt"):
        p.write_bytes(b"junk")
    with pytest.raises(ckpt.CheckpointError, match="no readable checkpoint in"):
        ckpt.load_latest_checkpoint(tmp_path)
    assert ckpt.load_latest_checkpoint(tmp_path / "empty") == (None, None)
