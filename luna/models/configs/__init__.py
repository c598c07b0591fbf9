"""Model configs kept in the repo so that loading never needs a hub (see docs/models.md)."""
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
SDXL_BASE = CONFIG_DIR / "sdxl-base"
SDXL_TINY = CONFIG_DIR / "sdxl-tiny"
SDXL_TOY = CONFIG_DIR / "sdxl-toy"  # the toy preset: tiny widths, 4x VAE, trained (luna make-toy)
OPEN_CLIP_DIR = CONFIG_DIR / "open_clip"
