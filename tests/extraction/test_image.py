"""The image side follows luna.models.vision.embed, the path vault queries and runtime crops use."""
from __future__ import annotations

import io

import numpy as np
import torch

from extraction.image import ImageEncoder, load_tower
from extraction.pairs import Pairs
from factory.shards import iter_samples

# On CPU both paths run the same float32 arithmetic; the pairs are stored in float32 by the fixture.
# (On CUDA both run under the same fp16 autocast: the policy is one function, so they cannot drift.)
CPU_TOLERANCE = 1e-6


def test_pairs_embeddings_equal_the_query_path_embed(extracted, shards_dir):
    from PIL import Image

    from luna.models.vision import embed

    out, _ = extracted
    tower = load_tower("tiny", None, "cpu")
    keys, images = [], []
    for tar in sorted(shards_dir.glob("*.tar")):
        for key, files in iter_samples(tar):
            keys.append(key)
            images.append(Image.open(io.BytesIO(files["png"])).convert("RGB"))
    query_path = embed(tower, images).embed.numpy()  # how a vault query or a runtime crop embeds these images
    with Pairs(out) as p:
        row = {k: i for i, k in enumerate(p.key)}
        stored = p.embed[[row[k] for k in keys]]
    np.testing.assert_allclose(stored, query_path, rtol=0, atol=CPU_TOLERANCE)
    encoder = ImageEncoder(tower, "cpu", tokens=True, autocast=True)
    assert encoder.autocast is False  # the policy: autocast only on CUDA
    pixels = torch.stack([tower.preprocess(im) for im in images[:4]])
    got, tokens = encoder(pixels)
    ref = embed(tower, pixels, tokens=True)
    np.testing.assert_array_equal(got, ref.embed.numpy())
    np.testing.assert_array_equal(tokens, ref.tokens.numpy())
    assert got.dtype == np.float32 and encoder.images == 4
