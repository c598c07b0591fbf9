"""Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP threads that
spin-wait make a 4-step 64x64 generation take seconds instead of 0.1 s: use one thread here."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
