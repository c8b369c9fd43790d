"""Seeding and RNG-state capture, so format ablations start from identical states.

Two runs that differ only in their quantization config and share a seed get
the same initial weights and the same data order (``altgrad.data`` has its own
seeded generator); their outputs then differ only by quantization. RNG states
are captured as tensors and plain Python objects, so a checkpoint holding them
loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = [
    "set_seed_for_reproducibility",
    "get_rng_state",
    "set_rng_state",
]

# cuBLAS needs a fixed workspace configuration to be deterministic (CUDA >= 10.2);
# see https://docs.nvidia.com/cuda/cublas/#results-reproducibility
_CUBLAS_WORKSPACE = ":4096:8"


def _check_seed(seed) -> int:
    # numpy's legacy seeding accepts [0, 2**32); hold every library to that range
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    return int(seed)


def set_seed_for_reproducibility(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch (CPU and every CUDA device).

    deterministic=True also selects deterministic kernels: cuDNN deterministic
    with autotuning (benchmark) off, ``CUBLAS_WORKSPACE_CONFIG`` (kept if the
    user set one; it only takes effect if set before the first cuBLAS call, so
    call this early), and ``torch.use_deterministic_algorithms(True,
    warn_only=True)`` — ops without a deterministic implementation warn
    instead of failing. deterministic=False restores torch's defaults.
    """
    seed = _check_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device (lazily if CUDA is not yet initialised)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", _CUBLAS_WORKSPACE)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(False)


def get_rng_state() -> dict:
    """Every global RNG state: {"python", "numpy", "torch", "cuda"} ("cuda" is None without CUDA).

    NumPy's state is stored as a dict with its key as an int64 tensor rather
    than an ndarray, so the result survives ``torch.load(weights_only=True)``.
    """
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    """Restore states captured by ``get_rng_state``.

    A CUDA state is restored on as many devices as both the state and this
    machine have; a CUDA state loaded on a CPU-only machine is ignored (there is
    no CUDA generator to restore).
    """
    missing = {"python", "numpy", "torch", "cuda"} - set(state)
    if missing:
        raise ValueError(f"set_rng_state: state lacks keys {sorted(missing)}")
    python_state = state["python"]
    # torch.load may hand tuples back as lists; random.setstate needs tuples
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    np_state = state["numpy"]
    np.random.set_state({
        "bit_generator": np_state["bit_generator"],
        "state": {"key": np.asarray(np_state["key"], dtype=np.int64).astype(np.uint32),
                  "pos": int(np_state["pos"])},
        "has_gauss": int(np_state["has_gauss"]),
        "gauss": float(np_state["gauss"]),
    })
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
