"""The noise scaffold: one seeded latent-space noise field for the whole 4K canvas.

The draft, the detailer and the global refiner all take their initial noise from this one
field, resampled to their own latent size, so texture stays consistent across scales.

Resampling rules (DESIGN.md §3), applied separably per axis (each rule factorises into an
H pass and a W pass, so a box may even be shrunk along one axis and grown along the other):

- same size: the slice itself (the global refiner's 1:1 tiles).
- downscale, integer factor s: block mean x s (= block sum / sqrt(s*s)), unit variance.
- downscale, other factors: every source cell falls into exactly one target bin
  (bin = floor(i * m / n)); bin sum / sqrt(count). Bins are disjoint, so target cells
  stay independent with unit variance (an area filter would overlap windows and correlate
  neighbours).
- upscale, integer factor k: conditional integral upsampling. Per axis a source cell x
  becomes k cells X_i = x / sqrt(k) + (Z_i - mean(Z)) with Z iid N(0, 1); the two axis
  passes together have the law of the 2-D rule X = x / k + (Z - mean_block(Z)) (a k x k
  block conditioned on its mean). Unit variance, no covariance between sub-cells, and the
  integer downscale maps X back to x exactly.
- upscale, other factors (n -> m, m > n): the exact integral construction on the common
  refinement. With g = gcd(n, m), every source cell is conditionally upsampled into m/g
  sub-cells, and every target cell is the disjoint bin of n/g consecutive sub-cells
  (sum / sqrt(n/g)). Each target cell is then the white-noise integral over exactly its
  own area: unit variance, independent neighbours, and the source integrals preserved.
  Only the sums of the pieces between source and target boundaries are drawn (their exact
  joint law), so the cost is O(n + m) per row, not O(n * m / g).
  The disjoint-bin downscale does not invert it exactly (target cells straddle source
  cells); only integer factors round-trip exactly.

The fresh randomness that upscaling needs comes from a generator seeded from
(scaffold seed, box, size), so the same box at the same size always gets the same noise.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch

from lsd_runtime.geometry import latent_box
from luna.files import atomic_path

FORMAT_VERSION = 1
LATENT_CHANNELS = 4
LATENT_SCALE = 8  # pixels per latent cell (SDXL VAE)


class ScaffoldFileError(ValueError):
    """A scaffold file that cannot be read as a noise scaffold (names the file)."""


# --------------------------------------------------------------------------- pure resampling


def _bin_sum(x: torch.Tensor, dim: int, m: int) -> torch.Tensor:
    """Disjoint bins along `dim`: source i -> bin floor(i*m/n); returns sum / sqrt(count)."""
    n = x.shape[dim]
    xt = x.movedim(dim, -1)
    if n % m == 0:  # equal bins (integer factor): a reshape, no scatter
        s = n // m
        return (xt.reshape(*xt.shape[:-1], m, s).sum(dim=-1) / math.sqrt(s)).movedim(-1, dim)
    idx = torch.div(torch.arange(n) * m, n, rounding_mode="floor")
    out = torch.zeros(*xt.shape[:-1], m, dtype=x.dtype)
    out.index_add_(xt.dim() - 1, idx, xt)
    count = torch.bincount(idx, minlength=m).to(x.dtype)
    return (out / count.sqrt()).movedim(-1, dim)


def _upsample_integral(x: torch.Tensor, dim: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """Conditional integral upsampling by an integer k along `dim`: x/sqrt(k) + (Z - mean Z)."""
    xt = x.movedim(dim, -1)
    z = torch.randn(*xt.shape, k, generator=generator, dtype=x.dtype)
    fine = xt.unsqueeze(-1) / math.sqrt(k) + (z - z.mean(dim=-1, keepdim=True))
    return fine.reshape(*xt.shape[:-1], xt.shape[-1] * k).movedim(-1, dim)


def _upsample_pieces(x: torch.Tensor, dim: int, m: int, generator: torch.Generator) -> torch.Tensor:
    """Non-integer upscale n -> m: the integral construction without materialising sub-cells.

    On the common refinement (K = m/g sub-cells per source cell, B = n/g per target cell),
    cut the axis at every source and target boundary. A piece of c sub-cells inside source
    cell x has sum S = c*x/sqrt(K) + W - (c/K)*sum_source(W) with W ~ N(0, c): exactly the
    law of the sum of those c conditioned sub-cells. A target is the sum of its pieces / sqrt(B).
    """
    n = x.shape[dim]
    g = math.gcd(n, m)
    k_src, b_tgt = m // g, n // g
    cuts = sorted(set(range(0, n * k_src + 1, k_src)) | set(range(0, n * k_src + 1, b_tgt)))
    lo, hi = torch.tensor(cuts[:-1]), torch.tensor(cuts[1:])
    count = (hi - lo).to(x.dtype)
    src = torch.div(lo, k_src, rounding_mode="floor")
    tgt = torch.div(lo, b_tgt, rounding_mode="floor")
    xt = x.movedim(dim, -1)
    w = torch.randn(*xt.shape[:-1], len(count), generator=generator, dtype=x.dtype) * count.sqrt()
    w_src = torch.zeros_like(xt).index_add_(xt.dim() - 1, src, w)
    pieces = count * xt[..., src] / math.sqrt(k_src) + w - (count / k_src) * w_src[..., src]
    out = torch.zeros(*xt.shape[:-1], m, dtype=x.dtype).index_add_(xt.dim() - 1, tgt, pieces)
    return (out / math.sqrt(b_tgt)).movedim(-1, dim)


def _resample_axis(x: torch.Tensor, dim: int, m: int, generator: torch.Generator | None) -> torch.Tensor:
    n = x.shape[dim]
    if m == n:
        return x
    if m < n:
        return _bin_sum(x, dim, m)  # integer s is the equal-count special case
    if generator is None:
        raise ValueError("upscaling noise needs a seeded torch.Generator (fresh sub-cell noise)")
    if m % n == 0:
        return _upsample_integral(x, dim, m // n, generator)
    return _upsample_pieces(x, dim, m, generator)


def resample_noise(
    x: torch.Tensor, size: tuple[int, int], generator: torch.Generator | None = None
) -> torch.Tensor:
    """Resample unit-variance white noise `x[..., h0, w0]` to `[..., h, w]`, keeping it white.

    `size` is (h, w). Downscaling is deterministic; upscaling draws fresh sub-cell noise from
    `generator` (a CPU generator, required then). Works in float32 or float64 (other dtypes
    are upcast to float32); computed on the CPU and returned on `x`'s device.
    """
    h, w = int(size[0]), int(size[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"noise target size must be positive, got {size}")
    if x.dim() < 2 or x.shape[-2] <= 0 or x.shape[-1] <= 0:
        raise ValueError(f"noise must be [..., h, w] with positive sides, got {tuple(x.shape)}")
    device = x.device
    x = x.cpu() if x.dtype in (torch.float32, torch.float64) else x.cpu().float()
    x = _resample_axis(x, x.dim() - 2, h, generator)
    out = _resample_axis(x, x.dim() - 1, w, generator)
    return (out.clone() if out is x else out.contiguous()).to(device)  # never alias the input


def derived_generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded from a stable hash of `parts` (same parts -> same stream)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return torch.Generator("cpu").manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


# --------------------------------------------------------------------------- the scaffold


class NoiseScaffold:
    """Seeded latent noise `[4, ceil(H/8), ceil(W/8)]` for a canvas of `pixel_size=(W, H)`."""

    def __init__(self, seed: int, pixel_size: tuple[int, int] = (4096, 4096), *, noise: torch.Tensor | None = None):
        width, height = int(pixel_size[0]), int(pixel_size[1])
        if width <= 0 or height <= 0:
            raise ValueError(f"scaffold pixel_size must be positive (W, H), got {pixel_size}")
        self.seed = int(seed)
        self.pixel_size = (width, height)
        shape = (LATENT_CHANNELS, -(-height // LATENT_SCALE), -(-width // LATENT_SCALE))
        if noise is None:
            gen = torch.Generator("cpu").manual_seed(self.seed)
            noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"scaffold noise must be {shape} for pixel_size {pixel_size}, got {tuple(noise.shape)}")
        self.noise = noise.to(torch.float32).contiguous()

    @property
    def latent_size(self) -> tuple[int, int]:
        """(h, w) in latent cells."""
        return (self.noise.shape[1], self.noise.shape[2])

    def __repr__(self) -> str:
        return f"NoiseScaffold(seed={self.seed}, pixel_size={self.pixel_size}, latent={tuple(self.noise.shape)})"

    # ---------------------------------------------------------------- slices

    def slice(self, box_px: tuple[int, int, int, int], size: tuple[int, int] | None = None) -> torch.Tensor:
        """Noise `[4, h, w]` for the pixel box `(x0, y0, x1, y1)` resampled to latent `size=(h, w)`.

        Boxes not on the 8 px grid are widened to the latent cells they touch. Without `size`
        the slice is returned 1:1. Same box and size -> same noise, every time.
        """
        x0, y0, x1, y1 = (int(v) for v in box_px)
        # the latent grid covers the canvas padded to a multiple of 8 (as the runtime pads it)
        height, width = (v * LATENT_SCALE for v in self.latent_size)
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"noise box {box_px} is empty")
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise ValueError(f"noise box {box_px} lies outside the scaffold canvas {width}x{height}")
        lx0, ly0, lx1, ly1 = latent_box((x0, y0, x1, y1), scale=LATENT_SCALE)
        src = self.noise[:, ly0:ly1, lx0:lx1]
        if size is None or tuple(size) == tuple(src.shape[1:]):
            return src.clone()
        gen = derived_generator("slice", self.seed, (lx0, ly0, lx1, ly1), tuple(int(s) for s in size))
        return resample_noise(src, size, gen)

    def latent_for_size(self, width: int, height: int) -> torch.Tensor:
        """The whole scaffold resampled to the latent of a `width x height` image (the 1K draft)."""
        size = (-(-int(height) // LATENT_SCALE), -(-int(width) // LATENT_SCALE))
        if size == self.latent_size:
            return self.noise.clone()
        gen = derived_generator("whole", self.seed, size)
        return resample_noise(self.noise, size, gen)

    def downscaled(self, factor: float) -> torch.Tensor:
        """The whole scaffold shrunk by `factor` (4 -> the 1K draft of a 4K canvas)."""
        if factor <= 0:
            raise ValueError(f"downscale factor must be positive, got {factor}")
        h, w = self.latent_size
        size = (max(1, round(h / factor)), max(1, round(w / factor)))
        if size == self.latent_size:
            return self.noise.clone()
        return resample_noise(self.noise, size, derived_generator("whole", self.seed, size))

    # ---------------------------------------------------------------- files

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file (temporary name, then rename) with seed, size and format_version."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "format_version": str(FORMAT_VERSION),
            "seed": str(self.seed),
            "pixel_width": str(self.pixel_size[0]),
            "pixel_height": str(self.pixel_size[1]),
            "kind": "luna-noise-scaffold",
        }
        with atomic_path(path) as tmp:
            save_file({"noise": self.noise}, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NoiseScaffold":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise ScaffoldFileError(f"{path}: no such scaffold file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                noise = f.get_tensor("noise")
        except Exception as exc:  # safetensors raises several types for a damaged header
            raise ScaffoldFileError(f"{path}: not a readable safetensors scaffold ({exc})") from exc
        version = meta.get("format_version")
        if version != str(FORMAT_VERSION):
            raise ScaffoldFileError(f"{path}: scaffold format_version {version!r}, expected {FORMAT_VERSION}")
        try:
            seed = int(meta["seed"])
            size = (int(meta["pixel_width"]), int(meta["pixel_height"]))
        except (KeyError, ValueError) as exc:
            raise ScaffoldFileError(f"{path}: scaffold metadata lacks seed/pixel size ({exc})") from exc
        try:
            return cls(seed, size, noise=noise)
        except ValueError as exc:
            raise ScaffoldFileError(f"{path}: {exc}") from exc
