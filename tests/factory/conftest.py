"""Factory test helpers: the fake generator module, importable by Ray workers (pickled by value)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fakes():
    name = "luna_factory_test_fakes"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("fakes.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        from ray import cloudpickle

        cloudpickle.register_pickle_by_value(module)
    return sys.modules[name]
