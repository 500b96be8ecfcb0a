"""Records that cross the server/attacker/evaluator boundaries.

``ObservedUpdate`` is the whole of what an honest-but-curious server sees of one client in one round; nothing else
reaches an attack. Ground truth (the audit record of sample ids) travels separately, to the evaluator only.
Arrays are numpy so records pickle cheaply to Ray workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class ModelSpec:
    """The public architecture (the server built it, so it knows it)."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    width: int = 64


@dataclass(frozen=True)
class ThreatModel:
    """Explicit switches for what the attacker knows and may spend.

    labels: ``known`` (clients share their label list) or ``recovered`` (from the update, by ``label_method``).
    bn_stats_shared: clients send BatchNorm batch statistics of their first local step.
    hyperparameters_known: the attacker simulates the client's exact local steps (lr, epochs, batch size);
        otherwise it treats the update as a single gradient of all ``num-examples`` samples.
    secure_aggregation: the server sees only the sum of the round's updates, attacked as one update.
    """

    labels: Literal["known", "recovered"] = "recovered"
    label_method: str = "auto"
    bn_stats_shared: bool = False
    hyperparameters_known: bool = True
    secure_aggregation: bool = False


@dataclass(frozen=True)
class ObservedUpdate:
    round: int
    client_id: int  # the stable partition id; -1 for a securely aggregated sum
    model: ModelSpec
    normalization: tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) the clients feed the model with
    global_state: dict[str, np.ndarray]  # the public model sent this round (parameters and float buffers)
    update: dict[str, np.ndarray]  # what the client sent minus global_state
    train_config: dict  # the training config the server sent
    num_examples: int  # reported by the client (FedAvg weighting)
    shared: dict = field(default_factory=dict)  # what the threat model says clients share
    defenses: tuple[str, ...] = ()  # the publicly announced defense pipeline


@dataclass(frozen=True)
class AuditRecord:
    """Which samples a client used, in step order. Only the evaluator may read it."""

    round: int
    client_id: int
    sample_ids: tuple[int, ...]  # the round's local samples
    step_ids: tuple[int, ...] = ()  # sample ids in the order the local steps consumed them


@dataclass
class Reconstruction:
    """What an attack returns: images in [0, 1] (B, C, H, W) and labels, plus how it got there."""

    attack: str
    images: np.ndarray
    labels: np.ndarray
    label_method: str
    loss: float  # matching loss of the chosen restart
    seconds: float
    iterations: int
    restarts: int
    trace: list[tuple[int, float]] = field(default_factory=list)  # (iteration, best matching loss so far)
    extra: dict = field(default_factory=dict)


@dataclass
class LeakageRecord:
    """One results row: how much one attack recovered of one client's data in one round."""

    round: int
    client_id: int
    attack: str
    defenses: str
    batch_size: int
    psnr_mean: float = float("nan")
    psnr_best: float = float("nan")
    ssim_mean: float = float("nan")
    ssim_best: float = float("nan")
    lpips_mean: float = float("nan")
    lpips_best: float = float("nan")
    label_accuracy: float = float("nan")
    label_method: str = ""
    label_acc_idlg: float = float("nan")  # each recovery method on the same update (known or not)
    label_acc_yin: float = float("nan")
    label_acc_count: float = float("nan")
    matching_loss: float = float("nan")
    attack_seconds: float = float("nan")
    update_l2: float = float("nan")  # fit of the reconstruction's simulated update to the observed one
    update_sign_agreement: float = float("nan")
    update_cosine_distance: float = float("nan")
    iterations: int = 0
    restarts: int = 0
    status: str = "ok"
    error: str = ""
