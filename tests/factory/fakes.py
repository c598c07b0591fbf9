"""A fake generator for scheduler tests: deterministic images from the seed, no model."""
from __future__ import annotations

import os
import time

import numpy as np


class FakeGenerator:
    """Images from the seed; optional per-image delay; dies (os._exit) once a flag file exists; only flat
    grey images once a checkpoint whose path contains one of `flat_paths` is loaded (a poisoned checkpoint)."""

    def __init__(self, delay_s: float = 0.0, die_flag: str | None = None, black_seeds=(), nan_seeds=(),
                 fail_prompts=(), flat_paths=()):
        self.delay_s, self.die_flag, self.fail_prompts = delay_s, die_flag, set(fail_prompts)
        self.flat_paths = tuple(flat_paths)
        self.black_seeds, self.nan_seeds = set(black_seeds), set(nan_seeds)
        self.path = None

    def load(self, path):
        self.path = path

    def generate(self, prompts, negatives, seeds, sampler):
        if self.fail_prompts & set(prompts):
            raise RuntimeError("cannot render this prompt")
        out = []
        for s in seeds:
            if self.die_flag and os.path.exists(self.die_flag):
                try:  # the rename is atomic: exactly one actor takes the flag and dies
                    os.rename(self.die_flag, self.die_flag + ".taken")
                except OSError:
                    pass
                else:
                    os._exit(1)
            time.sleep(self.delay_s)
            rng = np.random.default_rng(int(s))
            im = rng.random((int(sampler["height"]), int(sampler["width"]), 3), dtype=np.float32)
            if s in self.black_seeds:
                im[:] = 0.0
            if self.path and any(f in str(self.path) for f in self.flat_paths):
                im[:] = 0.5
            if s in self.nan_seeds:
                im[0, 0, 0] = np.nan
            out.append(im)
        return out
