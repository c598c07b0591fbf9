"""Every test here runs its tiny models on one torch thread (tests/conftest.py: one_torch_thread)."""
import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="session")
def files(tiny_dir):
    """The session's tiny checkpoints by name: (single file, diffusers folder)."""
    single = sorted((tiny_dir / "single").glob("*.safetensors"))
    folders = sorted(p for p in (tiny_dir / "diffusers").iterdir() if p.is_dir())
    assert [p.stem for p in single] == [p.name for p in folders] == ["tiny-base-0", "tiny-pony-1"]
    return dict(zip([p.stem for p in single], zip(single, folders)))
