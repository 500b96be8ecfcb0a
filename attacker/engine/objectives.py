"""Matching objectives (:data:`OBJECTIVES`): how far a simulated update is from the observed one."""

from __future__ import annotations

from typing import Callable

import torch

from fedsim.registry import register

from .simulator import Tensors

# ------------------------------------------------------------------------------------------------------------
# Registries of parts


Objective = Callable[[Tensors, Tensors], torch.Tensor]
OBJECTIVES: dict[str, Objective] = {}


@register(OBJECTIVES, "cosine")
def cosine_distance(sim: Tensors, target: Tensors) -> torch.Tensor:
    """1 - cosine similarity of the whole (concatenated) update, as in Inverting Gradients."""
    dot = sum((sim[k] * target[k]).sum() for k in target)
    sim_norm = sum(sim[k].pow(2).sum() for k in target).sqrt()
    target_norm = sum(target[k].pow(2).sum() for k in target).sqrt()
    return 1.0 - dot / (sim_norm * target_norm + 1e-12)


@register(OBJECTIVES, "layer_cosine")
def layerwise_cosine_distance(sim: Tensors, target: Tensors) -> torch.Tensor:
    """Mean over layers of 1 - cosine similarity, so small layers weigh as much as large ones."""
    dists = [1.0 - (sim[k] * target[k]).sum() / (sim[k].norm() * target[k].norm() + 1e-12) for k in target]
    return sum(dists) / len(dists)


@register(OBJECTIVES, "masked_cosine")
def masked_cosine_distance(sim: Tensors, target: Tensors) -> torch.Tensor:
    """Cosine distance on the coordinates the observed update kept (non-zero), for sparsified (top-k) updates:
    the simulated update is unsparsified, so its dropped coordinates would only add noise to the direction."""
    masked = {k: sim[k] * (target[k] != 0) for k in target}
    return cosine_distance(masked, target)


@register(OBJECTIVES, "l2")
def squared_l2(sim: Tensors, target: Tensors) -> torch.Tensor:
    """Squared Euclidean distance of the updates, as in DLG."""
    return sum((sim[k] - target[k]).pow(2).sum() for k in target)


