"""Regularisers (:data:`REGULARIZERS`) and what they may look at for one candidate (:class:`CandidateContext`);
the group-consistency consensus (:data:`CONSENSUS`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from fedsim.registry import register

from .simulator import Tensors, VictimSimulator

if TYPE_CHECKING:
    from .spaces import SearchSpace

@dataclass
class CandidateContext:
    """What a regulariser may look at for one candidate (all tensors are per candidate under vmap)."""

    simulator: VictimSimulator
    aux: Tensors  # per-problem side information (BN statistics targets, feature targets)
    anchor: torch.Tensor  # group-consistency anchor for this candidate (same shape as its images)
    # Captured during the simulated update's first forward (else recomputed by the regulariser):
    bn_stats: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    features: torch.Tensor | None = None
    variables: Tensors | None = None  # the candidate's search variables (latents, generator weights)
    space: "SearchSpace | None" = None  # the space searched, for regularisers of its variables


Regularizer = Callable[[torch.Tensor, CandidateContext], torch.Tensor]
REGULARIZERS: dict[str, Regularizer] = {}


@register(REGULARIZERS, "tv")
def total_variation(x: torch.Tensor, ctx: CandidateContext | None = None) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (anisotropic TV, IG's definition)."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


@register(REGULARIZERS, "l2")
def l2_prior(x: torch.Tensor, ctx: CandidateContext | None = None) -> torch.Tensor:
    """Mean squared (normalised) pixel value: keeps candidates near the data mean."""
    return x.pow(2).mean()


@register(REGULARIZERS, "bn")
def bn_fidelity(x: torch.Tensor, ctx: CandidateContext) -> torch.Tensor:
    """GradInversion's fidelity: sum over BatchNorm layers of ||mu(x) - mu*||_2 + ||var(x) - var*||_2, against
    statistics the client shared or a public proxy (in ``aux`` as bn.mean.i / bn.var.i)."""
    total = x.new_zeros(())
    stats = ctx.bn_stats if ctx.bn_stats is not None else ctx.simulator.bn_statistics(x)
    for i, (mean, var) in enumerate(stats):
        total = total + (mean - ctx.aux[f"bn.mean.{i}"]).norm() + (var - ctx.aux[f"bn.var.{i}"]).norm()
    return total


@register(REGULARIZERS, "group")
def group_consistency(x: torch.Tensor, ctx: CandidateContext) -> torch.Tensor:
    """GradInversion's group consistency: squared distance to the group's (lazy or registered) consensus image."""
    return (x - ctx.anchor).pow(2).mean()


@register(REGULARIZERS, "features")
def feature_matching(x: torch.Tensor, ctx: CandidateContext) -> torch.Tensor:
    """Distance of the classifier's input features to those recovered analytically from the update."""
    feats = (ctx.features if ctx.features is not None else ctx.simulator.features(x)).flatten(1)
    target = ctx.aux["features"]
    valid = torch.isfinite(target).all(dim=1, keepdim=True)
    return ((feats - torch.nan_to_num(target)) * valid).pow(2).mean()



@register(REGULARIZERS, "epoch_invariant")
def epoch_invariant(x: torch.Tensor, ctx: CandidateContext) -> torch.Tensor:
    """Dimitrov et al.'s epoch-order-invariant prior: the client saw the same images in every local epoch, only in
    another order, so an order-invariant summary of each epoch's copies must agree across epochs. The summary here
    is the mean image of each group of copies (``aux["copy_means"]`` [E, G, N]: row (e, g) averages epoch e's
    copies in group g, a label or, when the order is known, a position); the penalty is the mean squared distance
    of every epoch's group means to their mean over epochs, averaged over the groups present."""
    weights = ctx.aux["copy_means"]
    means = torch.einsum("egn,nd->egd", weights, x.flatten(1))  # [E, G, pixels]
    spread = (means - means.mean(0, keepdim=True)).pow(2).mean(-1).mean(0)  # [G]
    present = (weights[0].sum(-1) > 0).to(x.dtype)
    return (spread * present).sum() / present.sum().clamp_min(1)


def lazy_consensus(x: torch.Tensor) -> torch.Tensor:
    """[P, R, B, C, H, W] -> the restart mean, for every restart."""
    return x.mean(dim=1, keepdim=True).expand_as(x)


def registered_consensus(x: torch.Tensor) -> torch.Tensor:
    """Align every restart to the lazy mean (translation, kornia's ImageRegistrator), average the aligned restarts,
    and warp that consensus back into each restart's own frame."""
    from ..registration import invert, register_translation, warp_translation

    P, R, B = x.shape[:3]
    flat = x.reshape(P * R * B, *x.shape[3:]).detach()
    mean = x.mean(dim=1, keepdim=True).expand_as(x).reshape(P * R * B, *x.shape[3:]).detach()
    to_mean = register_translation(flat, mean)  # warps each restart onto the mean
    aligned = warp_translation(flat, to_mean).reshape(x.shape)
    consensus = aligned.mean(dim=1, keepdim=True).expand_as(x).reshape(P * R * B, *x.shape[3:])
    return warp_translation(consensus, invert(to_mean)).reshape(x.shape)


CONSENSUS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"lazy": lazy_consensus,
                                                                 "registered": registered_consensus}


