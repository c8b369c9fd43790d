"""altgrad.rundir: the run lock, partial-file cleanup, moving an earlier run aside."""

import json
import os
import socket
import subprocess
import sys

import pytest

from altgrad.rundir import RunLock, RunLockedError, clean_partial_files, lock_holder, lock_path, move_aside
from altgrad.tracking import atomic_path


def test_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
    run = tmp_path / "r"
    first = RunLock(run)
    assert first.acquire() == {} and lock_holder(run)["pid"] == os.getpid()
    assert lock_holder(run)["host"] == socket.gethostname()
    with pytest.raises(RunLockedError, match=rf"in use by a live run \(pid {os.getpid()} on host "):
        RunLock(run).acquire()
    assert not run.exists()  # the lock lives beside the run directory, which it never creates
    first.release()
    assert lock_holder(run) is None and not lock_path(run).exists()
    with RunLock(run) as again:
        assert again.held


def test_a_lock_held_by_another_process_blocks_and_dies_with_it(tmp_path):
    run = tmp_path / "r"
    code = f"import sys, time; from altgrad.rundir import RunLock; RunLock({str(run)!r}).acquire(); print('ok', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ok"
        assert lock_holder(run)["pid"] == child.pid
        with pytest.raises(RunLockedError, match=f"pid {child.pid}"):
            RunLock(run).acquire()
    finally:
        child.kill()
        child.wait()
    # kill -9 leaves the file behind, but not the flock: a stale lock, taken over with its owner named
    assert lock_path(run).exists() and lock_holder(run) is None
    lock = RunLock(run)
    assert lock.acquire()["pid"] == child.pid
    assert json.loads(lock_path(run).read_text())["pid"] == os.getpid()
    lock.release()


def test_clean_partial_files_removes_only_temp_files_of_atomic_writes(tmp_path):
    keep = ["ckpt_0000010.pt", "ckpt_last.pt", "summary.json", "notes.tmp", ".hidden"]
    for name in keep:
        (tmp_path / name).write_text("x")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "ckpt_0000020.pt") as tmp:
            leftover = tmp + ".copy"  # what a killed process leaves: the same name pattern
            os.link(tmp, leftover)
            raise RuntimeError
    os.rename(leftover, tmp)
    assert clean_partial_files(tmp_path) == [tmp_path / os.path.basename(tmp)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
    assert clean_partial_files(tmp_path / "missing") == []


def test_move_aside_never_overwrites(tmp_path):
    kept = []
    for i in range(3):
        (tmp_path / "r").mkdir()
        (tmp_path / "r" / "i").write_text(str(i))
        kept.append(move_aside(tmp_path / "r"))
    assert len(set(kept)) == 3 and [(k / "i").read_text() for k in kept] == ["0", "1", "2"]
