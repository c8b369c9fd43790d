"""Shared test set-up: CPU Triton interpreter, `cuda` marker, seeding helpers.

Triton reads TRITON_INTERPRET when a kernel is decorated (at import of the
kernel module), so it is set here, before pytest imports any test module.
"""

import importlib.util
import os
import random
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    # no GPU: run Triton kernels in the interpreter on CPU tensors
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" in sys.modules:
        warnings.warn("triton was imported before tests/conftest.py set TRITON_INTERPRET=1; "
                      "kernels decorated before this point will not run on the CPU")

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)


def seed_for_test(nodeid: str) -> int:
    """A seed per test, stable across runs; ALTGRAD_TEST_SEED=N shifts every test's seed."""
    base = int(os.environ.get("ALTGRAD_TEST_SEED", "0"))
    return (zlib.crc32(nodeid.encode()) + base) % 2**32


@pytest.fixture
def seeded(request):
    """Seed Python, NumPy and torch for this test; returns the seed.

    Each test gets its own seed (fresh data per test, reproducible on re-run);
    the seed is printed in the report of a failing test.
    """
    seed = seed_for_test(request.node.nodeid)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    print(f"seed={seed}")
    return seed


@pytest.fixture
def fixture_text() -> str:
    """A few KB of Hamlet (tests/fixtures/hamlet_slice.txt)."""
    return (FIXTURES / "hamlet_slice.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def prepare_module():
    """data/shakespeare_complete_char/prepare.py imported as a module (data/ is not a package)."""
    path = REPO_ROOT / "data" / "shakespeare_complete_char" / "prepare.py"
    spec = importlib.util.spec_from_file_location("shakespeare_char_prepare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
