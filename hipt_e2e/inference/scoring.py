"""Scoring one slide: the one code path of end-to-end evaluation, `hipt-predict` and rescoring.

A slide comes as chunks of its regions (pixels on the device, optional tile masks); only the region
embeddings are kept, then each member's slide model (or region FC and vote) runs once. Every member scores
the slide once per pose (test-time augmentation); probabilities, region scores and tile attention are the
means over all (member, pose) pairs.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import torch

from hipt_e2e.data.augment import pose, unpose
from hipt_e2e.models import HIPT
from hipt_e2e.models.mil import RegionFC, vote

Member = tuple[HIPT, RegionFC | None]  # a HIPT with its slide model, or HIPT encoders + a region FC
Pose = tuple[bool, int]  # (flip, quarter turns), as hipt_e2e.data.augment.pose takes them
UPRIGHT: tuple[Pose, ...] = ((False, 0),)


@dataclass
class SlideScore:
    probs: np.ndarray  # [K] slide probabilities
    scores: np.ndarray  # [M] slide attention over the regions (fc: the predicted class's probability per region)
    tile_attention: np.ndarray | None  # [M, rows, cols] ViT4K CLS attention over tiles, mean over heads (when asked)


@torch.no_grad()
def _member_scores(model: HIPT, fc: RegionFC | None, embeddings: torch.Tensor,
                  vote_method: str = "majority") -> tuple[np.ndarray, np.ndarray]:
    """(slide probabilities [K], region scores [M]) of one member from the slide's region embeddings [M, D]."""
    if fc is None:
        logits, weights = model.slide_model(embeddings, return_attention=True)
        return logits.float().softmax(-1)[0].cpu().numpy(), weights.float().cpu().numpy()
    region_probs = fc(embeddings).float().softmax(-1).cpu().numpy()
    probs = vote(region_probs, vote_method)
    return probs, region_probs[:, int(np.argmax(probs))]


@torch.no_grad()
def score_slide(members: Sequence[Member], chunks: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
                poses: Sequence[Pose] = UPRIGHT, autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext,
                vote_method: str = "majority", return_attention: bool = False) -> SlideScore:
    """One slide's score from chunks of its regions: (uint8 pixels [m, 3, H, W], tile mask [m, rows, cols]
    (True = not encoded) or None), on the members' device. Each chunk is embedded by every member in every
    pose before the next is read. autocast: the mixed-precision context (Accelerator.autocast)."""
    runs = [(n, posed) for n in range(len(members)) for posed in poses]
    embeddings: dict[tuple[int, Pose], list[torch.Tensor]] = {run: [] for run in runs}
    attentions: dict[tuple[int, Pose], list[torch.Tensor]] = {run: [] for run in runs}
    for pixels, mask in chunks:
        for n, posed in runs:
            with autocast():
                embedded, attention = members[n][0].region_embeddings(
                    pose(pixels, *posed), pose(mask, *posed) if mask is not None else None, return_attention=True)
                if return_attention:
                    attentions[n, posed].append(unpose(attention.mean(dim=1).float().cpu(), *posed))
            embeddings[n, posed].append(embedded.float())
    if not embeddings[runs[0]]:
        raise ValueError("no region with enough tissue")
    with autocast():
        probs, scores = zip(*(_member_scores(*members[n], torch.cat(embeddings[n, posed]), vote_method)
                              for n, posed in runs))
    tile_attention = np.mean([torch.cat(a).numpy() for a in attentions.values()], axis=0) if return_attention else None
    return SlideScore(np.mean(probs, axis=0), np.mean(scores, axis=0), tile_attention)
