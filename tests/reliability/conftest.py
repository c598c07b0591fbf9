"""Fixtures of the reliability tests: a text-encoder-only tiny checkpoint, the factory's fake generator."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on two shared cores: one torch thread computes, two spin."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def te_checkpoint(tmp_path_factory):
    """(path, te fingerprint) of a tiny SDXL folder holding only what extraction's text side reads."""
    from luna.models.fingerprint import te_fingerprint
    from tests.extraction.conftest import write_text_encoder_checkpoint

    path = write_text_encoder_checkpoint(tmp_path_factory.mktemp("te") / "tiny-base-0", "base")
    return path, te_fingerprint(path)


@pytest.fixture(scope="session")
def fake_generators():
    """tests/factory/fakes.py, importable by Ray workers (pickled by value), as the factory tests load it."""
    name = "luna_factory_test_fakes"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "factory" / "fakes.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(module)
    return sys.modules[name]
