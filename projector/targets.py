"""What a projector predicts: the SDXL conditioning (default) or the SD 1.x-style CLIP-L target.

`model.heads=[clip_l]` trains a projector whose outputs are CLIP-L's final-layer, final-norm
hidden states `[77, 768]` and its pooled EOS state `[768]` (the optional `/prompts/clip_l_*`
datasets of `luna extract clip_l=true`): the conditioning SD 1.x cross-attends to and Flux's
`vector`. Its export records `dims.targets = "clip_l"`; the SDXL runtime and nodes refuse it.
"""
from __future__ import annotations

HEADS = ("sdxl", "clip_l")
TARGET_SHAPES = {"sdxl": "[77, 2048] + pooled [1280]", "clip_l": "[77, 768] + pooled [768] (SD 1.x / Flux)"}


class TargetsError(ValueError):
    """Heads or data that cannot train the requested targets."""


def targets_of(heads) -> str:
    """`model.heads` -> the one target set this export predicts."""
    heads = [str(h) for h in (heads or ["sdxl"])]
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        raise TargetsError(f"model.heads: unknown {unknown}; choose from {list(HEADS)}")
    if len(heads) != 1:
        raise TargetsError(f"model.heads={heads}: one head per export (train the SDXL and the CLIP-L projector "
                           "as two runs of the same pairs)")
    return heads[0]


class ClipLPairs:
    """A `Pairs` seen through its CLIP-L targets: `cond`/`pooled` read `/prompts/clip_l_*`."""

    def __init__(self, pairs):
        if not pairs.has_clip_l:
            lacking = [p.name for p in pairs.parts if "clip_l" not in _datasets(p)]
            raise TargetsError(f"model.heads=[clip_l] needs /prompts/clip_l_cond and /prompts/clip_l_pooled, which "
                               f"{lacking or pairs.parts} lack: extract with `luna extract clip_l=true`")
        self._pairs = pairs
        width = int(pairs.clip_l([0]).shape[-1])
        self.attrs = {**pairs.attrs, "text_dims": [width], "pooled_dim": int(pairs.clip_l_pooled([0]).shape[-1])}

    def __getattr__(self, name):
        return getattr(self._pairs, name)

    def __len__(self) -> int:
        return len(self._pairs)

    def __getstate__(self):  # DataLoader workers pickle it (Pairs reopens its files lazily)
        return self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(state)

    @property
    def text_dims(self) -> tuple[int]:
        return tuple(self.attrs["text_dims"])

    def cond(self, prompt_ids):
        return self._pairs.clip_l(prompt_ids)

    def pooled(self, prompt_ids):
        return self._pairs.clip_l_pooled(prompt_ids)

    # the loader's contiguous reads from disk (projector.data._Source._read_runs) name cond / pooled
    _COLUMNS = {"cond": "clip_l_cond", "pooled": "clip_l_pooled"}

    def read_rows(self, name: str, file: int, lo: int, hi: int, out=None):
        return self._pairs.read_rows(self._COLUMNS[name], file, lo, hi, out=out)

    def row_shape(self, name: str):
        return self._pairs.row_shape(self._COLUMNS[name])

    def close(self):
        self._pairs.close()


def _datasets(path) -> str:
    import h5py

    with h5py.File(path, "r") as f:
        return " ".join(f["prompts"].keys())


def target_view(pairs, targets: str):
    return pairs if targets == "sdxl" else ClipLPairs(pairs)
