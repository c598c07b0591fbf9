"""Every test here runs its tiny models on one torch thread (tests/conftest.py: one_torch_thread)."""
import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield
