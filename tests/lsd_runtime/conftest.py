"""Fixtures shared by the runtime's tests: the tiny preset's components and a crop embedder on them."""
import pytest


@pytest.fixture(scope="module")
def comps():
    from lsd_runtime.workflow import tiny_components

    return tiny_components()


@pytest.fixture(scope="module")
def embedder(comps):
    from lsd_runtime.conditioning import CropEmbedder

    return CropEmbedder(comps.vision)
