"""The toy world: one shape on a flat background, every attribute a word of the prompt.

A scene is `Scene(shape, color, background, size, position, mark)`; `render(scene, size)` draws
it deterministically at any pixel size (4x supersampled, box-filtered), `prompt(scene)` writes the
prompt the toy campaign (`campaigns/toy.yaml`) produces for it and `parse_prompt` reads it back.
The *mark* is the part worth detailing: a small white or black dot at the shape's centroid whose
radius is 0.3 of the shape's, so it is about 2 px wide on a small shape at 64 px (illegible) and
legible on a crop regenerated at 64 px. Two styles exist for the two toy checkpoints: "flat"
(filled shapes) and "outline" (the same with a dark outline); attributes do not depend on style.
"""
from __future__ import annotations

import itertools
import re
import zlib
from dataclasses import asdict, dataclass, fields

import numpy as np

SHAPES = ("circle", "square", "triangle")
# Fill colours far apart in RGB (min pairwise distance ~150), so a lossy VAE keeps them apart.
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "purple": (150, 50, 200),
    "cyan": (30, 200, 210),
}
BACKGROUNDS = {"white": (240, 240, 240), "gray": (128, 128, 128), "black": (20, 20, 20)}
SIZES = ("small", "large")
POSITIONS = ("left", "middle", "right")
MARKS = {"white": (255, 255, 255), "black": (0, 0, 0)}
STYLES = ("flat", "outline")

# Geometry in units of the image side: half-extent r of the shape per size, centre x per position.
RADIUS = {"small": 0.16, "large": 0.25}
CENTER_X = {"left": 0.32, "middle": 0.5, "right": 0.68}
CENTER_Y = 0.5
JITTER_R = 0.05  # relative radius jitter (+-)
JITTER_XY = 0.03  # centre jitter (+-, image units)
MARK_RATIO = 0.3  # mark radius / shape radius
OUTLINE_RATIO = 0.12  # outline width / shape radius ("outline" style)
OUTLINE_DARKEN = 0.45  # outline colour = fill colour * this

POSITION_WORDS = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
ATTRIBUTES = ("shape", "color", "background", "size", "position", "mark")
SCENE_ATTRIBUTES = ATTRIBUTES[:5]  # legible at the generation size; the mark needs crop scale


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    size: str
    position: str
    mark: str

    def __post_init__(self):
        for name, allowed in (("shape", SHAPES), ("color", COLORS), ("background", BACKGROUNDS),
                              ("size", SIZES), ("position", POSITIONS), ("mark", MARKS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"Scene.{name}={getattr(self, name)!r} is not one of {list(allowed)}")

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def all_scenes() -> list[Scene]:
    """Every combination of attributes (648)."""
    return [Scene(*c) for c in itertools.product(SHAPES, COLORS, BACKGROUNDS, SIZES, POSITIONS, MARKS)]


def random_scene(rng: np.random.Generator) -> Scene:
    return Scene(*(str(rng.choice(list(v))) for v in (SHAPES, COLORS, BACKGROUNDS, SIZES, POSITIONS, MARKS)))


# ---------------------------------------------------------------- prompts

TEMPLATE = "a {size} {color} {shape} with a {mark} dot {where}, {background} background"
_PROMPT_RE = re.compile(
    r"^a (?P<size>\w+) (?P<color>\w+) (?P<shape>\w+) with a (?P<mark>\w+) dot "
    r"(?P<where>on the left|in the middle|on the right), (?P<background>\w+) background$"
)


def prompt(scene: Scene) -> str:
    """The prompt of a scene, exactly as campaigns/toy.yaml's template writes it."""
    return TEMPLATE.format(size=scene.size, color=scene.color, shape=scene.shape, mark=scene.mark,
                           where=POSITION_WORDS[scene.position], background=scene.background)


def parse_prompt(text: str) -> Scene:
    """The scene a toy prompt describes; ValueError naming the prompt when it is not one."""
    m = _PROMPT_RE.match(" ".join(text.strip().split()))
    if m is None:
        raise ValueError(f"not a toy-world prompt (expected {TEMPLATE!r}): {text!r}")
    where = {v: k for k, v in POSITION_WORDS.items()}[m["where"]]
    return Scene(m["shape"], m["color"], m["background"], m["size"], where, m["mark"])


# ---------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Layout:
    """Where a rendered scene's shape is, in image units (0..1): centre, half-extent, mark centre."""

    cx: float
    cy: float
    r: float
    mark_cx: float
    mark_cy: float

    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the shape's bounding square, image units."""
        return self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r


def layout(scene: Scene, seed: int = 0) -> Layout:
    """The scene's geometry for `seed` (the jitter), independent of the pixel size."""
    rng = np.random.default_rng(zlib.crc32(f"{seed}/{scene}".encode()))
    jr, jx, jy = rng.uniform(-1, 1, 3)
    r = RADIUS[scene.size] * (1 + JITTER_R * jr)
    cx = CENTER_X[scene.position] + JITTER_XY * jx
    cy = CENTER_Y + JITTER_XY * jy
    mcy = cy + (0.3 * r if scene.shape == "triangle" else 0.0)  # a triangle's centroid: 2/3 down from its apex
    return Layout(cx, cy, r, cx, mcy)


def _erode(mask: np.ndarray, k: int, dilate: bool = False) -> np.ndarray:
    """Binary erosion (or dilation) by a (2k+1)^2 square, separably; outside the grid is empty."""
    out = mask
    for axis in (0, 1):
        pad = np.pad(out, [(k, k) if a == axis else (0, 0) for a in (0, 1)], constant_values=False)
        n = out.shape[axis]
        acc = np.zeros_like(out) if dilate else np.ones_like(out)
        for o in range(2 * k + 1):
            if dilate:
                acc |= np.take(pad, range(o, o + n), axis=axis)
            else:
                acc &= np.take(pad, range(o, o + n), axis=axis)
        out = acc
    return out


def _masks(scene: Scene, lay: Layout, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(shape, mark) boolean masks on an n x n grid of pixel centres (image units)."""
    c = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(c, c)
    dx, dy = x - lay.cx, y - lay.cy
    r = lay.r
    if scene.shape == "circle":
        shape = dx * dx + dy * dy <= r * r
    elif scene.shape == "square":
        shape = (np.abs(dx) <= 0.9 * r) & (np.abs(dy) <= 0.9 * r)
    else:  # triangle, apex up: height 1.8r, base width 2r
        t = (dy + 0.9 * r) / (1.8 * r)
        shape = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)
    mark = (x - lay.mark_cx) ** 2 + (y - lay.mark_cy) ** 2 <= (MARK_RATIO * r) ** 2
    return shape, mark


def render(scene: Scene, size: int = 64, seed: int = 0, style: str = "flat") -> np.ndarray:
    """The scene as an RGB uint8 array [size, size, 3] (4x supersampled, box-filtered)."""
    if style not in STYLES:
        raise ValueError(f"style={style!r} is not one of {list(STYLES)}")
    if size < 8:
        raise ValueError(f"size={size} is too small to draw a scene (>= 8 px)")
    lay = layout(scene, seed)
    ss = 4
    shape, mark = _masks(scene, lay, size * ss)
    img = np.empty((size * ss, size * ss, 3), np.float32)
    img[:] = BACKGROUNDS[scene.background]
    fill = np.asarray(COLORS[scene.color], np.float32)
    img[shape] = fill
    if style == "outline":
        width = max(1, round(OUTLINE_RATIO * lay.r * size * ss))
        img[shape & ~_erode(shape, width)] = fill * OUTLINE_DARKEN
    img[mark] = MARKS[scene.mark]
    img = img.reshape(size, ss, size, ss, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def scene_seed(index: int, base: int = 0) -> int:
    return zlib.crc32(f"toy/{base}/{index}".encode())


def scene_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(Scene))
