import pickle

import numpy as np
import pytest
import torch

from altgrad.data import DataNotFoundError, TokenBatches, load_meta


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
    assert f"data/shakespeare_char/prepare.py --input YOUR_TEXT.txt --out {missing}" in message
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
