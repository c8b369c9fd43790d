"""Fixtures shared by the benchmark files."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a CPU benchmark module on one intra-op thread (ratios then do not depend on how many
    cores the machine happens to have free), restoring the thread count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
