"""The attack engine: one optimisation loop for every "find inputs whose simulated update matches the observed one"
attack, assembled from parts chosen by name.

Parts
- simulated update: :class:`VictimSimulator` replays the client's local SGD steps functionally (FedSGD is one step),
  so the simulated update is differentiable in the candidate images;
- matching objective (:data:`OBJECTIVES`): cosine, L2, ...;
- regularisers (:data:`REGULARIZERS`): total variation, ...;
- optimiser (:data:`OPTIMIZERS`): Adam on signed gradients with step decay, ...;
- search space: candidate pixels in normalised space, projected to the valid box.

Independent problems (images or clients that share the public model) and restarts run as one computation:
``vmap`` over problems (each with its own target update and labels) around ``vmap`` over restarts.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, replace_all_batch_norm_modules_, vmap

Tensors = dict[str, torch.Tensor]

# ------------------------------------------------------------------------------------------------------------
# Simulated update


class VictimSimulator:
    """A functional copy of the public model that replays the client's local steps.

    BatchNorm uses batch statistics (clients train in train mode) and keeps no running statistics, which would be
    in-place state that ``vmap`` cannot batch and that does not enter the parameter update anyway.
    """

    def __init__(self, model: nn.Module, schedule: list[np.ndarray], lr: float, device: torch.device | str = "cpu"):
        self.model = copy.deepcopy(model).to(device)
        replace_all_batch_norm_modules_(self.model)
        self.model.train()
        self.params: Tensors = {k: v.detach() for k, v in self.model.named_parameters()}
        # Leaves for the plain-autograd path (one candidate at a time), where torch.func's wrappers only cost time.
        self.leaf_params: Tensors = {k: v.detach().clone().requires_grad_(True) for k, v in self.params.items()}
        self.buffers: Tensors = {k: v.detach() for k, v in self.model.named_buffers()}
        self.schedule = [torch.as_tensor(np.asarray(s, dtype=np.int64), device=device) for s in schedule]
        self.lr = lr

    @property
    def num_parameters(self) -> int:
        return sum(v.numel() for v in self.params.values())

    def loss(self, params: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(self.model, (params, self.buffers), (x,))
        if y.is_floating_point():  # soft labels (probabilities)
            return -(y * logits.log_softmax(-1)).sum(-1).mean()
        return nn.functional.cross_entropy(logits, y)

    def _grads(self, params: Tensors, x: torch.Tensor, y: torch.Tensor, functional: bool) -> Tensors:
        if functional:  # composable with vmap
            return torch.func.grad(self.loss)(params, x, y)
        names = list(params)
        grads = torch.autograd.grad(self.loss(params, x, y), [params[k] for k in names], create_graph=True)
        return dict(zip(names, grads))

    def update(self, x: torch.Tensor, y: torch.Tensor, functional: bool = True) -> Tensors:
        """Parameter update (new minus old) after the client's SGD steps on candidate batch ``x``.

        ``functional=True`` uses torch.func (needed under vmap); ``False`` plain autograd, same arithmetic."""
        start = self.params if functional else self.leaf_params
        params = start
        for positions in self.schedule:
            grads = self._grads(params, x[positions], y[positions], functional)
            params = {k: params[k] - self.lr * grads[k] for k in params}
        return {k: params[k] - start[k] for k in params}


# ------------------------------------------------------------------------------------------------------------
# Registries of parts

Objective = Callable[[Tensors, Tensors], torch.Tensor]
OBJECTIVES: dict[str, Objective] = {}
Regularizer = Callable[[torch.Tensor], torch.Tensor]
REGULARIZERS: dict[str, Regularizer] = {}


def register(registry: dict, name: str):
    def wrap(fn):
        registry[name] = fn
        return fn

    return wrap


@register(OBJECTIVES, "cosine")
def cosine_distance(sim: Tensors, target: Tensors) -> torch.Tensor:
    """1 - cosine similarity of the whole (concatenated) update, as in Inverting Gradients."""
    dot = sum((sim[k] * target[k]).sum() for k in target)
    sim_norm = sum(sim[k].pow(2).sum() for k in target).sqrt()
    target_norm = sum(target[k].pow(2).sum() for k in target).sqrt()
    return 1.0 - dot / (sim_norm * target_norm + 1e-12)


@register(OBJECTIVES, "l2")
def squared_l2(sim: Tensors, target: Tensors) -> torch.Tensor:
    """Squared Euclidean distance of the updates, as in DLG."""
    return sum((sim[k] - target[k]).pow(2).sum() for k in target)


@register(REGULARIZERS, "tv")
def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (anisotropic TV, IG's definition)."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "signed_adam"
    lr: float = 0.1
    decay_milestones: tuple[float, ...] = (3 / 8, 5 / 8, 7 / 8)  # fractions of the budget
    decay_gamma: float = 0.1


class SignedAdam:
    """Adam on the sign of the gradient with step decay. Adam is element-wise, so one instance over the stacked
    candidates of all problems and restarts is exactly independent optimisers per restart."""

    def __init__(self, variable: torch.Tensor, spec: OptimizerSpec, iterations: int, signed: bool = True):
        self.variable = variable
        self.signed = signed
        self.opt = torch.optim.Adam([variable], lr=spec.lr)
        milestones = sorted({int(iterations * f) for f in spec.decay_milestones})
        self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, milestones=milestones, gamma=spec.decay_gamma)

    def step(self, grad: torch.Tensor) -> None:
        self.variable.grad = grad.sign() if self.signed else grad
        self.opt.step()
        self.sched.step()


OPTIMIZERS: dict[str, Callable[..., SignedAdam]] = {
    "signed_adam": lambda var, spec, iters: SignedAdam(var, spec, iters, signed=True),
    "adam": lambda var, spec, iters: SignedAdam(var, spec, iters, signed=False),
}


# ------------------------------------------------------------------------------------------------------------
# Problem and loop


@dataclass
class InversionProblem:
    """``P`` independent inversion problems that share one public model and one client step schedule."""

    simulator: VictimSimulator
    targets: Tensors  # each [P, *param_shape]: the observed updates
    labels: torch.Tensor  # [P, B] integer labels (or [P, B, classes] soft labels)
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_problems(self) -> int:
        return self.labels.shape[0]

    @property
    def batch_size(self) -> int:
        return self.labels.shape[1]


@dataclass(frozen=True)
class EngineSpec:
    objective: str = "cosine"
    regularizers: tuple[tuple[str, float], ...] = (("tv", 1e-2),)
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    iterations: int = 4800
    restarts: int = 1
    boxed: bool = True
    init: str = "randn"
    trace_every: int = 100
    # How candidates (problems x restarts) are computed: "vmap" batches them in one computation (pays off for small,
    # overhead-bound victims), "loop" runs plain autograd one after another (faster for one candidate and for large
    # victims, see benchmarks/README.md), "auto" picks by candidate count and victim size.
    batching: str = "auto"
    compile: bool = False  # torch.compile the batched step (~1 min to compile, then ~2.5x faster on LeNet)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {sorted(OBJECTIVES)}")
        for name, _ in self.regularizers:
            if name not in REGULARIZERS:
                raise ValueError(f"unknown regularizer {name!r}; choose one of {sorted(REGULARIZERS)}")
        if self.optimizer.name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer.name!r}; choose one of {sorted(OPTIMIZERS)}")
        if self.batching not in ("auto", "vmap", "loop"):
            raise ValueError(f"unknown batching {self.batching!r}; use auto, vmap or loop")


@dataclass
class EngineResult:
    images: torch.Tensor  # [P, B, C, H, W] in [0, 1], best restart per problem
    losses: torch.Tensor  # [P] matching loss of the chosen restart
    chosen_restart: torch.Tensor  # [P]
    trace: list[tuple[int, list[float]]]  # (iteration, best matching loss per problem)
    seconds: float
    iterations: int


class AttackEngine:
    def __init__(self, spec: EngineSpec, device: torch.device | str = "cpu", seed: int = 0):
        self.spec = spec
        self.device = torch.device(device)
        self.seed = seed

    VMAP_MAX_PARAMETERS = 1_000_000  # above this the victim is compute-bound and vmap stops paying off

    def _per_candidate(self, problem: InversionProblem, functional: bool = True) -> Callable:
        objective = OBJECTIVES[self.spec.objective]
        regs = [(REGULARIZERS[name], weight) for name, weight in self.spec.regularizers if weight]

        def loss(x: torch.Tensor, y: torch.Tensor, target: Tensors):
            matching = objective(problem.simulator.update(x, y, functional), target)
            total = matching
            for reg, weight in regs:
                total = total + weight * reg(x)
            return total, matching

        return loss

    def _executors(self, problem: InversionProblem, candidates: int) -> tuple[Callable, Callable]:
        """(step, score) over stacked candidates [P, R, ...]: step returns (gradients, matching losses)."""
        batching = self.spec.batching
        if batching == "auto":
            small = problem.simulator.num_parameters <= self.VMAP_MAX_PARAMETERS
            batching = "vmap" if candidates > 1 and small else "loop"
        if batching == "vmap":
            per = self._per_candidate(problem, functional=True)
            over_restarts = vmap(grad_and_value(per, has_aux=True), in_dims=(0, None, None))
            batched = vmap(over_restarts, in_dims=(0, 0, 0))
            if self.spec.compile:
                batched = torch.compile(batched)

            def step(x, labels, targets):
                grads, (_, matching) = batched(x, labels, targets)
                return grads, matching

            scorer = vmap(vmap(per, in_dims=(0, None, None)), in_dims=(0, 0, 0))

            def score(x, labels, targets):
                with torch.no_grad():
                    return scorer(x, labels, targets)[1]

            return step, score

        per = self._per_candidate(problem, functional=False)

        def each(x, labels, targets, with_grad: bool):
            P, R = x.shape[:2]
            grads = torch.zeros_like(x) if with_grad else None
            matching = torch.empty(P, R, device=x.device)
            for p in range(P):
                target = {k: v[p] for k, v in targets.items()}
                for r in range(R):
                    candidate = x[p, r].detach().requires_grad_(True)
                    with torch.enable_grad():
                        total, match = per(candidate, labels[p], target)
                        if with_grad:
                            grads[p, r] = torch.autograd.grad(total, candidate)[0]
                    matching[p, r] = match.detach()
            return grads, matching

        return (lambda x, labels, targets: each(x, labels, targets, True),
                lambda x, labels, targets: each(x, labels, targets, False)[1])

    def _init(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        if self.spec.init == "randn":
            return torch.randn(shape, generator=generator)
        if self.spec.init == "rand":
            return torch.rand(shape, generator=generator) * 2 - 1
        if self.spec.init == "zeros":
            return torch.zeros(shape)
        raise ValueError(f"unknown init {self.spec.init!r}; use randn, rand or zeros")

    def run(self, problem: InversionProblem) -> EngineResult:
        spec, dev = self.spec, self.device
        P, B, R = problem.num_problems, problem.batch_size, spec.restarts
        generator = torch.Generator().manual_seed(self.seed)
        x = self._init((P, R, B, *problem.image_shape), generator).to(dev).requires_grad_(True)
        labels = problem.labels.to(dev)
        targets = {k: v.to(dev) for k, v in problem.targets.items()}

        mean = torch.tensor(problem.mean, device=dev).view(-1, 1, 1)
        std = torch.tensor(problem.std, device=dev).view(-1, 1, 1)
        low, high = (0 - mean) / std, (1 - mean) / std

        step_fn, score_fn = self._executors(problem, P * R)
        optimizer = OPTIMIZERS[spec.optimizer.name](x, spec.optimizer, spec.iterations)

        trace: list[tuple[int, torch.Tensor]] = []
        start = time.perf_counter()
        for it in range(spec.iterations):
            grads, matching = step_fn(x.detach(), labels, targets)
            optimizer.step(grads)
            with torch.no_grad():
                if spec.boxed:
                    x.data = torch.maximum(torch.minimum(x, high), low)
            if spec.trace_every and (it + 1) % spec.trace_every == 0:
                trace.append((it + 1, matching.detach().clone()))

        # Score the final candidates (the loop's losses lag one step behind the last update).
        matching = score_fn(x.detach(), labels, targets)
        seconds = time.perf_counter() - start
        scores = torch.where(torch.isfinite(matching), matching, torch.full_like(matching, math.inf))
        chosen = scores.argmin(dim=1)
        best = x.detach()[torch.arange(P, device=dev), chosen]
        images = (best * std + mean).clamp(0, 1).cpu()
        losses = scores[torch.arange(P, device=dev), chosen].cpu()
        trace_rows = [(it, torch.nan_to_num(m, nan=math.inf).min(dim=1).values.cpu().tolist()) for it, m in trace]
        return EngineResult(images, losses, chosen.cpu(), trace_rows, seconds, spec.iterations)
