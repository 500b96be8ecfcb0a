"""What an inversion is given: the problem (victim simulator, targets, labels) and joint problems."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


from .simulator import Tensors, VictimSimulator

# ------------------------------------------------------------------------------------------------------------
# Problem, spec and the loop


@dataclass
class InversionProblem:
    """``P`` independent inversion problems that share one public model and one client step schedule."""

    simulator: VictimSimulator
    targets: Tensors  # each [P, *param_shape]: the observed updates
    labels: torch.Tensor  # [P, B] integer labels (recovered or known; ignored by label-searching spaces)
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int = 10
    aux: Tensors = field(default_factory=dict)  # per-problem side information, each [P, ...]
    # Each problem's own random stream (fedsim.seeds.update_seed of the update's identity); None: drawn from the
    # engine's seed and the problem's position (only for problems that have no identity, e.g. synthetic ones).
    seeds: Sequence[int] | None = None

    @property
    def num_problems(self) -> int:
        return self.labels.shape[0]

    @property
    def batch_size(self) -> int:
        return self.labels.shape[1]


@dataclass
class JointProblem:
    """Problems whose matching costs are summed, each part under its own public model: cross-round inversion (one
    client's updates of several rounds, the same images) and GIML's meta-step (one generator, several tasks).
    ``views[j]`` maps the names the space decodes for part j to the run's variables; a name shared by several
    views is one variable (its gradient is the sum over parts). All parts have the same number of problems and
    share the client's training config (one ``update_scale``). Images, labels and the update fit are read out
    from part 0."""

    parts: list[InversionProblem]
    views: list[dict[str, str]]


