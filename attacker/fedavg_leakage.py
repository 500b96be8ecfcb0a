"""The FedAvg attack of Dimitrov et al., "Data Leakage in Federated Averaging" (TMLR 2022), in fedsim's engine.

A FedAvg client passes over its images once per local epoch, in a new random order each time (``shuffle``), and the
server sees only the sum of all those steps. Replaying the steps on one copy of the images (Inverting Gradients'
FedAvg variant, ``inverting_gradients`` on a FedAvg update) forces the attacker to guess one order for every epoch.
This attack instead searches one copy of the images per epoch, pushes all copies through the whole simulated local
training (every epoch and batch of the declared recipe), ties the copies of different epochs with an
epoch-order-invariant prior (:func:`~attacker.engine.regularizers.epoch_invariant`) and returns, per image, the mean
of its copies after matching them across epochs.

Differences from the reference code (eth-sri/fedavg_leakage, JAX), on purpose:
- the best restart is chosen by the matching loss, not by PSNR against the client's images (ground truth the
  attacker does not have);
- the invariant summary is the mean image per label group (per position when the order is known), not the mean or
  max of random-convolution features over the whole epoch: labels are recovered first anyway, and a group of one
  label pins its copies to each other;
- copies are matched to the first epoch's within label groups before averaging.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from scipy.optimize import linear_sum_assignment

from fedsim.seeds import update_seed
from fedsim.training import TrainConfig, step_schedule

from .attacks import InvertingGradients, inversion_problem
from .engine import EngineResult, EngineSpec, InversionProblem, VictimSimulator
from .tuning import Range


@dataclass
class EpochCopies(InversionProblem):
    """An inversion problem over ``epochs`` copies of the client's ``B`` images (batch ``epochs * B``: copy ``e * B
    + i`` is image ``i``'s stand-in in epoch ``e``). ``groups`` [P, epochs * B]: which copies the invariant prior
    compares (equal groups across epochs hold the same images)."""

    epochs: int = 1
    groups: torch.Tensor | None = None


def order_known(cfg: TrainConfig) -> bool:
    """Without shuffling a client walks its images in the same order every epoch, and the server knows it; with
    shuffling each epoch's order comes from the client's own randomness, which the attacker never sees."""
    return not cfg.shuffle


def copies_layout(labels: np.ndarray, epochs: int, known_order: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and prior groups of the ``epochs * B`` copies for one update's (recovered) labels. Known order: every
    epoch repeats the images in place, each position its own group. Unknown order: each epoch gets its own random
    arrangement of the label multiset (the batches of a shuffled epoch mix labels at random) and copies are grouped
    by label."""
    labels = np.asarray(labels, dtype=np.int64)
    size = len(labels)
    if known_order:
        return np.tile(labels, epochs), np.tile(np.arange(size), epochs)
    rng = np.random.default_rng(seed)
    arranged = np.concatenate([labels[rng.permutation(size)] for _ in range(epochs)])
    _, groups = np.unique(arranged, return_inverse=True)  # group = rank of the label among the labels present
    return arranged, groups


def mean_weights(groups: np.ndarray, epochs: int) -> torch.Tensor:
    """[E, G, E * B] with G = B: row (e, g) averages epoch e's copies in group g (a zero row if g is unused)."""
    size = len(groups) // epochs
    weights = torch.zeros(epochs, size, len(groups))
    for copy, group in enumerate(groups):
        weights[copy // size, group, copy] = 1.0
    counts = weights.sum(-1, keepdim=True)
    return weights / counts.clamp_min(1)


def epoch_copies_problem(observed, cfg: TrainConfig, labels: list[np.ndarray], device: str, model: torch.nn.Module,
                         seed: int) -> EpochCopies:
    """The problem over per-epoch copies: the client's step schedule where epoch e's steps read copies ``e * B``..,
    each update's copies labelled and grouped by :func:`copies_layout`, the prior's weights in ``aux``."""
    base = inversion_problem(observed, cfg, labels, device, model, seed=seed)
    size, epochs = cfg.num_samples, cfg.epochs
    one_epoch = step_schedule(replace(cfg, epochs=1))  # the attacker's own order inside an epoch
    schedule = [positions + epoch * size for epoch in range(epochs) for positions in one_epoch]
    simulator = VictimSimulator(model, schedule, cfg.lr, device, bn_mode=cfg.bn_mode)
    known = order_known(cfg)
    layouts = [copies_layout(lab, epochs, known, update_seed(seed, obs.round, obs.client_id) + 1)
               for obs, lab in zip(observed, labels)]
    copy_labels = torch.from_numpy(np.stack([lab for lab, _ in layouts]))
    groups = torch.from_numpy(np.stack([grp for _, grp in layouts]))
    weights = torch.stack([mean_weights(grp, epochs) for _, grp in layouts])
    return EpochCopies(simulator, base.targets, copy_labels, base.image_shape, base.mean, base.std,
                       num_classes=base.num_classes, aux={"copy_means": weights}, seeds=base.seeds, epochs=epochs,
                       groups=groups)


def fold_copies(images: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor,
                epochs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One update's ``epochs * B`` copies [N, C, H, W] -> B images: every epoch's copies matched to the first
    epoch's (within equal groups, by least squared distance) and averaged. Labels are the first epoch's."""
    size = len(groups) // epochs
    reference, total = images[:size], images[:size].clone()
    for epoch in range(1, epochs):
        span = slice(epoch * size, (epoch + 1) * size)
        copies = images[span]
        cost = torch.cdist(reference.flatten(1).double(), copies.flatten(1).double())
        cost[groups[:size, None] != groups[span][None, :]] = float("inf")
        rows, cols = linear_sum_assignment(torch.nan_to_num(cost, posinf=1e30).numpy())
        total[rows] += copies[cols]
    return total / epochs, labels[:size]


class FedAvgLeakage(InvertingGradients):
    """Dimitrov et al. 2022 on a FedAvg update: one copy of the images per local epoch through the client's whole
    simulated training, Inverting Gradients' matching (cosine, TV, signed Adam with step decay, boxed pixels), plus
    the epoch-order-invariant prior (weight ``epoch_prior``) between the copies, each image the mean of its matched
    copies. Labels follow the threat model. On a FedSGD update (one step, one epoch) it is Inverting Gradients."""

    name: ClassVar[str] = "fedavg_leakage"
    epoch_prior: float = Field(default=0.1, ge=0)
    # "auto": the order is known when the client does not shuffle (the server sent shuffle = false)
    order: Literal["auto", "unknown"] = "auto"

    @classmethod
    def tune_space(cls) -> dict:
        return {**super().tune_space(), "epoch_prior": Range(low=1e-3, high=3.0)}

    def engine_spec(self) -> EngineSpec:
        spec = super().engine_spec()
        return replace(spec, regularizers=spec.regularizers + (("epoch_invariant", self.epoch_prior),))

    def build_problem(self, observed, cfg, labels, device, model, seed):
        if self.order == "unknown":
            cfg = replace(cfg, shuffle=True)
        return epoch_copies_problem(observed, cfg, labels, device, model, seed)

    def search(self, spec: EngineSpec, problem: InversionProblem, device: str, seed: int) -> EngineResult:
        result = super().search(spec, problem, device, seed)
        assert isinstance(problem, EpochCopies)
        folded = [fold_copies(result.images[p], result.labels[p], problem.groups[p].cpu(), problem.epochs)
                  for p in range(problem.num_problems)]
        return replace(result, images=torch.stack([img for img, _ in folded]),
                       labels=torch.stack([lab for _, lab in folded]), all_images=None)
