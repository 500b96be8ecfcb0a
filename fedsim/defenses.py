"""Client-side defenses over the outgoing update, registered by name.

A defense is a small pydantic model (its fields are its parameters, so a config validates by constructing it) with
one method, :meth:`Defense.apply`, over the parameter update (new minus old weights) and the extras the client
shares. Defenses see only trainable parameters: BatchNorm running statistics travel as computed (as in plain FedAvg).
Randomness comes from a generator seeded per (run seed, round, client), never from global state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
import torch
from pydantic import Field, model_validator

from .params import Registered
from .privacy import Mechanism
from .training import TrainConfig, step_schedule
from .registry import PluginRegistry, build_from_spec

DEFENSES = PluginRegistry("fedsim.defenses", "defense")


@dataclass
class DefenseContext:
    """What a defense may use besides the update: a seeded generator and the client's side information."""

    generator: torch.Generator
    bn_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    shared: dict[str, object] = field(default_factory=dict)  # extras the client will send, filled by defenses
    server_round: int = 0  # what the client itself knows of where it is
    client_id: int = -1


class Defense(Registered):
    registry: ClassVar[dict[str, type]] = DEFENSES
    # Extras this defense makes the client send (keys of DefenseContext.shared), e.g. ("bn_stats",): the threat
    # model derives what clients share from the pipeline (shared_by), never from a separate switch.
    shares: ClassVar[tuple[str, ...]] = ()

    def apply(self, update: dict[str, torch.Tensor], ctx: DefenseContext) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def check(self, model: torch.nn.Module) -> None:
        """Refuse (ValueError) a victim this defense cannot protect, before the run starts."""

    def local_keys(self, model: torch.nn.Module) -> set[str]:
        """State-dict keys that never leave the client: it trains them, keeps its own values between rounds and
        sends the global values back unchanged (FedBN)."""
        return set()

    # Training-time hooks (pass-through here): a defense that changes what is trained rather than what is sent.
    def wrap_training(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train: TrainConfig,
                      generator: torch.Generator) -> tuple[torch.nn.Module, torch.optim.Optimizer, Callable | None]:
        """The module the client calls and the optimiser it steps during local training (DP-SGD wraps both), and a
        cleanup to run after it (or None)."""
        return model, optimizer, None

    def mix_batch(self, inputs: torch.Tensor, labels: torch.Tensor, num_classes: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch one local step trains on (targets may become class probabilities [B, C])."""
        return inputs, labels

    def mechanism(self, sample_rate: float, train: TrainConfig) -> Mechanism | None:
        """The DP mechanism this defense implements, for the server's accountant (None: no DP guarantee).
        ``sample_rate``: the chance a client is sampled in a round; ``train``: the configuration clients train with."""
        return None

    def tag(self) -> str:
        params = ",".join(f"{k}={v}" for k, v in self.model_dump().items() if v is not None)
        return f"{self.name}({params})" if params else self.name


def global_norm(update: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum(v.double().pow(2).sum() for v in update.values()))


def clip_update(update: dict[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """Scale the whole update down to L2 norm ``clip`` (never up)."""
    scale = min(1.0, clip / max(global_norm(update).item(), 1e-12))
    return {k: v * scale for k, v in update.items()}


class GaussianNoise(Defense):
    """Clip the whole update to L2 norm ``clip`` (if set), then add N(0, std^2) to every coordinate.

    An absolute noise level, for reproducing the papers' settings: **not a DP guarantee** (no accounting; use
    ``client_dp`` for one)."""

    name: ClassVar[str] = "gaussian_noise"
    std: float = Field(ge=0.0)
    clip: float | None = Field(default=None, gt=0.0)

    def apply(self, update, ctx):
        if self.clip is not None:
            update = clip_update(update, self.clip)
        return {k: v + self.std * torch.randn(v.shape, generator=ctx.generator, dtype=v.dtype) for k, v in update.items()}


class _NoiseOrTarget(Defense):
    """A DP defense's noise: ``noise_multiplier``, or a target ``epsilon`` the config resolves into one."""

    clip: float = Field(gt=0.0)
    noise_multiplier: float | None = Field(default=None, ge=0.0)
    epsilon: float | None = Field(default=None, gt=0.0)

    @model_validator(mode="after")
    def _one_of(self):
        if self.noise_multiplier is None and self.epsilon is None:
            raise ValueError(f"{self.name} needs noise_multiplier or epsilon")
        return self


class ClientDP(_NoiseOrTarget):
    """Client-level DP-FedAvg: clip the whole update to L2 norm ``clip``, add N(0, (noise_multiplier * clip)^2) to
    every coordinate. Give ``noise_multiplier``, or ``epsilon`` and the config resolves the multiplier that reaches it
    after ``federation.rounds`` rounds (at ``privacy.delta``, with the federation's client sampling rate).

    Adding or removing one client changes the round's sum by at most ``clip``; each client's own noise has std
    ``noise_multiplier * clip``, so accounting one Gaussian mechanism per round at ``noise_multiplier`` with sampling
    rate clients_per_round / num_clients is an upper bound on the leak of the sum (the sum carries more noise)."""

    name: ClassVar[str] = "client_dp"


    def check(self, model):
        buffers = [k for k, _ in model.named_buffers() if k.endswith("running_mean")]
        if buffers:
            raise ValueError(f"client_dp on a victim with BatchNorm: its running statistics ({buffers[0]}, ...) would "
                             "leave the client un-noised, outside the guarantee; use a victim without BatchNorm")

    def apply(self, update, ctx):
        if self.noise_multiplier is None:
            raise ValueError("client_dp: epsilon was not resolved into a noise_multiplier (resolve_privacy)")
        clipped = clip_update(update, self.clip)
        std = self.noise_multiplier * self.clip
        return {k: v + std * torch.randn(v.shape, generator=ctx.generator, dtype=v.dtype) for k, v in clipped.items()}

    def mechanism(self, sample_rate, train):
        return Mechanism(self.tag(), float(self.noise_multiplier or 0.0), sample_rate, 1)


class DPSGD(_NoiseOrTarget):
    """Sample-level DP inside the client's local training (Opacus): each example's gradient is clipped to L2 norm
    ``clip`` (functorch per-sample gradients), the batch sum gets N(0, (noise_multiplier * clip)^2) noise, then the
    SGD step. The update sent is what that training produced; nothing is added on the way out. ``epsilon`` as a
    target resolves the multiplier as for ``client_dp``.

    Accounting (per client, for its local samples): one Gaussian mechanism per local step at sampling rate
    batch_size / num_samples, every step of every round, as if the client took part in every round (client
    sampling would only lower it). Batches are taken in order, not Poisson-sampled: the usual approximation."""

    name: ClassVar[str] = "dp_sgd"


    def check(self, model):
        from opacus.validators import ModuleValidator

        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ValueError(f"dp_sgd: Opacus cannot compute per-sample gradients of this victim: {errors[0]}")

    def wrap_training(self, model, optimizer, train, generator):
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        if self.noise_multiplier is None:
            raise ValueError("dp_sgd: epsilon was not resolved into a noise_multiplier")
        per_sample = GradSampleModule(model, force_functorch=True)
        private = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier, max_grad_norm=self.clip,
                              expected_batch_size=train.batch_size, generator=generator)
        return per_sample, private, per_sample._close  # the cached model object loses the hooks again

    def apply(self, update, ctx):
        return update

    def mechanism(self, sample_rate, train):
        steps = len(step_schedule(train))
        rate = min(1.0, (train.num_samples if train.mode == "fedsgd" else train.batch_size) / train.num_samples)
        return Mechanism(self.tag(), float(self.noise_multiplier or 0.0), rate, steps)


class TopK(Defense):
    """Keep the ``fraction`` largest-magnitude entries of each layer (at least one), zero the rest."""

    name: ClassVar[str] = "topk"
    fraction: float = Field(gt=0.0, le=1.0)

    def apply(self, update, ctx):
        out = {}
        for key, value in update.items():
            flat = value.flatten()
            k = max(1, int(math.floor(self.fraction * flat.numel() + 0.5)))
            keep = torch.zeros_like(flat)
            idx = flat.abs().topk(k).indices
            keep[idx] = flat[idx]
            out[key] = keep.view_as(value)
        return out


class RandomK(Defense):
    """Keep a random ``fraction`` of each layer's entries (at least one; a seeded draw per client and round), zero
    the rest; ``rescale`` multiplies the kept entries by 1/fraction (an unbiased estimate of the update)."""

    name: ClassVar[str] = "randomk"
    fraction: float = Field(gt=0.0, le=1.0)
    rescale: bool = False

    def apply(self, update, ctx):
        out = {}
        for key, value in update.items():
            flat = value.flatten()
            k = max(1, int(math.floor(self.fraction * flat.numel() + 0.5)))
            idx = torch.randperm(flat.numel(), generator=ctx.generator)[:k]
            keep = torch.zeros_like(flat)
            keep[idx] = flat[idx] / (self.fraction if self.rescale else 1.0)
            out[key] = keep.view_as(value)
        return out


class Quantize(Defense):
    """Uniform symmetric quantisation of each layer to ``bits`` bits: the client sends integers in
    [-(2^(bits-1) - 1), 2^(bits-1) - 1] and one scale per layer (max |entry| / that bound); the server sees their
    product. ``stochastic`` rounding (seeded) instead of round-to-nearest makes it unbiased."""

    name: ClassVar[str] = "quantize"
    bits: int = Field(default=8, ge=2, le=16)
    stochastic: bool = False

    def apply(self, update, ctx):
        levels = 2 ** (self.bits - 1) - 1
        out = {}
        for key, value in update.items():
            scale = value.abs().max() / levels
            if scale == 0:
                out[key] = value.clone()
                continue
            q = value / scale
            if self.stochastic:
                q = torch.floor(q + torch.rand(q.shape, generator=ctx.generator, dtype=q.dtype))
            else:
                q = torch.round(q)
            out[key] = q.clamp(-levels, levels) * scale
        return out


class Sign(Defense):
    """signSGD-style 1-bit compression: each entry becomes its sign times the layer's mean absolute value (so the
    update keeps its per-layer scale)."""

    name: ClassVar[str] = "sign"

    def apply(self, update, ctx):
        return {k: torch.sign(v) * v.abs().mean() for k, v in update.items()}


class FedBN(Defense):
    """FedBN (Li et al. 2021): BatchNorm layers stay local. Their weights, biases and running statistics are trained
    by the client, kept for its next round and never sent (the reply carries the global values unchanged), so
    FedAvg averages only the other layers and the server never sees a client's BatchNorm state."""

    name: ClassVar[str] = "fedbn"

    def check(self, model):
        if not self.local_keys(model):
            raise ValueError("fedbn on a victim without BatchNorm layers keeps nothing local")

    def local_keys(self, model):
        keys = set()
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                keys |= {f"{name}.{k}" for k, v in module.state_dict().items() if v.is_floating_point()}
        return keys

    def apply(self, update, ctx):
        return update


class MixUp(Defense):
    """MixUp inside the client's batches (Zhang et al. 2018; GradAttack's data-level defense): every local step
    trains on lam * x + (1 - lam) * x[perm] with targets lam * y + (1 - lam) * y[perm] (class probabilities),
    lam ~ Beta(alpha, alpha) and perm a random permutation of the batch, both seeded per client and round. It changes
    what is trained, not what is sent; a batch of one mixes with itself (no effect)."""

    name: ClassVar[str] = "mixup"
    alpha: float = Field(default=1.0, gt=0.0)

    def mix_batch(self, inputs, labels, num_classes, generator):
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        lam = float(np.random.default_rng(seed).beta(self.alpha, self.alpha))
        perm = torch.randperm(len(inputs), generator=generator)
        soft = labels if labels.is_floating_point() else torch.nn.functional.one_hot(labels, num_classes).to(inputs.dtype)
        return lam * inputs + (1 - lam) * inputs[perm], lam * soft + (1 - lam) * soft[perm]

    def apply(self, update, ctx):
        return update


class ShareBNStats(Defense):
    """Not a protection but a sharing setting: the client also sends each BatchNorm layer's batch mean/variance
    from its first local step (the side information GradInversion's fidelity term uses)."""

    name: ClassVar[str] = "share_bn_stats"
    shares: ClassVar[tuple[str, ...]] = ("bn_stats",)

    def apply(self, update, ctx):
        ctx.shared["bn_stats"] = {k: (m.clone(), v.clone()) for k, (m, v) in ctx.bn_stats.items()}
        return update


def build_defense(spec: dict) -> Defense:
    """Construct a defense from ``{"name": ..., **params}``; raises ValueError naming the bad key."""
    return build_from_spec(DEFENSES, spec, "defense")


def shared_by(defenses: list[Defense]) -> set[str]:
    """The extras a client running this pipeline sends besides its update."""
    return {key for d in defenses for key in d.shares}


def apply_pipeline(defenses: list[Defense], update: dict[str, torch.Tensor], ctx: DefenseContext) -> dict[str, torch.Tensor]:
    for defense in defenses:
        update = defense.apply(update, ctx)
    return update
