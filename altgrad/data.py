"""Token batches from nanoGPT-style ``train.bin`` / ``val.bin`` files.

A data directory holds ``train.bin`` and ``val.bin`` (flat uint16 token ids,
written by ``data/<name>/prepare.py``) and, for char-level data, ``meta.pkl``
({vocab_size, itos, stoi}). Batches are random windows of ``block_size + 1``
tokens, as nanoGPT's ``get_batch``, with two additions:

- the window offsets come from a private ``torch.Generator`` seeded with
  ``seed + rank``, so the data order depends only on the seed (not on whatever
  else consumed the global RNG) and every DDP rank draws its own stream;
- the position (generator state + number of batches drawn) is saved with
  ``state_dict()`` so a resumed run continues with exactly the batches the
  uninterrupted run would have drawn.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

__all__ = ["DataError", "DataNotFoundError", "TokenBatches", "check_data", "load_meta", "prepare_command"]

SPLITS = ("train", "val")


class DataNotFoundError(FileNotFoundError):
    """A data directory or one of its .bin files is missing; the message says how to make it."""


class DataError(ValueError):
    """Data that exists but cannot be trained on (sizes, token ids, meta.pkl); one-line message."""


def prepare_command(data_dir) -> str:
    """The command that writes data_dir's bins (its own prepare.py when there is one)."""
    data_dir = Path(data_dir)
    own = data_dir / "prepare.py"
    if own.is_file():
        return f"python {own}"
    # any other directory: prepare a text file of the user's into it
    return f"python data/shakespeare_complete_char/prepare.py --input YOUR_TEXT.txt --out {data_dir}"


def _bin_path(data_dir, split) -> Path:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise DataNotFoundError(f"no {path}: create it with `{prepare_command(data_dir)}`")
    return path


def load_meta(data_dir) -> dict | None:
    """meta.pkl of a data directory ({vocab_size, itos, stoi}), or None when it has none.

    None is what BPE data looks like (nanoGPT writes meta.pkl only for char-level sets).
    Raises DataNotFoundError without the directory, DataError when meta.pkl is not a pickled
    dict with a positive int `vocab_size`.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataNotFoundError(f"no data directory {data_dir}: create it with `{prepare_command(data_dir)}`")
    path = data_dir / "meta.pkl"
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            meta = pickle.load(f)
    except Exception as e:  # truncated, not a pickle, ...
        raise DataError(f"{path}: not a readable meta.pkl ({type(e).__name__}: {str(e).strip()[:80]}); "
                        f"rewrite it with `{prepare_command(data_dir)}`") from None
    vocab = meta.get("vocab_size") if isinstance(meta, dict) else None
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise DataError(f"{path}: expected a pickled dict with an int vocab_size >= 1 (as prepare.py writes), "
                        f"got {type(meta).__name__}" + (f" with vocab_size={vocab!r}" if isinstance(meta, dict) else ""))
    return meta


_SCAN_CHUNK = 1 << 26  # tokens per chunk when scanning a split for its largest id (128 MB of uint16)


def _max_token(path: Path, num_tokens: int, dtype) -> int:
    data = np.memmap(path, dtype=dtype, mode="r", shape=(num_tokens,))
    return max(int(data[i:i + _SCAN_CHUNK].max()) for i in range(0, num_tokens, _SCAN_CHUNK))


def check_data(data_dir, block_size: int, vocab_size: int | None, dtype=np.uint16) -> dict | None:
    """Check a data directory before a run writes anything; returns its meta.pkl (or None).

    Every split must exist, hold whole tokens (a size that is a multiple of the token size) and
    more than `block_size` of them (one window plus its shifted target), and no token id may
    reach the vocabulary: `vocab_size`, or meta.pkl's when `vocab_size` is None. Without
    meta.pkl the vocabulary must be given (GPT-2 BPE data: model.vocab_size: 50304, GPT-2's
    50257 padded to a multiple of 64): a silent default would change the model's size.
    Each split is read once in chunks to find its largest token id (seconds for billions of tokens).

    Raises DataNotFoundError (a directory or split is missing) or DataError (one-line messages).
    """
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    paths = [_bin_path(data_dir, split) for split in SPLITS]  # missing data first: its message says how to make it
    if vocab_size is None:
        if meta is None:
            raise DataError(f"{data_dir} has no meta.pkl, so the vocabulary size is unknown: set model.vocab_size "
                            f"(50304 for GPT-2 BPE tokens), or write meta.pkl with `{prepare_command(data_dir)}`")
        vocab_size, vocab_from = meta["vocab_size"], f"meta.pkl's vocab_size={meta['vocab_size']}"
    else:
        vocab_from = f"model.vocab_size={vocab_size}"
    itemsize = np.dtype(dtype).itemsize
    for path in paths:
        size = os.path.getsize(path)
        if size % itemsize:
            raise DataError(f"{path}: {size} bytes is not a whole number of {itemsize}-byte tokens "
                            f"(a truncated write?); rewrite it with `{prepare_command(data_dir)}`")
        num_tokens = size // itemsize
        if num_tokens <= block_size:
            raise DataError(f"{path} holds {num_tokens} tokens; model.block_size={block_size} needs at least "
                            f"{block_size + 1}: use a smaller block_size or more data")
        top = _max_token(path, num_tokens, dtype)
        if top >= vocab_size:
            raise DataError(f"{path} holds token id {top}, outside {vocab_from}: the vocabulary must be larger "
                            f"than every token id (set model.vocab_size >= {top + 1}, or fix meta.pkl)")
    return meta


class TokenBatches:
    """Random (x, y) batches of one split, reproducible and resumable.

    x, y: int64 tensors of shape (batch_size, block_size) on ``device``; y is x
    shifted by one token. ``seed + rank`` seeds the offsets; ``world_size`` is
    only checked (each rank samples the whole split independently, as nanoGPT).
    """

    def __init__(self, data_dir, split, block_size, batch_size, device="cpu", seed=0,
                 rank=0, world_size=1, dtype=np.uint16):
        for name, value in (("block_size", block_size), ("batch_size", batch_size),
                            ("world_size", world_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.path = _bin_path(data_dir, split)
        self.data_dir, self.split = Path(data_dir), split
        self.block_size, self.batch_size = block_size, batch_size
        self.device = torch.device(device)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.dtype = np.dtype(dtype)
        self.num_tokens = os.path.getsize(self.path) // self.dtype.itemsize
        if self.num_tokens <= block_size:
            raise ValueError(
                f"{self.path} holds {self.num_tokens} tokens; block_size must be smaller, got {block_size}"
            )
        self._generator = torch.Generator().manual_seed(seed + rank)
        self.batches_drawn = 0

    def _offsets(self) -> torch.Tensor:
        # window starts in [0, num_tokens - block_size): x and its shifted y both fit
        return torch.randint(self.num_tokens - self.block_size, (self.batch_size,),
                             generator=self._generator)

    def next_batch(self):
        # a fresh memmap per batch, as nanoGPT: a long-lived one keeps every page it
        # touched resident, so memory grows with the data set (stackoverflow.com/q/45132940)
        data = np.memmap(self.path, dtype=self.dtype, mode="r")
        ix = self._offsets().tolist()
        x = torch.from_numpy(np.stack([data[i:i + self.block_size] for i in ix]).astype(np.int64))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + self.block_size] for i in ix]).astype(np.int64))
        del data
        self.batches_drawn += 1
        if self.device.type == "cuda":
            # pinned host memory lets the copy overlap with compute
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.to(self.device), y.to(self.device)

    def state_dict(self) -> dict:
        return {
            "split": self.split,
            "seed": self.seed,
            "rank": self.rank,
            "block_size": self.block_size,
            "batch_size": self.batch_size,
            "num_tokens": self.num_tokens,
            "batches_drawn": self.batches_drawn,
            "generator_state": self._generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position.

        Same rank: the generator state is restored as saved. Another rank (a DDP
        checkpoint is written by rank 0 only): this rank's own stream is replayed
        to the same number of batches, which needs the same split, seed, shapes
        and data size.
        """
        missing = {"split", "seed", "rank", "batches_drawn", "generator_state"} - set(state)
        if missing:
            raise ValueError(f"TokenBatches state lacks keys {sorted(missing)}")
        for key in ("split", "seed"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"TokenBatches state was saved with {key}={state[key]!r}, this loader has {getattr(self, key)!r}"
                )
        if state["rank"] == self.rank:
            self._generator.set_state(state["generator_state"])
        else:
            for key in ("block_size", "batch_size", "num_tokens"):
                if state.get(key) != getattr(self, key):
                    raise ValueError(
                        f"cannot replay rank {state['rank']}'s data position on rank {self.rank}: "
                        f"{key} was {state.get(key)!r}, now {getattr(self, key)!r}"
                    )
            self._generator.manual_seed(self.seed + self.rank)
            for _ in range(state["batches_drawn"]):
                self._offsets()
        self.batches_drawn = int(state["batches_drawn"])
