"""Losses and metrics on conditionings: plain functions on tensors (no Lightning).

Token positions of a conditioning `[B, 77, C]`: 0 is BOS (constant, always excluded);
1 .. n_content-1 are the prompt's tokens and its EOS ("content"); n_content .. 76 are padding,
which SDXL attends to and which carries prompt information ("pad"). `n_content` counts BOS +
tokens + EOS, capped at 77 (see `projector.data.content_lengths`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_masks(n_content: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(content mask, pad mask), each `[B, seq_len]` bool; position 0 is in neither."""
    pos = torch.arange(seq_len, device=n_content.device)[None, :]
    n = n_content.to(pos.device)[:, None]
    return (pos >= 1) & (pos < n), pos >= n


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the True positions of each row `[B, L] -> [B]` (NaN for a row with none)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(1) / mask.sum(1)


def token_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine per token over the full width: `[B, L, C] x2 -> [B, L]`."""
    return F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-8)


def content_pad_cosine(pred, target, n_content) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample mean token cosine over content and over padding tokens: two `[B]` (pad NaN if none)."""
    cos = token_cosine(pred, target)
    content, pad = token_masks(n_content, cos.shape[1])
    return masked_mean(cos, content), masked_mean(cos, pad)


def _half_losses(pred: torch.Tensor, target: torch.Tensor, split: int,
                 clip_l_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token MSE and (1 - cosine), each the weighted mean of the CLIP-L half (weight `clip_l_weight`)
    and the bigG half (weight 1): `[B, L]`. A CLIP-L-only target (split = width) is one half."""
    halves = [(slice(0, split), float(clip_l_weight))]
    if split < pred.shape[-1]:
        halves.append((slice(split, None), 1.0))
    total = sum(w for _, w in halves)
    mse = cos = 0.0
    for sl, w in halves:
        p, t = pred[..., sl], target[..., sl]
        mse = mse + w * ((p - t) ** 2).mean(-1)
        cos = cos + w * (1 - F.cosine_similarity(p, t, dim=-1, eps=1e-6))
    return mse / total, cos / total


def sequence_loss(
    pred_std: torch.Tensor,
    target_std: torch.Tensor,
    n_content: torch.Tensor,
    split: int,
    mse_weight: float = 1.0,
    cos_weight: float = 1.0,
    pad_weight: float = 0.3,
    clip_l_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Per-token MSE + cosine on standardised conditionings, BOS excluded, padding weighted apart.

    `split` is the CLIP-L width (768 in SDXL): each encoder half counts equally, whatever its
    width (`clip_l_weight` weights the CLIP-L half against bigG). Returns {"loss", "content", "pad"};
    loss = content + pad_weight * pad.
    """
    mse, cos = _half_losses(pred_std.float(), target_std.float(), split, clip_l_weight)
    per_token = mse_weight * mse + cos_weight * cos
    content, pad = token_masks(n_content, per_token.shape[1])
    content_loss = (per_token * content).sum() / content.sum().clamp_min(1)
    pad_loss = (per_token * pad).sum() / pad.sum().clamp_min(1)
    return {"loss": content_loss + pad_weight * pad_loss, "content": content_loss, "pad": pad_loss}


def pooled_loss(pred_std, target_std, mse_weight: float = 1.0, cos_weight: float = 1.0) -> torch.Tensor:
    mse = ((pred_std.float() - target_std.float()) ** 2).mean()
    cos = (1 - F.cosine_similarity(pred_std.float(), target_std.float(), dim=-1, eps=1e-6)).mean()
    return mse_weight * mse + cos_weight * cos


def shuffled_pairs(prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of another sample for each sample, mask of pairs whose prompts really differ).

    The batch rolled by one: sample i is compared with i+1's target.
    """
    other = torch.roll(torch.arange(len(prompt), device=prompt.device), -1)
    return other, prompt != prompt[other]


def summary(cond_std: torch.Tensor, pooled_std: torch.Tensor) -> torch.Tensor:
    """A compact vector per sample for retrieval: mean over tokens 1.. of the standardised
    conditioning, concatenated with the standardised pooled vector, L2-normalised."""
    return F.normalize(torch.cat([cond_std[:, 1:].float().mean(1), pooled_std.float()], dim=1), dim=1)


def recall_at_1(pred_summary: torch.Tensor, target_summary: torch.Tensor, prompt: torch.Tensor) -> float:
    """R@1 of each sample's own prompt among the distinct prompts present (cosine of summaries)."""
    prompts, first = _unique_first(prompt)
    candidates = target_summary[first]
    best = (pred_summary @ candidates.T).argmax(dim=1)
    return (prompts[best] == prompt).float().mean().item()


def _unique_first(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    uniq, inverse = torch.unique(values, return_inverse=True)
    first = torch.full((len(uniq),), len(values), dtype=torch.long, device=values.device)
    first.scatter_reduce_(0, inverse, torch.arange(len(values), device=values.device), reduce="amin")
    return uniq, first
