"""The runtime as other front ends use it (the ComfyUI nodes in comfyui/): its pure parts and the
denoiser interface, in one place, so a front end depends on this module rather than on the
runtime's internals. Everything here is defined in the module named beside it.
"""
from lsd_runtime.categories import CategorySettingsError, CategoryTable  # noqa: F401
from lsd_runtime.conditioning import (  # noqa: F401
    CondRow,
    ConditioningError,
    CropEmbedder,
    VaultSource,
    VisionModelMismatch,
    WithImageEmbeds,
    open_projector,
    same_vision_model,
)
from lsd_runtime.denoiser import ComfyDenoiser, Denoiser, DenoiserError, DiffusersDenoiser, deterministic  # noqa: F401
from lsd_runtime.detailer import DetailSettings, detail, plan_crops  # noqa: F401
from lsd_runtime.detect import (  # noqa: F401
    CascadeFaceDetector,
    Detection,
    DetectionFileError,
    FileDetector,
    make_detector,
    write_detections,
)
from lsd_runtime.geometry import pad_to_multiple  # noqa: F401
from lsd_runtime.refiner import RefineTileSettings, refine_tiles  # noqa: F401
from lsd_runtime.scaffold import LATENT_CHANNELS, NoiseScaffold  # noqa: F401
from lsd_runtime.tiles import tile_grid  # noqa: F401
from lsd_runtime.workflow import _padded_detections as padded_detections  # noqa: F401
