"""Noise scaffold: white-noise statistics for every resampling case, exact round trip, seeds, files."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lsd_runtime.scaffold import (
    FORMAT_VERSION,
    NoiseScaffold,
    ScaffoldFileError,
    derived_generator,
    resample_noise,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _noise(shape, seed=0) -> torch.Tensor:
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float32)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.double().flatten() - a.double().mean()
    b = b.double().flatten() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def assert_white(x: torch.Tensor, sigmas: float = 5.0) -> None:
    """Mean 0, std 1, uncorrelated horizontal and vertical neighbours (sampling tolerance)."""
    n = x.numel()
    assert abs(float(x.mean())) < sigmas / math.sqrt(n), f"mean {float(x.mean())}"
    assert abs(float(x.std()) - 1.0) < sigmas / math.sqrt(2 * n), f"std {float(x.std())}"
    tol = sigmas / math.sqrt(n)
    ch = _corr(x[..., :, :-1], x[..., :, 1:])
    cv = _corr(x[..., :-1, :], x[..., 1:, :])
    assert abs(ch) < tol and abs(cv) < tol, f"neighbour correlation h={ch:.4f} v={cv:.4f} (tol {tol:.4f})"


# (source side, target side): every case of DESIGN §3, each giving 4 x 128 x 128 samples
CASES = {
    "identity": (128, 128),
    "integer_down_2": (256, 128),
    "integer_down_4": (512, 128),
    "noninteger_down": (200, 128),
    "integer_up_4": (32, 128),
    "noninteger_up": (48, 128),  # gcd 16: 8 sub-cells per source cell, bins of 3
    "noninteger_up_coprime": (75, 128),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_resampled_noise_stays_white(case):
    n, m = CASES[case]
    x = _noise((4, n, n), seed=1)
    y = resample_noise(x, (m, m), _gen(2))
    assert y.shape == (4, m, m) and y.dtype == torch.float32
    assert_white(y)


def test_statistics_check_catches_correlated_resizing():
    # the tolerance is tight enough to reject what DESIGN §3 warns against
    x = _noise((4, 200, 200), seed=3)
    area = F.interpolate(x[None], size=(128, 128), mode="area")[0]
    area = area / area.std()  # even rescaled to unit std, the overlapping windows correlate neighbours
    with pytest.raises(AssertionError, match="neighbour correlation"):
        assert_white(area)
    nearest = F.interpolate(_noise((4, 32, 32))[None], size=(128, 128), mode="nearest")[0]
    with pytest.raises(AssertionError, match="neighbour correlation"):
        assert_white(nearest)


def test_integer_downscale_is_block_mean_times_factor():
    x = _noise((4, 64, 64), seed=4)
    y = resample_noise(x, (16, 16))
    ref = x.reshape(4, 16, 4, 16, 4).mean(dim=(2, 4)) * 4
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)


def test_noninteger_downscale_uses_disjoint_bins():
    # each source cell reaches exactly one target cell (overlapping windows would spread it),
    # with weight 1/sqrt(cells in that bin), so every target has unit variance
    n, m = 10, 7
    target, value = {}, {}
    for i in range(n):
        for j in range(n):
            x = torch.zeros(1, n, n)
            x[0, i, j] = 1.0
            y = resample_noise(x, (m, m))[0]
            nz = torch.nonzero(y)
            assert len(nz) == 1, f"source ({i},{j}) spread over {len(nz)} targets"
            target[i, j] = (int(nz[0, 0]), int(nz[0, 1]))
            value[i, j] = float(y[nz[0, 0], nz[0, 1]])
    counts = {}
    for t in target.values():
        counts[t] = counts.get(t, 0) + 1
    assert len(counts) == m * m
    for src, t in target.items():
        assert math.isclose(value[src], 1.0 / math.sqrt(counts[t]), rel_tol=1e-6)


@pytest.mark.parametrize("k", [2, 3, 8])
def test_integer_upscale_round_trips_exactly(k):
    x = _noise((4, 12, 10), seed=5)
    up = resample_noise(x, (12 * k, 10 * k), _gen(6))
    back = resample_noise(up, (12, 10))
    torch.testing.assert_close(back, x, rtol=0, atol=1e-5)
    assert not torch.allclose(up[:, :k, :k], up[:, :1, :1].expand(4, k, k)), "sub-cells must not be copies"


def test_mixed_axes_round_trip():
    # shrink along H, grow along W: each axis follows its own rule and both invert
    x = _noise((4, 16, 8), seed=7)
    y = resample_noise(x, (8, 24), _gen(8))
    back = resample_noise(y, (16, 8), _gen(9))
    assert y.shape == (4, 8, 24)
    # W was grown by 3 and shrinks back exactly; H was halved: compare after halving the source too
    torch.testing.assert_close(resample_noise(back, (8, 8)), resample_noise(x, (8, 8)), rtol=0, atol=1e-5)


def test_noninteger_upscale_preserves_source_integrals():
    # 8 -> 12 cells per side: 2 source cells span exactly 3 target cells, and the white-noise
    # integral over that span is kept (sum of 2x2 sources x 3 == sum of 3x3 targets x 2)
    x = _noise((2, 8, 8), seed=10)
    y = resample_noise(x, (12, 12), _gen(11))
    xb = x.reshape(2, 4, 2, 4, 2).sum(dim=(2, 4))
    yb = y.reshape(2, 4, 3, 4, 3).sum(dim=(2, 4))
    torch.testing.assert_close(yb * 2, xb * 3, rtol=0, atol=1e-4)
    # the whole-canvas integral too, for coprime sizes (3 -> 8)
    z = resample_noise(x[:, :3, :3], (8, 8), _gen(12))
    assert math.isclose(float(x[:, :3, :3].sum()) / 3, float(z.sum()) / 8, rel_tol=1e-5, abs_tol=1e-5)


def test_same_size_returns_a_copy_and_half_precision_is_upcast():
    x = _noise((4, 8, 8))
    y = resample_noise(x, (8, 8))
    assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()
    assert resample_noise(x.half(), (4, 4)).dtype == torch.float32


def test_upscale_without_generator_is_an_error():
    with pytest.raises(ValueError, match="Generator"):
        resample_noise(_noise((4, 8, 8)), (16, 16))


def test_scaffold_shape_for_4k_and_odd_sizes():
    assert tuple(NoiseScaffold(0, (4096, 4096)).noise.shape) == (4, 512, 512)
    s = NoiseScaffold(0, (100, 60))
    assert tuple(s.noise.shape) == (4, 8, 13) and s.noise.dtype == torch.float32


def test_same_seed_same_noise_and_same_slice():
    a, b, c = NoiseScaffold(42, (512, 512)), NoiseScaffold(42, (512, 512)), NoiseScaffold(43, (512, 512))
    assert torch.equal(a.noise, b.noise) and not torch.equal(a.noise, c.noise)
    box = (64, 128, 192, 256)  # 16 latent cells -> upscaled to 48
    s1, s2 = a.slice(box, (48, 48)), b.slice(box, (48, 48))
    assert torch.equal(s1, s2)
    assert not torch.equal(s1, a.slice((72, 128, 200, 256), (48, 48)))
    assert not torch.equal(s1, c.slice(box, (48, 48)))


def test_slice_one_to_one_is_the_scaffold_region():
    s = NoiseScaffold(5, (512, 512))
    box = (128, 64, 256, 320)
    assert torch.equal(s.slice(box), s.noise[:, 8:40, 16:32])
    assert torch.equal(s.slice(box, (32, 16)), s.noise[:, 8:40, 16:32])
    # an off-grid box widens to the latent cells it touches
    assert s.slice((3, 3, 13, 13)).shape == (4, 2, 2)


def test_slice_upscaled_then_downscaled_gives_the_scaffold_back():
    s = NoiseScaffold(6, (512, 512))
    box = (64, 64, 192, 192)  # 16 x 16 latent cells
    up = s.slice(box, (64, 64))
    torch.testing.assert_close(resample_noise(up, (16, 16)), s.slice(box), rtol=0, atol=1e-5)


def test_slice_reaches_the_padded_edge_of_an_odd_canvas():
    s = NoiseScaffold(3, (100, 60))  # the runtime pads this canvas to 104 x 64
    assert torch.equal(s.slice((96, 56, 104, 64)), s.noise[:, 7:8, 12:13])


def test_slice_outside_canvas_is_an_error():
    s = NoiseScaffold(0, (256, 256))
    with pytest.raises(ValueError, match="outside"):
        s.slice((200, 200, 300, 300), (8, 8))
    with pytest.raises(ValueError, match="empty"):
        s.slice((10, 10, 10, 20), (8, 8))


def test_draft_latent_from_the_whole_scaffold():
    s = NoiseScaffold(8, (1024, 1024))  # 128 latent cells
    draft = s.latent_for_size(256, 256)
    ref = s.noise.reshape(4, 32, 4, 32, 4).mean(dim=(2, 4)) * 4
    torch.testing.assert_close(draft, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(s.downscaled(4), draft, rtol=0, atol=0)
    smooth = s.latent_for_size(384, 384)  # the 1.5x pass: non-integer factor
    assert smooth.shape == (4, 48, 48)
    assert torch.equal(smooth, s.latent_for_size(384, 384))


def test_save_load_round_trip(tmp_path):
    s = NoiseScaffold(1234, (520, 264))
    path = s.save(tmp_path / "sub" / "scaffold.safetensors")
    t = NoiseScaffold.load(path)
    assert t.seed == 1234 and t.pixel_size == (520, 264)
    assert torch.equal(t.noise, s.noise)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format_version"] == str(FORMAT_VERSION)
    assert not list(tmp_path.glob("**/*.tmp"))


def test_load_rejects_bad_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ScaffoldFileError, match="no such"):
        NoiseScaffold.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ScaffoldFileError, match="junk.safetensors"):
        NoiseScaffold.load(junk)
    future = tmp_path / "future.safetensors"
    save_file({"noise": torch.zeros(4, 2, 2)}, str(future), metadata={"format_version": "99", "seed": "1",
                                                                       "pixel_width": "16", "pixel_height": "16"})
    with pytest.raises(ScaffoldFileError, match="format_version"):
        NoiseScaffold.load(future)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"noise": torch.zeros(4, 3, 2)}, str(wrong), metadata={"format_version": str(FORMAT_VERSION), "seed": "1",
                                                                      "pixel_width": "16", "pixel_height": "16"})
    with pytest.raises(ScaffoldFileError, match="wrong.safetensors"):
        NoiseScaffold.load(wrong)


def test_derived_generator_is_stable():
    a = torch.randn(5, generator=derived_generator("slice", 1, (0, 0, 8, 8)))
    b = torch.randn(5, generator=derived_generator("slice", 1, (0, 0, 8, 8)))
    c = torch.randn(5, generator=derived_generator("slice", 2, (0, 0, 8, 8)))
    assert torch.equal(a, b) and not torch.equal(a, c)
