import dataclasses
import os
import random

import numpy as np
import pytest
import torch

from altgrad.data import TokenBatches, load_meta
from altgrad.model import GPT, GPTConfig
from altgrad.reproducibility import (
    get_rng_state,
    set_rng_state,
    set_seed_for_reproducibility,
)

TINY = GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16)


@pytest.fixture(autouse=True)
def restore_global_flags():
    """set_seed_for_reproducibility changes process-wide flags; give other tests theirs back."""
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
    if saved[4] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4]


def draws():
    """One draw from every global generator."""
    return (random.random(), np.random.rand(3).tolist(), torch.rand(4), torch.randn(2, 3))


def assert_draws_equal(a, b):
    assert a[0] == b[0] and a[1] == b[1]
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])


def assert_draws_all_differ(a, b):
    assert a[0] != b[0] and a[1] != b[1]
    assert not torch.equal(a[2], b[2]) and not torch.equal(a[3], b[3])


def test_same_seed_same_draws_different_seed_different_draws():
    set_seed_for_reproducibility(1234)
    a = draws()
    set_seed_for_reproducibility(1234)
    b = draws()
    set_seed_for_reproducibility(1235)
    c = draws()
    assert_draws_equal(a, b)
    assert_draws_all_differ(a, c)


def test_same_seed_same_gpt_init():
    set_seed_for_reproducibility(42)
    a = GPT(TINY).state_dict()
    set_seed_for_reproducibility(42)
    b = GPT(TINY).state_dict()
    set_seed_for_reproducibility(43)
    c = GPT(TINY).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["transformer.wte.weight"], c["transformer.wte.weight"])


def test_two_ablation_arms_start_identically(tmp_path, fixture_text, prepare_module):
    # what a format sweep relies on: same seed -> same weights and same batches,
    # however much global randomness the first arm consumed in between
    prepare_module.prepare(fixture_text, tmp_path)
    config = dataclasses.replace(TINY, vocab_size=load_meta(tmp_path)["vocab_size"])

    def start_run(seed):
        set_seed_for_reproducibility(seed)
        model = GPT(config)
        batches = TokenBatches(tmp_path, "train", 8, 4, "cpu", seed=seed)
        return model, [batches.next_batch() for _ in range(3)]

    model_a, batches_a = start_run(7)
    torch.rand(1000)  # arm A trains, dropout and stochastic rounding consume the global RNG
    model_b, batches_b = start_run(7)
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(pa, pb), name
    for (xa, ya), (xb, yb) in zip(batches_a, batches_b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    idx = batches_a[0][0]
    assert torch.equal(model_a(idx, idx)[0], model_b(idx, idx)[0])


def test_deterministic_flags():
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    set_seed_for_reproducibility(0)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    set_seed_for_reproducibility(0, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.backends.cudnn.deterministic


def test_users_cublas_workspace_setting_is_kept():
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    set_seed_for_reproducibility(0)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, True, "1"])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*32\)"):
        set_seed_for_reproducibility(seed)


def test_seed_accepts_the_range_ends():
    draws = {}
    for seed in (0, 2**32 - 1, np.int64(5)):
        for _ in range(2):  # accepted, and it really seeds: the same draws twice
            set_seed_for_reproducibility(seed, deterministic=False)
            draw = (torch.rand(3).tolist(), np.random.rand(), random.random())
            assert draws.setdefault(int(seed), draw) == draw
    assert len({str(d) for d in draws.values()}) == 3


# ---------------------------------------------------------------- RNG state capture

def test_rng_state_round_trip(seeded):
    state = get_rng_state()
    expected = draws()
    draws()  # move every generator on
    set_rng_state(state)
    assert_draws_equal(draws(), expected)


def test_rng_state_survives_weights_only_checkpoint(seeded, tmp_path):
    np.random.randn()  # leave a cached Gaussian in NumPy's legacy state
    state = get_rng_state()
    torch.save({"rng": state}, tmp_path / "ckpt.pt")
    expected = draws() + (np.random.randn(),)
    draws()
    set_rng_state(torch.load(tmp_path / "ckpt.pt", weights_only=True)["rng"])
    got = draws() + (np.random.randn(),)
    assert_draws_equal(got, expected)
    assert got[4] == expected[4]


def test_set_rng_state_missing_keys():
    with pytest.raises(ValueError, match=r"lacks keys \['cuda', 'numpy'\]"):
        set_rng_state({"python": random.getstate(), "torch": torch.get_rng_state()})


@pytest.mark.cuda
def test_cuda_rng_state_round_trip():
    state = get_rng_state()
    assert state["cuda"] is not None
    expected = torch.rand(5, device="cuda")
    torch.rand(5, device="cuda")
    set_rng_state(state)
    assert torch.equal(torch.rand(5, device="cuda"), expected)
