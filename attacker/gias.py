"""Gradient inversion in a generator's spaces (GIAS, Jeon et al. 2021): latents (GI-z), weights (GI-w), and latents
then per-image weights (GI-z/w). All three are engine search spaces; GI-z/w composes two engine runs.

Generators map latents to images in [-1, 1]; a space decodes them into the victim's normalised input. Generator
BatchNorm runs on its running statistics (``eval``, the reference code's choice: each image then depends on its
own latent only) or on batch statistics (``train``).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import ClassVar, Literal

import torch
from pydantic import Field, PrivateAttr, field_validator
from torch import nn
from torch.func import functional_call, replace_all_batch_norm_modules_, vmap

from fedsim.registry import register

from .attacks import OptimizationAttack, bn_targets, check_bn_source
from .engine import (REGULARIZERS, AttackEngine, CandidateContext, EngineResult, EngineSpec, InversionProblem,
                     OptimizerSpec, SearchSpace, Tensors)
from .generators import build_generator, cinet_width, load_prior
from .stacked import per_candidate, stack_model, stackable

WEIGHT = "w:"  # prefix of generator-weight variables


def generator_copy(generator: nn.Module, bn: str) -> nn.Module:
    """A private copy in the requested BatchNorm mode (train mode drops running statistics so vmap can batch it)."""
    g = copy.deepcopy(generator)
    if bn == "train":
        replace_all_batch_norm_modules_(g)
        g.train()
    else:
        g.eval()
    return g.requires_grad_(False)


class GeneratorSpace(SearchSpace):
    """Shared parts: the generator's output in [-1, 1] becomes the victim's normalised input."""

    def __init__(self, problem: InversionProblem, generator: nn.Module, bn: str = "eval") -> None:
        super().__init__(problem)
        self.generator = generator_copy(generator, bn)
        self.latent_shape = tuple(generator.latent_shape)
        self.weights = {k: v.detach() for k, v in self.generator.named_parameters()}
        self.buffers = {k: v.detach() for k, v in self.generator.named_buffers()}

    def to(self, device):
        super().to(device)
        self.generator.to(device)
        self.weights = {k: v.to(device) for k, v in self.weights.items()}
        self.buffers = {k: v.to(device) for k, v in self.buffers.items()}
        return self

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        return ((images + 1) / 2 - self.mean) / self.std

    def random_latents(self, P: int, R: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(P, R, self.problem.batch_size, *self.latent_shape, generator=generator)

    def latent_norm(self, variables: Tensors) -> torch.Tensor:
        return variables["z"].norm()

    def prior_distance(self, variables: Tensors) -> torch.Tensor:
        return variables["z"].new_zeros(())


class LatentSpace(GeneratorSpace):
    """GI-z: the latent of every image, the generator fixed. ``clamp`` bounds each latent coordinate."""

    def __init__(self, problem, generator, bn: str = "eval", clamp: float | None = None) -> None:
        super().__init__(problem, generator, bn)
        self.clamp = clamp

    def init(self, P, R, generator):
        return {"z": self.random_latents(P, R, generator)}

    def decode(self, variables, labels):
        images = functional_call(self.generator, (self.weights, self.buffers), (variables["z"],))
        return self.to_input(images), labels

    def decode_many(self, variables, labels):
        z = variables["z"]
        if self.generator.training:  # batch statistics: each candidate on its own
            return super().decode_many(variables, labels)
        images = functional_call(self.generator, (self.weights, self.buffers), (z.reshape(-1, *z.shape[2:]),))
        return self.to_input(images).reshape(*z.shape[:2], *images.shape[1:]), labels

    def project_(self, variables):
        if self.clamp is not None:
            variables["z"].data.clamp_(-self.clamp, self.clamp)


COPIES = ("auto", "loop", "stacked", "vmap")


class WeightSpace(GeneratorSpace):
    """GI-w and the second stage of GI-z/w: the generator's weights, from fixed latents ``z`` (an input of each
    candidate, not searched). ``per_image``: one copy of the weights per image (GIAS); without it one generator per
    candidate makes all of its images.

    ``copies``: how the per-image copies of all candidates are computed. ``stacked``: side by side in the channel
    dimension, transposed convolutions as one batched product and col2im per layer (attacker/stacked.py; DCGAN is
    stackable); ``vmap``: torch.func over the copies; ``loop``: one functional call per copy. On CPU the copies are
    bound by the traffic of their weights, gradients and Adam state (B x 1.07M parameters for DCGAN-32) and the loop
    measured fastest (8 copies, forward and backward: 38 ms loop, 56 ms stacked, 62 ms vmap), so ``auto`` loops on
    CPU and stacks on other devices."""

    fixed = ("z",)

    def __init__(self, problem, generator, bn: str = "eval", per_image: bool = True,
                 latents: torch.Tensor | None = None, copies: str = "auto") -> None:
        super().__init__(problem, generator, bn)
        if copies not in COPIES:
            raise ValueError(f"unknown copies {copies!r}; use one of {COPIES}")
        self.per_image = per_image
        self.latents = latents  # [P, R, B, *latent] or None (random)
        self.copies = copies
        self.stacked = None
        self._choose(torch.device("cpu"))

    def _choose(self, device: torch.device) -> None:
        mode = self.copies if self.copies != "auto" else ("loop" if device.type == "cpu" else "stacked")
        if mode == "stacked" and not stackable(self.generator):
            mode = "vmap"
        self.mode = mode
        # built after every move: the stacked copy keeps the BN running statistics as plain tensors
        self.stacked = stack_model(self.generator) if mode == "stacked" else None

    def to(self, device):
        super().to(device)
        self._choose(torch.device(device))
        return self

    def init_each(self, seeds, R):
        if self.latents is not None:  # fixed latents of every problem (GI-z/w's second stage): nothing to draw
            return self.init(len(seeds), R, None)
        return super().init_each(seeds, R)

    def init(self, P, R, generator):
        z = self.latents if self.latents is not None else self.random_latents(P, R, generator)
        lead = (P, R, self.problem.batch_size) if self.per_image else (P, R)
        weights = {WEIGHT + k: v[(None,) * len(lead)].expand(*lead, *v.shape).clone() for k, v in self.weights.items()}
        return {"z": z.clone(), **weights}

    def _params(self, variables: Tensors) -> Tensors:
        return {k[len(WEIGHT):]: v for k, v in variables.items() if k.startswith(WEIGHT)}

    def decode(self, variables, labels):
        if self.per_image:
            x, _ = self.decode_many({k: v[None] for k, v in variables.items()}, labels[None])
            return x[0], labels
        images = functional_call(self.generator, (self._params(variables), self.buffers), (variables["z"],))
        return self.to_input(images), labels

    def decode_many(self, variables, labels):
        if not self.per_image:
            return super().decode_many(variables, labels)
        z = variables["z"]  # [N, B, *latent]: one copy of the weights per image of every candidate
        copies = z.shape[0] * z.shape[1]
        params = {k: v.reshape(copies, *v.shape[2:]) for k, v in self._params(variables).items()}
        flat_z = z.reshape(copies, *z.shape[2:])
        if self.mode == "stacked":
            out = functional_call(self.stacked, params, (flat_z.reshape(1, -1),))  # [1, copies * C, H, W]
            images = per_candidate(out, copies)[:, 0]
        elif self.mode == "vmap":
            images = vmap(lambda p, zi: functional_call(self.generator, (p, self.buffers), (zi[None],))[0])(
                params, flat_z)
        else:
            per_copy = {k: v.unbind(0) for k, v in params.items()}  # unbind: one stacked gradient, not one per copy
            images = torch.cat([functional_call(self.generator, ({k: v[j] for k, v in per_copy.items()}, self.buffers),
                                                (flat_z[j:j + 1],)) for j in range(copies)])
        return self.to_input(images).reshape(*z.shape[:2], *images.shape[1:]), labels

    def prior_distance(self, variables):
        """Mean squared distance of the searched weights to the generator's (the prior's) own, over all weights."""
        params = self._params(variables)
        total = sum((v - self.weights[k]).pow(2).sum() for k, v in params.items())
        return total / sum(v.numel() for v in params.values())


@register(REGULARIZERS, "latent_norm")
def latent_norm(x: torch.Tensor, ctx: CandidateContext) -> torch.Tensor:
    """GIAS's z-norm term: the L2 norm of the candidate's latents (keeps them where the generator was trained)."""
    return ctx.space.latent_norm(ctx.variables)


@register(REGULARIZERS, "prior_distance")
def prior_distance(x: torch.Tensor, ctx: CandidateContext) -> torch.Tensor:
    """Mean squared distance of searched generator weights to the prior's: keeps GI-z/w's per-image copies near
    the prior (without it, copies drift to saturated white or black regions)."""
    return ctx.space.prior_distance(ctx.variables)


# ------------------------------------------------------------------------------------------------------------
# Attacks

class GenerativeAttack(OptimizationAttack):
    """Shared parameters of the generator attacks: the generator (registry name or ``module:Factory``), an optional
    prior checkpoint (``fedsim prior train``), the generator's BatchNorm mode, matching and regularisers."""

    generator: str = "dcgan"
    generator_params: dict = Field(default_factory=dict)  # e.g. {ngf = 64, nz = 100}
    prior: str | None = None  # checkpoint; without one the generator is untrained (the architecture is the prior)
    generator_seed: int = 0  # initialisation of an untrained generator
    generator_bn: Literal["eval", "train"] = "eval"
    copies: Literal["auto", "loop", "stacked", "vmap"] = "auto"  # how per-image weight copies run (WeightSpace)
    objective: str = "cosine"  # masked_cosine against top-k updates
    tv: float = Field(default=1e-4, ge=0)
    bn: float = Field(default=0.0, ge=0)  # BN-statistics fidelity (shared statistics, or the public running ones)
    bn_source: Literal["auto", "shared", "running"] = "auto"
    lr: float = Field(default=3e-2, gt=0)
    signed: bool = False
    _cache: dict = PrivateAttr(default_factory=dict)

    @field_validator("prior")
    @classmethod
    def _loadable(cls, prior: str | None) -> str | None:
        if prior is not None:  # checked when the config loads, before any round runs
            try:
                load_prior(prior)
            except FileNotFoundError as err:
                raise ValueError(str(err)) from None
        return prior

    def prior_generator(self, image_shape: tuple[int, int, int]) -> nn.Module:
        """The generator the attack starts from (loaded once per image shape)."""
        key = tuple(image_shape)
        if key not in self._cache:
            channels, size = image_shape[0], image_shape[1]
            if self.prior:
                self._cache[key] = load_prior(self.prior, size, channels)[0]
            else:
                self._cache[key] = build_generator(self.generator, size, channels, seed=self.generator_seed,
                                                   **self.generator_params)
        return self._cache[key]

    def check(self, model) -> None:
        self.prior_generator(model.image_shape)  # the prior must make the victim's images

    def check_threat(self, threat) -> None:
        super().check_threat(threat)
        check_bn_source(self.bn, self.bn_source, threat)

    def regularizers(self) -> tuple[tuple[str, float], ...]:
        return (("tv", self.tv), ("bn", self.bn))

    def engine_spec(self) -> EngineSpec:
        return EngineSpec(objective=self.objective, regularizers=self.regularizers(),
                          optimizer=OptimizerSpec(name="signed_adam" if self.signed else "adam", lr=self.lr),
                          iterations=self.iterations, restarts=self.restarts, boxed=False,
                          trace_every=self.trace_every, batching=self.batching, compile=self.compile)

    def side_information(self, observed, simulator, threat):
        return bn_targets(observed, simulator, threat, self.bn_source) if self.bn else {}

    def space(self, problem: InversionProblem) -> SearchSpace:
        """The generator space a single-stage attack searches."""
        raise NotImplementedError

    def search(self, spec, problem, device, seed):
        return AttackEngine(spec, device=device, seed=seed).run(problem, self.space(problem))


class LatentSearch(GenerativeAttack):
    """GI-z: Adam on every image's latent (step decay at 3/8, 5/8, 7/8), cosine matching, TV, optional latent
    norm; restarts from different latents, the best by final matching loss."""

    name: ClassVar[str] = "gi_z"
    iterations: int = Field(default=1000, ge=1)
    restarts: int = Field(default=4, ge=1)
    latent_norm: float = Field(default=0.0, ge=0)
    latent_clamp: float | None = Field(default=None, gt=0)

    def regularizers(self):
        return super().regularizers() + (("latent_norm", self.latent_norm),)

    def space(self, problem):
        return LatentSpace(problem, self.prior_generator(problem.image_shape), self.generator_bn, self.latent_clamp)


class WeightSearch(GenerativeAttack):
    """GI-w: Adam on the generator's weights from fixed random latents (an untrained generator works: its
    architecture is a prior, the deep-image-prior effect). ``per_image``: one weight copy per image."""

    name: ClassVar[str] = "gi_w"
    iterations: int = Field(default=1000, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    per_image: bool = True
    prior_distance: float = Field(default=0.0, ge=0)

    def regularizers(self):
        return super().regularizers() + (("prior_distance", self.prior_distance),)

    def space(self, problem):
        return WeightSpace(problem, self.prior_generator(problem.image_shape), self.generator_bn, self.per_image,
                           copies=self.copies)


class LatentThenWeightSearch(GenerativeAttack):
    """GI-z/w (GIAS): GI-z with restarts, then the best latents fixed and one copy of the generator weights per
    image searched together (Adam at ``weight_lr``), batched over the copies; ``prior_distance`` keeps the copies
    near the prior."""

    name: ClassVar[str] = "gi_zw"
    iterations: int = Field(default=1000, ge=1)  # latent stage
    weight_iterations: int = Field(default=1000, ge=1)
    restarts: int = Field(default=4, ge=1)
    weight_lr: float = Field(default=1e-3, gt=0)
    latent_norm: float = Field(default=0.0, ge=0)
    prior_distance: float = Field(default=0.0, ge=0)

    def regularizers(self):
        return super().regularizers() + (("latent_norm", self.latent_norm),)

    def search(self, spec, problem, device, seed):
        prior = self.prior_generator(problem.image_shape)
        first = AttackEngine(spec, device=device, seed=seed).run(
            problem, LatentSpace(problem, prior, self.generator_bn))
        rows = torch.arange(problem.num_problems)
        best = first.variables["z"][rows, first.chosen_restart.to(first.variables["z"].device)][:, None]  # [P, 1, B, nz]
        weight_spec = replace(spec, iterations=self.weight_iterations, restarts=1,
                              optimizer=replace(spec.optimizer, lr=self.weight_lr),
                              regularizers=super().regularizers() + (("prior_distance", self.prior_distance),))
        second = AttackEngine(weight_spec, device=device, seed=seed + 1).run(
            problem, WeightSpace(problem, prior, self.generator_bn, per_image=True, latents=best, copies=self.copies))
        return combine(first, second)


class CINet(GenerativeAttack):
    """CI-Net (Zhang et al. 2023): a fresh over-parameterised generator per attacked batch (width by
    :func:`~attacker.generators.cinet_width`), one fixed random code (128) per image, the generator's BatchNorm on
    batch statistics, Adam on sign-only gradients at lr 1e-3 without decay, 1 - cosine over all layers, no TV."""

    name: ClassVar[str] = "ci_net"
    generator: str = "cinet"
    generator_bn: Literal["eval", "train"] = "train"
    iterations: int = Field(default=2000, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    signed: bool = True
    tv: float = Field(default=0.0, ge=0)
    width_factor: float = Field(default=4.0, gt=0)
    start_width: int = Field(default=32, ge=1)

    def check(self, model) -> None:
        if self.prior:
            raise ValueError("ci_net builds its generator per attack; it takes no prior checkpoint")

    def engine_spec(self) -> EngineSpec:
        return replace(super().engine_spec(), optimizer=OptimizerSpec(
            name="signed_adam" if self.signed else "adam", lr=self.lr, decay_milestones=()))

    def search(self, spec, problem, device, seed):
        channels, size = problem.image_shape[0], problem.image_shape[1]
        width = cinet_width(problem.batch_size, size, channels, self.width_factor, self.start_width)
        generator = build_generator(self.generator, size, channels, seed=seed, width=width, **self.generator_params)
        return AttackEngine(spec, device=device, seed=seed).run(problem, WeightSpace(problem, generator,
                                                                                      self.generator_bn, False))


def combine(first: EngineResult, second: EngineResult) -> EngineResult:
    """One result for two engine runs in sequence (the second's reconstruction, both stages' cost and trace)."""
    trace = first.trace + [(first.iterations + it, losses) for it, losses in second.trace]
    return replace(second, trace=trace, seconds=first.seconds + second.seconds,
                   iterations=first.iterations + second.iterations,
                   evaluations=first.evaluations + second.evaluations)


__all__ = ["LatentSpace", "WeightSpace", "LatentSearch", "WeightSearch", "LatentThenWeightSearch", "CINet",
           "combine"]
