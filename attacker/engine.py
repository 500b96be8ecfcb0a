"""The attack engine: one optimisation loop for every "find inputs whose simulated update matches the observed one"
attack, assembled from parts chosen by name.

Parts
- simulated update: :class:`VictimSimulator` replays the client's local SGD steps (FedSGD is one step), so the
  simulated update is differentiable in the candidate inputs;
- search space (:data:`SEARCH_SPACES`): what is optimised (pixels; pixels and soft labels) and how it is projected;
- matching objective (:data:`OBJECTIVES`): cosine, L2, per-layer cosine, masked cosine;
- regularisers (:data:`REGULARIZERS`): total variation, L2 image prior, BatchNorm fidelity, group consistency,
  feature matching;
- optimiser (:data:`OPTIMIZERS`): Adam on signed gradients with step decay, Adam, L-BFGS (batched per candidate).

Independent problems (images or clients that share the public model) and restarts are stacked as candidates
``[P, R, ...]``. They run as one computation (``vmap`` over problems around ``vmap`` over restarts) or one after
another with plain autograd, whichever is faster for the victim (``EngineSpec.batching``).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad_and_value, replace_all_batch_norm_modules_, vmap

from fedsim.registry import lookup, register
from fedsim.training import set_bn_mode

from .stacked import (StackedBatchNorm, batch_statistics, per_candidate, stack_model, stackable,
                      to_stacked_layout)

Tensors = dict[str, torch.Tensor]

# ------------------------------------------------------------------------------------------------------------
# Simulated update


class VictimSimulator:
    """A functional copy of the public model that replays the client's local steps.

    BatchNorm follows the client's ``bn_mode``: with batch statistics ("train"; running statistics are dropped, they
    would be in-place state that ``vmap`` cannot batch and they do not enter the parameter update) or with the
    public model's fixed running statistics ("eval").
    """

    def __init__(self, model: nn.Module, schedule: list[np.ndarray], lr: float, device: torch.device | str = "cpu",
                 bn_mode: str = "train"):
        self.model = copy.deepcopy(model).to(device)
        self.bn_mode = bn_mode
        if bn_mode == "train":
            replace_all_batch_norm_modules_(self.model)
        set_bn_mode(self.model, bn_mode)
        self.params: Tensors = {k: v.detach() for k, v in self.model.named_parameters()}
        # Leaves for the plain-autograd path (one candidate at a time), where torch.func's wrappers only cost time.
        self.leaf_params: Tensors = {k: v.detach().clone().requires_grad_(True) for k, v in self.params.items()}
        self.buffers: Tensors = {k: v.detach() for k, v in self.model.named_buffers()}
        self.schedule = [torch.as_tensor(np.asarray(s, dtype=np.int64), device=device) for s in schedule]
        self.lr = lr
        self.bn_layers = [name for name, m in self.model.named_modules()
                          if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        linears = [name for name, m in self.model.named_modules() if isinstance(m, nn.Linear)]
        self.feature_layer = linears[-1] if linears else None  # the classifier, whose input analytic recovery gives
        self._stacked: nn.Module | None = None  # built on first use, see attacker/stacked.py

    @property
    def stackable(self) -> bool:
        return stackable(self.model)

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
        return self.update_capturing(x, y, functional)[0]

    def update_capturing(self, x: torch.Tensor, y: torch.Tensor, functional: bool = True,
                         capture: tuple[str, ...] = ()) -> tuple[Tensors, dict]:
        """``update`` plus what the regularisers read from the first step's forward (``capture``: ``"bn"``, the
        BatchNorm input statistics; ``"features"``, the classifier input), taken from that same forward pass
        instead of an extra one."""
        return self._replay(self.params if functional else self.leaf_params,
                            lambda positions: (x[positions], y[positions]),
                            lambda params, xb, yb: self._grads(params, xb, yb, functional),
                            lambda captured: self._capture(self.model, captured, capture))

    def stacked_update(self, x: torch.Tensor, y: torch.Tensor, capture: tuple[str, ...] = ()) -> tuple[Tensors, dict]:
        """Updates of C candidates at once (``x`` [C, B, ...], ``y`` [C, B] or soft [C, B, K]), each [C, *shape],
        through the stacked network (attacker/stacked.py). ``capture`` may ask for the first step's BatchNorm input
        statistics (``"bn"``: list of (mean, var), each [C, channels]) and classifier input (``"features"``:
        [C, B, in]), which the regularisers need and which would otherwise cost extra forward passes."""
        if self._stacked is None:
            self._stacked = stack_model(self.model)
        count = x.shape[0]

        def grads(params, xb, yb):
            values = torch.autograd.grad(self._stacked_loss(params, xb, yb), list(params.values()), create_graph=True)
            return dict(zip(params, values))

        return self._replay({k: v.expand(count, *v.shape) for k, v in self.leaf_params.items()},
                            lambda positions: (x[:, positions], y[:, positions]), grads,
                            lambda captured: self._capture(self._stacked, captured, capture, count))

    def _replay(self, start: Tensors, batch: Callable, grads_of: Callable, hooks: Callable) -> tuple[Tensors, dict]:
        """The client's local SGD steps from ``start`` (the one replay every batching path uses): ``batch(positions)``
        gives a step's inputs and labels, ``grads_of(params, x, y)`` their gradients, ``hooks(captured)`` installs the
        first step's capture (removed after it). Returns the update (new minus start) and what was captured."""
        params, captured = start, {}
        for step, positions in enumerate(self.schedule):
            handles = hooks(captured) if step == 0 else []
            try:
                grads = grads_of(params, *batch(positions))
            finally:
                for handle in handles:
                    handle.remove()
            params = {k: params[k] - self.lr * grads[k] for k in params}
        return {k: params[k] - start[k] for k in params}, captured

    def _stacked_loss(self, params: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        count, batch = x.shape[:2]
        logits = functional_call(self._stacked, params, (to_stacked_layout(x),))
        logits = logits.reshape(batch, count, -1).transpose(0, 1)  # [C, B, K]
        if y.is_floating_point():
            per = -(y * logits.log_softmax(-1)).sum(-1).mean(1)
        else:
            per = nn.functional.cross_entropy(logits.reshape(count * batch, -1), y.reshape(-1),
                                              reduction="none").view(count, batch).mean(1)
        return per.sum()  # candidates are independent: the gradient of the sum is each one's own gradient

    def _capture(self, network: nn.Module, captured: dict, what: tuple[str, ...], count: int = 0) -> list:
        """Hooks on ``network`` that store BatchNorm input statistics (``"bn"``: list of (mean, var) per
        layer, each [channels], or [count, channels] for the stacked network of ``count`` candidates) and the
        classifier input (``"features"``) into ``captured``. The caller removes the returned handles."""
        handles = []
        if "bn" in what:
            captured["bn"] = []

            def bn_hook(_module, inputs):  # per (stacked) channel over batch and space
                mean, var = batch_statistics(inputs[0])[:2]
                shape = (count, -1) if count else (-1,)
                captured["bn"].append((mean.view(shape), var.view(shape)))

            for name in self.bn_layers:
                layer = network.get_submodule(name)
                if isinstance(layer, StackedBatchNorm):  # computes the statistics anyway: shares them
                    handles.append(layer.record_batch_statistics(captured["bn"], count))
                else:
                    handles.append(layer.register_forward_pre_hook(bn_hook))
        if "features" in what and self.feature_layer is not None:
            def feature_hook(_module, inputs):
                captured["features"] = per_candidate(inputs[0], count) if count else inputs[0]

            handles.append(network.get_submodule(self.feature_layer).register_forward_pre_hook(feature_hook))
        return handles

    def _first_step_forward(self, x: torch.Tensor, what: tuple[str, ...]) -> dict:
        captured: dict = {}
        handles = self._capture(self.model, captured, what)
        try:
            functional_call(self.model, (self.params, self.buffers), (x[self.schedule[0]],))
        finally:
            for handle in handles:
                handle.remove()
        return captured

    def bn_statistics(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Batch mean and biased variance at every BatchNorm input for the client's first step on ``x``."""
        return self._first_step_forward(x, ("bn",))["bn"]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Input of the classifier (``feature_layer``) for the first-step batch."""
        return self._first_step_forward(x, ("features",))["features"]


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


# ------------------------------------------------------------------------------------------------------------
# Search spaces


class SearchSpace:
    """What an attack searches. A space owns its variables (each ``[P, R, ...]``: problems x restarts), their
    initialisation, how one candidate's variables decode into model inputs (normalised images) and labels, and
    their projection after every step. The engine's loop and scoring know nothing else about them.

    Subclasses implement :meth:`init` and :meth:`decode`; :meth:`decode_many` (flat candidates ``[N, ...]``, used by
    the stacked path and for read-out) defaults to ``vmap(decode)``; :meth:`project_` to nothing."""

    searches_labels = False  # labels come out of the search (DLG's joint labels), not from the threat model
    fixed: tuple[str, ...] = ()  # variables that are per-candidate inputs, not searched (e.g. a fixed latent)

    def __init__(self, problem: "InversionProblem") -> None:
        self.problem = problem
        self.mean = torch.tensor(problem.mean).view(-1, 1, 1)
        self.std = torch.tensor(problem.std).view(-1, 1, 1)

    def to(self, device: torch.device) -> "SearchSpace":
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def init(self, P: int, R: int, generator: torch.Generator) -> Tensors:
        raise NotImplementedError

    def init_each(self, seeds: Sequence[int], R: int) -> Tensors:
        """Initial variables of every problem ([P, R, ...]), each problem drawn from its own seed: a problem starts
        from the same point whichever problems share its run (and in whatever order)."""
        draws = [self.init(1, R, torch.Generator().manual_seed(int(s))) for s in seeds]
        return {k: torch.cat([d[k] for d in draws]) for k in draws[0]}

    def decode(self, variables: Tensors, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One candidate -> (model input [B, C, H, W], labels [B] or soft [B, K])."""
        raise NotImplementedError

    def decode_many(self, variables: Tensors, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat candidates ``[N, ...]`` and labels ``[N, B]`` -> (inputs [N, B, C, H, W], labels)."""
        return vmap(self.decode)(variables, labels)

    def project_(self, variables: Tensors) -> None:
        """Projection after each step, in place (none by default)."""

    def labels_out(self, variables: Tensors, labels: torch.Tensor) -> torch.Tensor:
        """Stacked variables and the given labels [P, B] -> the labels each candidate stands for [P, R, B]."""
        R = next(iter(variables.values())).shape[1]
        return labels[:, None].expand(-1, R, -1)

    def inputs(self, variables: Tensors, labels: torch.Tensor) -> torch.Tensor:
        """Every candidate's model input [P, R, B, C, H, W] (for group consensus and read-out)."""
        P, R = next(iter(variables.values())).shape[:2]
        flat = {k: v.reshape(P * R, *v.shape[2:]) for k, v in variables.items()}
        x, _ = self.decode_many(flat, labels[:, None].expand(P, R, *labels.shape[1:]).reshape(P * R, *labels.shape[1:]))
        return x.reshape(P, R, *x.shape[1:])

    def unit_images(self, variables: Tensors, labels: torch.Tensor) -> torch.Tensor:
        """Every candidate's images in [0, 1], [P, R, B, C, H, W]."""
        return (self.inputs(variables, labels) * self.std + self.mean).clamp(0, 1)


def _init_images(problem: "InversionProblem", P: int, R: int, init: str, generator: torch.Generator) -> torch.Tensor:
    shape = (P, R, problem.batch_size, *problem.image_shape)
    if init == "randn":
        return torch.randn(shape, generator=generator)
    if init == "rand":
        return torch.rand(shape, generator=generator) * 2 - 1
    if init == "zeros":
        return torch.zeros(shape)
    raise ValueError(f"unknown init {init!r}; use randn, rand or zeros")


class PixelSpace(SearchSpace):
    """Pixels of the (normalised) model input, optionally boxed to the valid range [0, 1] after every step."""

    def __init__(self, problem: "InversionProblem", init: str = "randn", boxed: bool = True) -> None:
        super().__init__(problem)
        self.init_mode, self.boxed = init, boxed

    def init(self, P, R, generator):
        return {"x": _init_images(self.problem, P, R, self.init_mode, generator)}

    def decode(self, variables, labels):
        return variables["x"], labels

    def decode_many(self, variables, labels):
        return variables["x"], labels

    def project_(self, variables):
        if self.boxed:
            low, high = (0 - self.mean) / self.std, (1 - self.mean) / self.std
            variables["x"].data = torch.maximum(torch.minimum(variables["x"], high), low)


class PixelAndLabelSpace(PixelSpace):
    """DLG: pixels and soft labels optimised jointly (labels as logits, read out by argmax)."""

    searches_labels = True

    def init(self, P, R, generator):
        pr = self.problem
        return {"x": _init_images(pr, P, R, self.init_mode, generator),
                "label_logits": torch.randn(P, R, pr.batch_size, pr.num_classes, generator=generator)}

    def decode(self, variables, labels):
        return variables["x"], variables["label_logits"].softmax(-1)

    decode_many = decode

    def labels_out(self, variables, labels):
        return variables["label_logits"].argmax(-1)


# Spaces an EngineSpec can name (built from the problem, ``init`` and ``boxed``); spaces that need more (a
# generator, fixed latents) are built by their attack and passed to AttackEngine.run.
SEARCH_SPACES: dict[str, type[PixelSpace]] = {"pixels": PixelSpace, "pixels_and_labels": PixelAndLabelSpace}


# ------------------------------------------------------------------------------------------------------------
# Optimisers: step(closure) where closure() -> (total [P, R], matching [P, R], grads {name: [P, R, ...]})


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "signed_adam"
    lr: float = 0.1
    decay_milestones: tuple[float, ...] = (3 / 8, 5 / 8, 7 / 8)  # fractions of the budget
    decay_gamma: float = 0.1
    max_iter: int = 20  # L-BFGS: iterations per step (one gradient evaluation each without a line search)
    history_size: int = 100  # L-BFGS memory
    # L-BFGS: "strong_wolfe" (torch.optim.LBFGS's line search, at most max_iter * 5 // 4 gradient evaluations per
    # step) or None (a fixed step of lr along each direction, as Zhu et al.'s DLG)
    line_search: str | None = None


def fused_adam(tensors) -> bool:
    """Whether torch's fused Adam kernel takes these tensors (floating point on CPU or CUDA)."""
    return all(t.is_floating_point() and t.device.type in ("cpu", "cuda") for t in tensors)


class AdamOptimizer:
    """Adam (optionally on the sign of the gradient) with step decay. Adam is element-wise, so one instance over
    the stacked candidates is exactly independent optimisers per candidate."""

    def __init__(self, variables: Tensors, spec: OptimizerSpec, iterations: int, signed: bool):
        self.variables, self.signed = variables, signed
        # fused: one pass over parameter, gradient and moments; on CPU 4.7x faster than the default foreach kernels
        # for GI-w's millions of copied generator weights (57 -> 12 ms for 8 DCGAN-32 copies, one thread)
        self.opt = torch.optim.Adam(list(variables.values()), lr=spec.lr, fused=fused_adam(variables.values()))
        milestones = sorted({int(iterations * f) for f in spec.decay_milestones})
        self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, milestones=milestones, gamma=spec.decay_gamma)
        self.evaluations = 0

    def step(self, closure):
        _, matching, grads = closure()
        self.evaluations += 1
        for key, var in self.variables.items():
            var.grad = grads[key].sign() if self.signed else grads[key]
        self.opt.step()
        self.sched.step()
        return matching


def _cubic_minimum(x1: float, f1: float, g1: float, x2: float, f2: float, g2: float,
                   bounds: tuple[float, float] | None = None) -> float:
    """The minimiser of the cubic through two points with their slopes, clamped to ``bounds`` (default: between
    the points); the bounds' midpoint where the cubic has none (torch.optim.lbfgs's interpolation)."""
    low, high = bounds if bounds is not None else (min(x1, x2), max(x1, x2))
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1 * d1 - g1 * g2
    if d2_square < 0:
        return (low + high) / 2.0
    d2 = math.sqrt(d2_square)
    if x1 <= x2:
        at = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    else:
        at = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    return min(max(at, low), high)


def strong_wolfe_search(t: float, f: float, gtd: float, d_norm: float, max_ls: int, c1: float = 1e-4,
                        c2: float = 0.9, tolerance_change: float = 1e-9):
    """torch.optim.LBFGS's strong-Wolfe line search for one candidate, as a coroutine: it yields each trial step
    and is sent back ``(f, gtd)`` there (loss and directional derivative), so the trial steps of many candidates are
    evaluated in one batched call. Returns ``(t, f, k)``: the accepted step, its loss and which evaluation it was
    (0-based; -1 for the starting point), whose gradient becomes the new one."""
    f_new, gtd_new = yield t
    k = 0
    t_prev, f_prev, gtd_prev, k_prev = 0.0, f, gtd, -1
    done, ls_iter = False, 0
    while ls_iter < max_ls:  # bracket a step that satisfies the Wolfe conditions
        if f_new > f + c1 * t * gtd or (ls_iter > 1 and f_new >= f_prev):
            bracket, bracket_f, bracket_k, bracket_gtd = [t_prev, t], [f_prev, f_new], [k_prev, k], [gtd_prev, gtd_new]
            break
        if abs(gtd_new) <= -c2 * gtd:
            bracket, bracket_f, bracket_k, bracket_gtd = [t], [f_new], [k], [gtd_new]
            done = True
            break
        if gtd_new >= 0:
            bracket, bracket_f, bracket_k, bracket_gtd = [t_prev, t], [f_prev, f_new], [k_prev, k], [gtd_prev, gtd_new]
            break
        previous = t
        t = _cubic_minimum(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, bounds=(t + 0.01 * (t - t_prev), t * 10))
        t_prev, f_prev, gtd_prev, k_prev = previous, f_new, gtd_new, k
        f_new, gtd_new = yield t
        k += 1
        ls_iter += 1
    if ls_iter == max_ls:
        bracket, bracket_f, bracket_k, bracket_gtd = [0.0, t], [f, f_new], [-1, k], [gtd, gtd_new]
    insufficient = False
    low, high = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
    while not done and ls_iter < max_ls:  # zoom into the bracket
        if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
            break
        t = _cubic_minimum(bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1])
        eps = 0.1 * (max(bracket) - min(bracket))
        if min(max(bracket) - t, t - min(bracket)) < eps:  # too close to an end: move away unless progress was made
            if insufficient or t >= max(bracket) or t <= min(bracket):
                t = max(bracket) - eps if abs(t - max(bracket)) < abs(t - min(bracket)) else min(bracket) + eps
                insufficient = False
            else:
                insufficient = True
        else:
            insufficient = False
        f_new, gtd_new = yield t
        k += 1
        ls_iter += 1
        if f_new > f + c1 * t * gtd or f_new >= bracket_f[low]:
            bracket[high], bracket_f[high], bracket_k[high], bracket_gtd[high] = t, f_new, k, gtd_new
            low, high = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
        else:
            if abs(gtd_new) <= -c2 * gtd:
                done = True
            elif gtd_new * (bracket[high] - bracket[low]) >= 0:
                bracket[high], bracket_f[high] = bracket[low], bracket_f[low]
                bracket_k[high], bracket_gtd[high] = bracket_k[low], bracket_gtd[low]
            bracket[low], bracket_f[low], bracket_k[low], bracket_gtd[low] = t, f_new, k, gtd_new
    return bracket[low], bracket_f[low], bracket_k[low]


class BatchedLBFGS:
    """torch.optim.LBFGS's algorithm (same defaults and stopping tests, with or without its strong-Wolfe line
    search) run independently for every candidate on the flattened variables [C, D]: candidates that meet a
    stopping test stop moving. Without a line search a candidate moves ``lr`` along its direction, which diverges or
    stalls from some starts (DLG on CIFAR-10 test image 12: 3 of 3 starts failed, all converged with the line
    search, see experiments/geiping2020_table1.md)."""

    def __init__(self, variables: Tensors, spec: OptimizerSpec, iterations: int, tolerance_grad: float = 1e-7,
                 tolerance_change: float = 1e-9):
        self.variables, self.spec = variables, spec
        self.tol_grad, self.tol_change = tolerance_grad, tolerance_change
        first = next(iter(variables.values()))
        self.C = first.shape[0] * first.shape[1]
        self.keys = list(variables)
        self.shapes = {k: v.shape for k, v in variables.items()}
        # Curvature pairs: a ring of history_size slots [slot, candidate, D], allocated at the first pair. Slot
        # head-1-k holds every candidate's k-th newest pair, so each keeps its own newest pairs as its own torch
        # optimiser would (a candidate that adds none in a round has its column rotated to stay in order).
        self.S = self.Y = self.RHO = None
        self.head = 0  # the next slot
        self.stored = 0  # slots in use (the most pairs any candidate has)
        self.dir = self.prev_grad = self.t = None
        self.h_diag = torch.ones(self.C, device=first.device)
        self.n_iter = 0
        self.evaluations = 0

    def _flat(self, tensors: Tensors) -> torch.Tensor:
        return torch.cat([tensors[k].reshape(self.C, -1) for k in self.keys], dim=1)

    def _add(self, delta: torch.Tensor) -> None:
        offset = 0
        for k in self.keys:
            n = math.prod(self.shapes[k][2:])
            self.variables[k].data += delta[:, offset:offset + n].view(self.shapes[k])
            offset += n

    def _direction(self, g: torch.Tensor) -> torch.Tensor:
        # Two-loop recursion over the pairs, newest first: slot head-1-k holds every candidate's k-th newest pair
        # (zeros, a no-op, past its own count); each pair costs a few small kernels, so fused ones (vecdot,
        # addcmul) matter here.
        q = -g
        pairs = []
        for k in range(self.stored):
            at = (self.head - 1 - k) % self.spec.history_size
            s, y, rho = self.S[at], self.Y[at], self.RHO[at]
            a = rho * torch.linalg.vecdot(s, q)
            pairs.append((s, y, rho, a))
            q = torch.addcmul(q, a[:, None], y, value=-1.0)
        r = q * self.h_diag[:, None]
        for s, y, rho, a in reversed(pairs):
            r = torch.addcmul(r, (a - rho * torch.linalg.vecdot(y, r))[:, None], s)
        return r

    def step(self, closure):
        """One torch.optim.LBFGS step per candidate. A stopping test ends the *step* for that candidate (it stops
        moving and leaves its state as torch would), not the optimisation: every step starts it afresh."""
        if self.spec.line_search == "strong_wolfe":
            return self._step_with_line_search(closure)
        if self.spec.line_search is not None:
            raise ValueError(f"unknown line search {self.spec.line_search!r}; use strong_wolfe or none")
        total, matching, grads = closure()
        self.evaluations += 1
        g = self._flat(grads)
        active = g.abs().amax(1) > self.tol_grad  # torch returns at once from an optimal point
        for inner in range(self.spec.max_iter):
            if not bool(active.any()):
                break
            d, t = self._begin_iteration(g, active)
            prev_total = total.reshape(-1)
            active = active & ((g * d).sum(1) <= -self.tol_change)  # torch breaks before moving
            move = d * torch.where(active, t, 0.0)[:, None]
            self._add(move)
            if inner == self.spec.max_iter - 1:
                break
            total, matching, grads = closure()
            self.evaluations += 1
            g = self._flat(grads)
            stop = (g.abs().amax(1) <= self.tol_grad) | (move.abs().amax(1) <= self.tol_change)
            active = active & ~stop & ((total.reshape(-1) - prev_total).abs() >= self.tol_change)
        return matching


    def _begin_iteration(self, g: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An inner iteration's direction and initial step, as torch computes them. Candidates stopped earlier in
        this step keep the state of their last move (torch's state["d"], ...), so the next step's memory pair is
        that move."""
        self.n_iter += 1
        d = -g if self.n_iter == 1 else self._memory(g, active)
        t = torch.full((self.C,), self.spec.lr, device=g.device)
        if self.n_iter == 1:
            t = torch.clamp(1.0 / g.abs().sum(1), max=1.0) * self.spec.lr
        keep = active[:, None]
        self.prev_grad = g.clone() if self.prev_grad is None else torch.where(keep, g, self.prev_grad)
        self.dir = d if self.dir is None else torch.where(keep, d, self.dir)
        self.t = t if self.t is None else torch.where(active, t, self.t)
        return d, t

    def _memory(self, g: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Add the last move's curvature pair (for the candidates it is accepted for) and return the new direction."""
        y, s = g - self.prev_grad, self.dir * self.t[:, None]
        ys = (y * s).sum(1)
        accept = active & (ys > 1e-10)
        if bool(accept.any()):
            H = self.spec.history_size
            if self.S is None:
                shape = (H, self.C, g.shape[1])  # slot-major: one slot of every candidate is contiguous
                self.S, self.Y = g.new_zeros(shape), g.new_zeros(shape)
                self.RHO = g.new_zeros(shape[:2])
            skipped = torch.nonzero(~accept).flatten()
            if len(skipped):  # keep their pairs in age order under the advancing head: rotate their columns
                for ring in (self.S, self.Y, self.RHO):
                    ring[:, skipped] = ring[:, skipped].roll(1, 0)
            rows = torch.nonzero(accept).flatten()  # the head slot holds each accepting candidate's oldest pair
            self.S[self.head, rows], self.Y[self.head, rows] = s[rows], y[rows]
            self.RHO[self.head, rows] = 1.0 / ys[rows]
            self.head = (self.head + 1) % H
            self.stored = min(self.stored + 1, H)
            self.h_diag = torch.where(accept, ys / (y * y).sum(1).clamp_min(1e-20), self.h_diag)
        return self._direction(g)

    def _flat_variables(self) -> torch.Tensor:
        return torch.cat([self.variables[k].detach().reshape(self.C, -1) for k in self.keys], dim=1)

    def _set(self, flat: torch.Tensor) -> None:
        offset = 0
        for k in self.keys:
            n = math.prod(self.shapes[k][2:])
            self.variables[k].data.copy_(flat[:, offset:offset + n].view(self.shapes[k]))
            offset += n

    def _step_with_line_search(self, closure):
        """One step of torch.optim.LBFGS with ``line_search_fn="strong_wolfe"`` per candidate: every candidate's
        search is a :func:`strong_wolfe_search` coroutine, and each round of their trial steps is one closure call
        (candidates that are not searching sit at their current point)."""
        max_eval = self.spec.max_iter * 5 // 4
        total, matching, grads = closure()
        self.evaluations += 1
        loss, g = total.reshape(-1).clone(), self._flat(grads)
        evals = torch.ones(self.C, dtype=torch.long, device=g.device)
        active = g.abs().amax(1) > self.tol_grad
        for _ in range(self.spec.max_iter):
            if not bool(active.any()):
                break
            d, t = self._begin_iteration(g, active)
            prev_loss = loss.clone()
            gtd = (g * d).sum(1)
            active = active & (gtd <= -self.tol_change)
            if not bool(active.any()):
                break
            start = self._flat_variables()
            searching = {}
            for c in torch.nonzero(active).flatten().tolist():
                # torch runs its line search at its own default tolerance (1e-9), not the optimiser's
                search = strong_wolfe_search(float(t[c]), float(loss[c]), float(gtd[c]), float(d[c].abs().max()),
                                             max_ls=int(max_eval - evals[c]))
                searching[c] = (search, next(search))
            rows: dict[int, list[torch.Tensor]] = {c: [] for c in searching}  # the gradient of each evaluation
            accepted: dict[int, tuple[float, float, int]] = {}
            while searching:
                trial = torch.zeros(self.C, device=g.device)
                for c, (_, step) in searching.items():
                    trial[c] = step
                self._set(start + trial[:, None] * d)
                total_k, _, grads_k = closure()
                self.evaluations += 1
                g_k = self._flat(grads_k)
                gtd_k = (g_k * d).sum(1).tolist()
                f_k = total_k.reshape(-1).tolist()
                for c in list(searching):
                    rows[c].append(g_k[c].clone())
                    search = searching[c][0]
                    try:
                        searching[c] = (search, search.send((f_k[c], gtd_k[c])))
                    except StopIteration as end:
                        accepted[c] = end.value
                        del searching[c]
            step = torch.zeros(self.C, device=g.device)
            for c, (t_c, f_c, k_c) in accepted.items():
                step[c] = t_c
                loss[c] = f_c
                g[c] = rows[c][k_c] if k_c >= 0 else g[c]
                evals[c] += len(rows[c])
            self._set(start + step[:, None] * d)
            self.t = torch.where(active, step, self.t)
            stop = ((g.abs().amax(1) <= self.tol_grad) | (evals >= max_eval)
                    | ((d * step[:, None]).abs().amax(1) <= self.tol_change)
                    | ((loss - prev_loss).abs() < self.tol_change))
            active = active & ~stop
        return matching


OPTIMIZERS: dict[str, Callable] = {
    "signed_adam": lambda vars_, spec, iters: AdamOptimizer(vars_, spec, iters, signed=True),
    "adam": lambda vars_, spec, iters: AdamOptimizer(vars_, spec, iters, signed=False),
    "lbfgs": lambda vars_, spec, iters: BatchedLBFGS(vars_, spec, iters),
}


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


def lazy_consensus(x: torch.Tensor) -> torch.Tensor:
    """[P, R, B, C, H, W] -> the restart mean, for every restart."""
    return x.mean(dim=1, keepdim=True).expand_as(x)


def registered_consensus(x: torch.Tensor) -> torch.Tensor:
    """Align every restart to the lazy mean (translation, kornia's ImageRegistrator), average the aligned restarts,
    and warp that consensus back into each restart's own frame."""
    from .registration import invert, register_translation, warp_translation

    P, R, B = x.shape[:3]
    flat = x.reshape(P * R * B, *x.shape[3:]).detach()
    mean = x.mean(dim=1, keepdim=True).expand_as(x).reshape(P * R * B, *x.shape[3:]).detach()
    to_mean = register_translation(flat, mean)  # warps each restart onto the mean
    aligned = warp_translation(flat, to_mean).reshape(x.shape)
    consensus = aligned.mean(dim=1, keepdim=True).expand_as(x).reshape(P * R * B, *x.shape[3:])
    return warp_translation(consensus, invert(to_mean)).reshape(x.shape)


CONSENSUS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"lazy": lazy_consensus,
                                                                 "registered": registered_consensus}


@dataclass
class _Part:
    """One part of a (joint) problem inside a run: its executors, targets and the view onto the variables."""

    view: dict[str, str]
    step: Callable
    score: Callable
    labels: torch.Tensor
    targets: Tensors
    aux: Tensors
    anchors: torch.Tensor

    def local(self, variables: Tensors) -> Tensors:
        """The variables under the names the space decodes for this part."""
        if not self.view:
            return variables
        return {local: variables[name] for local, name in self.view.items()}


class AttackEngine:
    VMAP_MAX_PARAMETERS = 1_000_000  # above this the victim is compute-bound and batching stops paying off
    # Without BatchNorm, stacked beats vmap up to about this many candidates (LeNet(Zhu), one thread: 14 vs 18 ms
    # per iteration at 8, 33 vs 38 at 32, tie at 64, 95 vs 82 at 100); many small groups make grouped convolutions lose.
    STACKED_MAX_CANDIDATES = 48

    def __init__(self, spec: EngineSpec, device: torch.device | str = "cpu", seed: int = 0):
        self.spec = spec
        self.device = torch.device(device)
        self.seed = seed

    def _assemble(self, problem: InversionProblem, space: SearchSpace) -> tuple[Callable, tuple[str, ...]]:
        """The per-candidate loss from a candidate's model input ``x`` and simulated update, the one place it is put
        together for every batching path: ``matching_weight * objective(update / scale, target) + sum_i w_i
        reg_i(x)``. Returns it with what the simulated update must capture for the regularisers."""
        objective = OBJECTIVES[self.spec.objective]
        regs = [(REGULARIZERS[name], weight) for name, weight in self.spec.regularizers if weight]
        sim = problem.simulator
        scale, matching_weight = self.spec.update_scale, self.spec.matching_weight

        def assemble(x, update: Tensors, captured: dict, target: Tensors, aux: Tensors, anchor: torch.Tensor,
                     variables: Tensors):
            matching = objective({k: v / scale for k, v in update.items()}, target)
            ctx = CandidateContext(sim, aux, anchor, captured.get("bn"), captured.get("features"), variables, space)
            total = matching_weight * matching
            for reg, weight in regs:
                total = total + weight * reg(x, ctx)
            return total, matching

        return assemble, self._capture_for(regs)

    def _per_candidate(self, problem: InversionProblem, space: SearchSpace, functional: bool = True) -> Callable:
        assemble, capture = self._assemble(problem, space)

        def loss(variables: Tensors, y: torch.Tensor, target: Tensors, aux: Tensors, anchor: torch.Tensor):
            x, y = space.decode(variables, y)
            update, captured = problem.simulator.update_capturing(x, y, functional, capture)
            return assemble(x, update, captured, target, aux, anchor, variables)

        return loss

    @staticmethod
    def _capture_for(regs: list) -> tuple[str, ...]:
        """What the simulated update should capture for these regularisers (saves them a forward pass)."""
        return tuple(name for name in ("bn", "features") if any(REGULARIZERS[name] is r for r, _ in regs))

    @classmethod
    def auto_batching(cls, sim: VictimSimulator, candidates: int) -> str:
        """Fastest path measured on CPU (benchmarks/README.md): one candidate or a large, compute-bound victim runs
        plain autograd; small stackable victims run stacked (1.4-2.8x faster than the loop on ConvNet-8/16, 1.3-1.5x
        faster than vmap on LeNet(Zhu) at 8 restarts), except BatchNorm-free ones with very many candidates, where
        vmap wins; other small victims run vmap without BatchNorm (vmap over BatchNorm was slower than the loop)."""
        if candidates == 1 or sim.num_parameters > cls.VMAP_MAX_PARAMETERS:
            return "loop"
        if sim.stackable and (sim.bn_layers or candidates <= cls.STACKED_MAX_CANDIDATES):
            return "stacked"
        return "loop" if sim.bn_layers else "vmap"

    def default_space(self, problem: InversionProblem) -> SearchSpace:
        return SEARCH_SPACES[self.spec.search_space](problem, init=self.spec.init, boxed=self.spec.boxed)

    def _executors(self, problem: InversionProblem, candidates: int,
                   space: SearchSpace | None = None) -> tuple[Callable, Callable]:
        """(step, score) over stacked candidates: step(vars, labels, targets, aux, anchors) returns
        (totals [P, R], matching [P, R], grads); score returns matching."""
        space = (space or self.default_space(problem)).to(self.device)
        batching = self.spec.batching
        if batching == "auto":
            # torch.compile is wired to the vmap step (torch.func composes with it; the stacked step's nested
            # autograd.grad does not compile into one graph), so compile = true runs vmap.
            batching = "vmap" if self.spec.compile else self.auto_batching(problem.simulator, candidates)
        if batching == "stacked":
            if not problem.simulator.stackable:
                raise ValueError("batching 'stacked' needs a victim built from Conv2d, BatchNorm, Linear and "
                                 "channel-wise layers; use auto, vmap or loop")
            return self._stacked_executors(problem, space)
        if batching == "vmap":
            per = self._per_candidate(problem, space, functional=True)
            inner = (0, None, None, None, 0)  # over restarts: variables and anchors vary
            outer = (0, 0, 0, 0, 0)  # over problems: everything varies
            batched = vmap(vmap(grad_and_value(per, has_aux=True), in_dims=inner), in_dims=outer)
            if self.spec.compile:
                batched = torch.compile(batched)
            scorer = vmap(vmap(per, in_dims=inner), in_dims=outer)

            def step(variables, labels, targets, aux, anchors):
                grads, (totals, matching) = batched(variables, labels, targets, aux, anchors)
                return totals, matching, grads

            def score(variables, labels, targets, aux, anchors):
                with torch.no_grad():
                    return scorer(variables, labels, targets, aux, anchors)[1]

            return step, score

        per = self._per_candidate(problem, space, functional=False)

        def each(variables, labels, targets, aux, anchors, with_grad: bool):
            first = next(iter(variables.values()))
            P, R = first.shape[:2]
            # all filled below; one candidate's gradients are taken as they are
            grads = ({k: torch.empty_like(v) for k, v in variables.items()} if P * R > 1 else {}) if with_grad else None
            totals = torch.empty(P, R, device=first.device)
            matching = torch.empty(P, R, device=first.device)
            for p in range(P):
                target = {k: v[p] for k, v in targets.items()}
                aux_p = {k: v[p] for k, v in aux.items()}
                for r in range(R):
                    cand = {k: v[p, r].detach().requires_grad_(True) for k, v in variables.items()}
                    with torch.enable_grad():
                        total, match = per(cand, labels[p], target, aux_p, anchors[p, r])
                        if with_grad:
                            g = torch.autograd.grad(total, list(cand.values()))
                            for k, gk in zip(cand, g):
                                if P * R == 1:  # a view, not a copy of (possibly millions of) generator weights
                                    grads[k] = gk[None, None]
                                else:
                                    grads[k][p, r] = gk
                    totals[p, r], matching[p, r] = total.detach(), match.detach()
            return totals, matching, grads

        return (lambda *a: each(*a, with_grad=True), lambda *a: each(*a, with_grad=False)[1])

    def _stacked_executors(self, problem: InversionProblem, space: SearchSpace) -> tuple[Callable, Callable]:
        """All candidates through the stacked network (attacker/stacked.py): one forward and double backward per
        local step for every candidate; the per-candidate loss is vmapped over them (cheap, elementwise)."""
        assemble, capture = self._assemble(problem, space)
        batched = vmap(assemble)

        def evaluate(variables, labels, targets, aux, anchors, with_grad: bool):
            first = next(iter(variables.values()))
            P, R = first.shape[:2]
            flat = {k: v.reshape(P * R, *v.shape[2:]).detach().requires_grad_(with_grad) for k, v in variables.items()}

            def spread(t):  # per problem [P, ...] -> per candidate [P * R, ...]
                return t[:, None].expand(P, R, *t.shape[1:]).reshape(P * R, *t.shape[1:])

            with torch.enable_grad():
                x, y = space.decode_many(flat, spread(labels))
                update, captured = problem.simulator.stacked_update(x, y, capture)
                total, matching = batched(x, update, captured, {k: spread(v) for k, v in targets.items()},
                                          {k: spread(v) for k, v in aux.items()},
                                          anchors.reshape(P * R, *anchors.shape[2:]), flat)
                grads = None
                if with_grad:
                    values = torch.autograd.grad(total.sum(), list(flat.values()))
                    grads = {k: g.view(P, R, *g.shape[1:]) for k, g in zip(flat, values)}
            return total.detach().view(P, R), matching.detach().view(P, R), grads

        return (lambda *a: evaluate(*a, with_grad=True), lambda *a: evaluate(*a, with_grad=False)[1])

    def run(self, problem: InversionProblem | JointProblem, space: SearchSpace | None = None,
            start: Tensors | None = None) -> EngineResult:
        """Search ``space`` (default: the one ``spec.search_space`` names) for inputs whose simulated update matches
        ``problem``'s targets. ``start``: initial variables (each [P, R, ...]) instead of the space's init, so a
        multi-stage attack continues from an earlier run's result."""
        spec, dev = self.spec, self.device
        joint = problem if isinstance(problem, JointProblem) else JointProblem([problem], [{}])
        lead = joint.parts[0]
        P, R = lead.num_problems, spec.restarts
        space = (space or self.default_space(lead)).to(dev)
        seeds = lead.seeds if lead.seeds is not None else [
            int(np.random.SeedSequence([self.seed, p]).generate_state(1)[0]) for p in range(P)]
        if len(seeds) != P:
            raise ValueError(f"{len(seeds)} seeds for {P} problems")
        initial = start if start is not None else space.init_each(seeds, R)
        variables = {k: v.detach().clone().to(dev).requires_grad_(True) for k, v in initial.items()}

        parts = []
        for part, view in zip(joint.parts, joint.views):
            step_fn, score_fn = self._executors(part, P * R, space)
            parts.append(_Part(view, step_fn, score_fn, part.labels.to(dev),
                               {k: v.to(dev) / spec.update_scale for k, v in part.targets.items()},
                               {k: v.to(dev) for k, v in part.aux.items()} or {"_": torch.zeros(P, device=dev)},
                               torch.zeros(P, R, part.batch_size, *part.image_shape, device=dev)))
        fixed = {view.get(k, k) for view in joint.views for k in space.fixed}
        searched = {k: v for k, v in variables.items() if k not in fixed}
        optimizer = OPTIMIZERS[spec.optimizer.name](searched, spec.optimizer, spec.iterations)

        def closure():
            detached = {k: v.detach() for k, v in variables.items()}
            totals = matching = 0.0
            grads: Tensors = {}
            for part in parts:
                total, match, local_grads = part.step(part.local(detached), part.labels, part.targets, part.aux,
                                                      part.anchors)
                totals, matching = totals + total, matching + match
                for k, g in local_grads.items():
                    key = part.view.get(k, k)
                    grads[key] = grads[key] + g if key in grads else g
            return totals, matching, grads

        trace: list[tuple[int, torch.Tensor]] = []
        t0 = time.perf_counter()
        for it in range(spec.iterations):
            if spec.group is not None and it >= spec.group.start and (it - spec.group.start) % spec.group.every == 0:
                with torch.no_grad():
                    for part in parts:
                        part.anchors = CONSENSUS[spec.group.mode](space.inputs(part.local(variables), part.labels))
            matching = optimizer.step(closure)
            with torch.no_grad():
                space.project_(variables)
            if spec.trace_every and (it + 1) % spec.trace_every == 0:
                trace.append((it + 1, matching.detach().clone()))

        # Score the final candidates (the loop's losses lag one step behind the last update).
        final = {k: v.detach() for k, v in variables.items()}
        matching = sum(part.score(part.local(final), part.labels, part.targets, part.aux, part.anchors)
                       for part in parts)
        seconds = time.perf_counter() - t0
        scores = torch.where(torch.isfinite(matching), matching, torch.full_like(matching, math.inf))
        chosen = scores.argmin(dim=1)
        rows = torch.arange(P, device=dev)
        first, labels, targets = parts[0].local(final), parts[0].labels, parts[0].targets
        with torch.no_grad():
            all_images = space.unit_images(first, labels)
        out_labels = space.labels_out(first, labels)[rows, chosen]
        trace_rows = [(it, torch.nan_to_num(m, nan=math.inf).min(dim=1).values.cpu().tolist()) for it, m in trace]
        fits: dict[str, list[float]] = {}
        for p in range(P):
            chosen_vars = {k: v[p, chosen[p]] for k, v in first.items()}
            with torch.enable_grad():
                x, y = space.decode(chosen_vars, labels[p])
                sim_update = {k: v.detach() / spec.update_scale
                              for k, v in lead.simulator.update(x, y, functional=False).items()}
            for key, value in update_fit(sim_update, {k: v[p] for k, v in targets.items()}).items():
                fits.setdefault(key, []).append(value)
        return EngineResult(images=all_images[rows, chosen].cpu(), labels=out_labels.cpu(),
                            losses=scores[rows, chosen].cpu(), chosen_restart=chosen.cpu(), trace=trace_rows,
                            seconds=seconds, iterations=spec.iterations, evaluations=optimizer.evaluations,
                            all_images=all_images.cpu(), update_fit={k: torch.tensor(v) for k, v in fits.items()},
                            variables=final)
