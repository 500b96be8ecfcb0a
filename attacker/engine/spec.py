"""An engine's settings (:class:`EngineSpec`) and its result."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedsim.registry import lookup

from .objectives import OBJECTIVES
from .optimizers import OPTIMIZERS, OptimizerSpec
from .regularizers import CONSENSUS, REGULARIZERS
from .simulator import Tensors
from .spaces import SEARCH_SPACES

@dataclass(frozen=True)
class GroupSpec:
    """Group consistency: every ``every`` iterations the restarts of a problem agree on a consensus image, the
    plain mean (``lazy``) or the mean after aligning each restart to it (``registered``)."""

    mode: str = "lazy"
    every: int = 100
    start: int = 0


BATCHING = ("auto", "stacked", "vmap", "loop")


def check_compile(batching: str, compile: bool) -> None:
    """torch.compile is wired to the vmap step only (the stacked step's nested autograd.grad does not compile into one
    graph), so compile = true needs batching auto or vmap."""
    if compile and batching not in ("auto", "vmap"):
        raise ValueError(f"compile = true runs the vmap step; batching {batching!r} cannot be compiled (use auto or "
                         "vmap)")


@dataclass(frozen=True)
class EngineSpec:
    objective: str = "cosine"
    regularizers: tuple[tuple[str, float], ...] = (("tv", 1e-2),)
    search_space: str = "pixels"
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    iterations: int = 4800
    restarts: int = 1
    boxed: bool = True
    init: str = "randn"
    trace_every: int = 100
    group: GroupSpec | None = None
    # Updates are compared in gradient units: both sides are divided by update_scale (lr x local steps, set by the
    # attack), so L2 weights mean what they mean in the papers, which match gradients. Cosine is unaffected.
    update_scale: float = 1.0
    matching_weight: float = 1.0
    # How candidates (problems x restarts) are computed: "stacked" (attacker/stacked.py) and "vmap" batch them in one
    # computation (pays off for small, overhead-bound victims), "loop" runs plain autograd one after another (faster
    # for one candidate and for large victims, see benchmarks/README.md), "auto" picks by candidate count and victim.
    batching: str = "auto"
    compile: bool = False  # torch.compile the vmap step (~1 min to compile, then ~2.5x faster on LeNet)

    def __post_init__(self):
        lookup(OBJECTIVES, self.objective, "objective")
        lookup(SEARCH_SPACES, self.search_space, "search space")
        lookup(OPTIMIZERS, self.optimizer.name, "optimizer")
        for name, _ in self.regularizers:
            lookup(REGULARIZERS, name, "regularizer")
        if self.batching not in BATCHING:
            raise ValueError(f"unknown batching {self.batching!r}; use one of {', '.join(BATCHING)}")
        if self.group is not None and self.group.mode not in CONSENSUS:
            raise ValueError(f"unknown group mode {self.group.mode!r}; choose one of {sorted(CONSENSUS)}")
        check_compile(self.batching, self.compile)


@dataclass
class EngineResult:
    images: torch.Tensor  # [P, B, C, H, W] in [0, 1], best restart per problem
    labels: torch.Tensor  # [P, B] labels of the chosen restart
    losses: torch.Tensor  # [P] matching loss of the chosen restart
    chosen_restart: torch.Tensor  # [P]
    trace: list[tuple[int, list[float]]]  # (iteration, best matching loss per problem)
    seconds: float
    iterations: int
    evaluations: int  # gradient evaluations per candidate (L-BFGS takes several per iteration)
    all_images: torch.Tensor | None = None  # [P, R, B, C, H, W] in [0, 1]
    update_fit: dict[str, torch.Tensor] = field(default_factory=dict)  # [P] each, see update_fit()
    variables: Tensors = field(default_factory=dict)  # the final variables of every candidate, [P, R, ...]


def update_fit(sim: Tensors, target: Tensors) -> dict[str, float]:
    """How well a reconstruction's simulated update fits the observed one (Yin et al. Table 5): squared L2
    distance, fraction of coordinates with the same sign, and cosine distance."""
    s = torch.cat([sim[k].flatten() for k in target]).double()
    t = torch.cat([target[k].flatten() for k in target]).double()
    return {"update_l2": float((s - t).pow(2).sum()), "update_sign_agreement": float((s.sign() == t.sign()).double().mean()),
            "update_cosine_distance": float(1 - (s @ t) / (s.norm() * t.norm() + 1e-30))}


