import pickle

import numpy as np
import pytest
import torch

from altgrad.data import DataError, DataNotFoundError, TokenBatches, check_data, load_meta


@pytest.fixture
def data_dir(tmp_path, fixture_text, prepare_module):
    out = tmp_path / "hamlet"
    prepare_module.prepare(fixture_text, out)
    return out


def draw(loader, n):
    return [loader.next_batch() for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_prepared_bins_decode_to_the_text(data_dir, fixture_text):
    meta = load_meta(data_dir)
    assert set(meta) >= {"vocab_size", "itos", "stoi"}
    assert meta["vocab_size"] == len(set(fixture_text))
    ids = np.concatenate([np.fromfile(data_dir / f"{s}.bin", dtype=np.uint16) for s in ("train", "val")])
    assert "".join(meta["itos"][int(i)] for i in ids) == fixture_text


def test_batches_are_shifted_windows_of_the_data(data_dir):
    block = 13
    data = np.fromfile(data_dir / "train.bin", dtype=np.uint16).astype(np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(data, block + 1)  # (n - block, block + 1)
    loader = TokenBatches(data_dir, "train", block_size=block, batch_size=5, device="cpu", seed=3)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (5, block) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        # the (x, y) pair is one window of block + 1 consecutive tokens
        matches = np.all(windows == np.concatenate([row_x, row_y[-1:]]), axis=1)
        assert matches.any()
        assert np.array_equal(row_x[1:], row_y[:-1])


def test_offsets_cover_the_whole_split(data_dir):
    # every window start in [0, n - block) is reachable, including the last one
    block = 8
    n = np.fromfile(data_dir / "val.bin", dtype=np.uint16).size
    loader = TokenBatches(data_dir, "val", block_size=block, batch_size=64, device="cpu", seed=0)
    data = np.fromfile(data_dir / "val.bin", dtype=np.uint16).astype(np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(data, block)
    starts = set()
    for x, _ in draw(loader, 200):
        for row in x.numpy():
            starts.update(np.flatnonzero(np.all(windows == row, axis=1)).tolist())
    assert max(starts) == n - block - 1 and min(starts) == 0


def test_same_seed_same_batches_regardless_of_global_rng(data_dir):
    a = TokenBatches(data_dir, "train", 16, 4, "cpu", seed=7)
    torch.manual_seed(123)
    first = draw(a, 4)
    b = TokenBatches(data_dir, "train", 16, 4, "cpu", seed=7)
    torch.manual_seed(456)
    torch.rand(100)  # other consumers of the global RNG must not shift the data order
    assert_same_batches(first, draw(b, 4))


def test_seeds_and_ranks_give_different_streams(data_dir):
    base = draw(TokenBatches(data_dir, "train", 16, 4, "cpu", seed=7), 3)
    other_seed = draw(TokenBatches(data_dir, "train", 16, 4, "cpu", seed=8), 3)
    other_rank = draw(TokenBatches(data_dir, "train", 16, 4, "cpu", seed=7, rank=1, world_size=2), 3)
    for other in (other_seed, other_rank):
        assert not all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(base, other))


def test_resume_continues_identically(data_dir, tmp_path):
    straight = TokenBatches(data_dir, "train", 16, 4, "cpu", seed=11)
    expected = draw(straight, 6)

    first_half = TokenBatches(data_dir, "train", 16, 4, "cpu", seed=11)
    draw(first_half, 3)
    torch.save(first_half.state_dict(), tmp_path / "data_state.pt")
    resumed = TokenBatches(data_dir, "train", 16, 4, "cpu", seed=11)
    resumed.load_state_dict(torch.load(tmp_path / "data_state.pt", weights_only=True))
    assert resumed.batches_drawn == 3
    assert_same_batches(expected[3:], draw(resumed, 3))


def test_rank_zero_state_resumes_another_rank_on_its_own_stream(data_dir):
    # a DDP checkpoint is written by rank 0; rank 1 must continue its own sequence
    rank1 = TokenBatches(data_dir, "train", 16, 4, "cpu", seed=5, rank=1, world_size=2)
    expected = draw(rank1, 5)[2:]
    rank0 = TokenBatches(data_dir, "train", 16, 4, "cpu", seed=5, rank=0, world_size=2)
    draw(rank0, 2)
    resumed = TokenBatches(data_dir, "train", 16, 4, "cpu", seed=5, rank=1, world_size=2)
    resumed.load_state_dict(rank0.state_dict())
    assert_same_batches(expected, draw(resumed, 3))


def test_load_state_dict_rejects_a_foreign_state(data_dir):
    train = TokenBatches(data_dir, "train", 16, 4, "cpu", seed=5)
    val = TokenBatches(data_dir, "val", 16, 4, "cpu", seed=5)
    with pytest.raises(ValueError, match="split"):
        val.load_state_dict(train.state_dict())
    with pytest.raises(ValueError, match="seed"):
        TokenBatches(data_dir, "train", 16, 4, "cpu", seed=6).load_state_dict(train.state_dict())
    with pytest.raises(ValueError, match="batch_size"):
        TokenBatches(data_dir, "train", 16, 2, "cpu", seed=5, rank=1, world_size=2).load_state_dict(
            train.state_dict())
    with pytest.raises(ValueError, match="lacks keys"):
        train.load_state_dict({"split": "train"})


def test_missing_data_dir_says_how_to_prepare(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataNotFoundError) as info:
        TokenBatches(missing, "train", 16, 4, "cpu", seed=0)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "\n" not in message and str(missing / "train.bin") in message
    assert f"data/shakespeare_complete_char/prepare.py --input YOUR_TEXT.txt --out {missing}" in message
    with pytest.raises(DataNotFoundError, match="prepare.py"):
        load_meta(missing)


def test_missing_bins_point_at_the_directorys_own_prepare_script(tmp_path):
    (tmp_path / "prepare.py").write_text("")
    with pytest.raises(DataNotFoundError, match=f"`python {tmp_path / 'prepare.py'}`"):
        TokenBatches(tmp_path, "val", 16, 4, "cpu", seed=0)


def test_load_meta_without_meta_file_is_none(data_dir):
    (data_dir / "meta.pkl").unlink()
    assert load_meta(data_dir) is None
    meta = {"vocab_size": 2, "itos": {0: "a", 1: "b"}, "stoi": {"a": 0, "b": 1}}
    with open(data_dir / "meta.pkl", "wb") as f:
        pickle.dump(meta, f)
    assert load_meta(data_dir) == meta


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="test"), "split must be one of"),
    (dict(block_size=0), "block_size"),
    (dict(block_size=100_000), "block_size must be smaller"),
    (dict(batch_size=2.0), "batch_size"),
    (dict(rank=2, world_size=2), "rank"),
    (dict(seed=-1), "seed"),
])
def test_bad_arguments(data_dir, kwargs, match):
    args = dict(split="train", block_size=16, batch_size=4, device="cpu", seed=0)
    with pytest.raises(ValueError, match=match):
        TokenBatches(data_dir, **{**args, **kwargs})


@pytest.mark.cuda
def test_cuda_batches_equal_cpu_batches(data_dir):
    cpu = draw(TokenBatches(data_dir, "train", 16, 4, "cpu", seed=2), 3)
    cuda = draw(TokenBatches(data_dir, "train", 16, 4, "cuda", seed=2), 3)
    assert all(x.is_cuda and y.is_cuda for x, y in cuda)
    assert_same_batches(cpu, [(x.cpu(), y.cpu()) for x, y in cuda])


# ---- check_data: everything a run needs from the data, before it writes anything ------------------


def _vocab(data_dir):
    return load_meta(data_dir)["vocab_size"]


def test_check_data_accepts_prepared_data_and_returns_its_meta(data_dir):
    assert check_data(data_dir, 16, None) == load_meta(data_dir)
    assert check_data(data_dir, 16, _vocab(data_dir) + 7)["vocab_size"] == _vocab(data_dir)


def _damage(data_dir, how):
    if how == "odd train.bin":
        path = data_dir / "train.bin"
        path.write_bytes(path.read_bytes()[:-1])
    elif how == "empty val.bin":
        (data_dir / "val.bin").write_bytes(b"")
    elif how == "missing val.bin":
        (data_dir / "val.bin").unlink()
    elif how == "garbage meta.pkl":
        (data_dir / "meta.pkl").write_bytes(b"\x80\x04garbage")
    elif how == "meta.pkl without vocab_size":
        (data_dir / "meta.pkl").write_bytes(pickle.dumps({"stoi": {}}))
    elif how == "missing meta.pkl":
        (data_dir / "meta.pkl").unlink()


@pytest.mark.parametrize("how, error, message", [
    ("odd train.bin", DataError, "train.bin: {n} bytes is not a whole number of 2-byte tokens"),
    ("empty val.bin", DataError, "val.bin holds 0 tokens; model.block_size=16 needs at least 17"),
    ("missing val.bin", DataNotFoundError, "no {dir}/val.bin: create it with"),
    ("garbage meta.pkl", DataError, "meta.pkl: not a readable meta.pkl (UnpicklingError"),
    ("meta.pkl without vocab_size", DataError, "expected a pickled dict with an int vocab_size >= 1"),
    ("missing meta.pkl", DataError, "has no meta.pkl, so the vocabulary size is unknown: set model.vocab_size"),
])
def test_check_data_refuses_damaged_data_in_one_line(data_dir, how, error, message):
    n = (data_dir / "train.bin").stat().st_size - 1
    _damage(data_dir, how)
    with pytest.raises(error) as info:
        check_data(data_dir, 16, None)
    assert message.format(n=n, dir=data_dir) in str(info.value) and "\n" not in str(info.value)


def test_missing_meta_is_fine_when_the_vocabulary_is_given(data_dir):
    vocab = _vocab(data_dir)
    (data_dir / "meta.pkl").unlink()
    assert check_data(data_dir, 16, vocab) is None


def test_block_size_must_fit_the_smallest_split(data_dir):
    val_tokens = (data_dir / "val.bin").stat().st_size // 2
    check_data(data_dir, val_tokens - 1, None)
    with pytest.raises(DataError, match=f"val.bin holds {val_tokens} tokens; model.block_size={val_tokens} needs"):
        check_data(data_dir, val_tokens, None)


def test_every_token_id_must_be_inside_the_vocabulary(data_dir, monkeypatch):
    import altgrad.data

    top = int(max(np.fromfile(data_dir / s, dtype=np.uint16).max() for s in ("train.bin", "val.bin")))
    with pytest.raises(DataError, match=f"holds token id {top}, outside model.vocab_size={top}"):
        check_data(data_dir, 16, top)
    check_data(data_dir, 16, top + 1)
    # a token id past meta.pkl's vocabulary, found even when it sits in the last of several chunks
    ids = np.fromfile(data_dir / "val.bin", dtype=np.uint16)
    ids[-1] = 999
    ids.tofile(data_dir / "val.bin")
    monkeypatch.setattr(altgrad.data, "_SCAN_CHUNK", 7)
    with pytest.raises(DataError, match=r"val.bin holds token id 999, outside meta.pkl's vocab_size="):
        check_data(data_dir, 16, None)
