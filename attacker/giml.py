"""GIML (Jeon et al. 2021, Algorithm 2) live in the federation: a generator prior meta-learned from the teed updates.

Every attacked update is first inverted with the current prior (GI-z/w, GI-w or GI-z from it) and then kept as an
inversion task (a bounded buffer, with the public model it was computed under). After each round the prior takes
meta-steps: sample N tasks; a regularised latent search per task (the prior fixed; latent norm weight lambda);
tau steps of weight search on the sum of the tasks' matching costs (one engine run of a joint problem, the latents
fixed); then ``w <- (1 - beta) w + beta w'`` (first-order, as Reptile). Later rounds attack with the moved prior,
and rows carry its round and meta-step count. One worker owns the prior (``state_scope = "global"``); its state
(prior weights, task buffer, counters) is saved after every round and restored on resume.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, PrivateAttr
from torch import nn

from fedsim.contract import ATTACKS

from .attacks import attacker_labels, attacker_train_config, inversion_problem, public_model, update_scale
from .engine import AttackEngine, EngineSpec, JointProblem, OptimizerSpec
from .generators import build_generator, load_prior, save_prior
from .history import Kept, pack, unpack
from .gias import WEIGHT, GenerativeAttack, LatentSpace, WeightSpace

log = logging.getLogger(__name__)
SAMPLE_SEED = 1234  # the fixed latents of the per-round sample grids


class GIML(GenerativeAttack):
    """Attack with a generator prior that is meta-learned across rounds from the observed updates themselves."""

    name: ClassVar[str] = "giml"
    state_scope: ClassVar[str] = "global"

    attack: Literal["gi_zw", "gi_w", "gi_z"] = "gi_zw"  # how each update is inverted with the current prior
    iterations: int = Field(default=500, ge=1)  # the attack's (first) stage
    weight_iterations: int = Field(default=500, ge=1)  # gi_zw's weight stage
    restarts: int = Field(default=2, ge=1)
    weight_lr: float = Field(default=1e-3, gt=0)
    prior_distance: float = Field(default=0.0, ge=0)
    latent_norm: float = Field(default=1e-3, ge=0)  # lambda: the task latent search's regulariser
    # Meta-learning (per round, in the attacker worker, off the FL loop)
    buffer_size: int = Field(default=64, ge=1)
    meta_steps: int = Field(default=10, ge=0)
    tasks_per_step: int = Field(default=4, ge=1)
    task_latent_iterations: int = Field(default=100, ge=1)
    task_weight_steps: int = Field(default=10, ge=1)  # tau
    task_weight_lr: float = Field(default=1e-3, gt=0)
    meta_lr: float = Field(default=0.5, gt=0, le=1)  # beta
    samples: int = Field(default=16, ge=0)  # images in each round's sample grid

    _prior: nn.Module | None = PrivateAttr(default=None)
    _meta: dict = PrivateAttr(default_factory=dict)  # how to rebuild the prior: generator, params, size, channels
    _tasks: list = PrivateAttr(default_factory=list)  # Kept: observed update, labels, client config
    _counts: dict = PrivateAttr(default_factory=lambda: {"meta_steps": 0, "prior_round": 0})

    # -- the prior -------------------------------------------------------------------------------------------
    def prior_generator(self, image_shape):
        if self._prior is None:
            channels, size = image_shape[0], image_shape[1]
            if self.prior:
                self._prior, info = load_prior(self.prior, size, channels)
                self._meta = {"generator": info["generator"], "params": dict(info.get("params", {})),
                              "image_size": size, "channels": channels}
            else:
                self._prior = build_generator(self.generator, size, channels, seed=self.generator_seed,
                                              **self.generator_params)
                self._meta = {"generator": self.generator, "params": dict(self.generator_params),
                              "image_size": size, "channels": channels}
        return self._prior

    def inner_attack(self) -> GenerativeAttack:
        """The GIAS attack that inverts one round's updates, with the current prior."""
        shared = self.model_dump(include={"iterations", "restarts", "lr", "max_parallel", "trace_every", "batching",
                                          "generator", "generator_params", "generator_seed", "generator_bn", "copies",
                                          "objective", "tv", "bn", "bn_source", "signed"})
        if self.attack == "gi_zw":
            shared |= {"weight_iterations": self.weight_iterations, "weight_lr": self.weight_lr,
                       "prior_distance": self.prior_distance, "latent_norm": self.latent_norm}
        elif self.attack == "gi_w":
            shared |= {"lr": self.weight_lr, "prior_distance": self.prior_distance}
        else:
            shared |= {"latent_norm": self.latent_norm}
        inner = ATTACKS[self.attack](**shared)
        inner._cache = _SharedPrior(self)
        return inner

    # -- attack, then keep as tasks ------------------------------------------------------------------------
    def reconstruct_many(self, observed, threat, *, device="cpu", seed=0):
        self.prior_generator(observed[0].model.image_shape)
        recs = self.inner_attack().reconstruct_many(observed, threat, device=device, seed=seed)
        for obs, rec in zip(observed, recs):
            rec.attack = self.name
            rec.columns.update(prior_round=self._counts["prior_round"], prior_meta_steps=self._counts["meta_steps"])
            cfg = attacker_train_config(obs, threat)
            labels, _ = attacker_labels(obs, threat, cfg, public_model(obs))
            self._tasks.append(Kept(obs, np.asarray(labels), cfg))
        self._tasks = self._tasks[-self.buffer_size:]
        return recs

    # -- meta-learning ---------------------------------------------------------------------------------------
    def end_round(self, server_round, *, device="cpu", seed=0, folder=None):
        if self._prior is None or not self._tasks:
            return
        rng = np.random.default_rng(seed)
        for step in range(self.meta_steps):
            picks = rng.choice(len(self._tasks), size=min(self.tasks_per_step, len(self._tasks)), replace=False)
            self.meta_step([self._tasks[i] for i in sorted(picks)], device, seed + step)
            self._counts["meta_steps"] += 1
        self._counts["prior_round"] = server_round
        if folder is not None:
            self.save_artefacts(Path(folder), server_round)

    def meta_step(self, tasks: list[Kept], device: str, seed: int) -> None:
        """One step of Algorithm 2 on ``tasks``."""
        self.meta_update(self.adapt(tasks, device, seed))

    def meta_update(self, adapted: dict[str, torch.Tensor]) -> None:
        """w <- (1 - beta) w + beta w' for every prior weight (``adapted``: name -> w')."""
        with torch.no_grad():
            for name, param in self._prior.named_parameters():
                param.mul_(1 - self.meta_lr).add_(adapted[name].to(param), alpha=self.meta_lr)

    def adapt(self, tasks: list[Kept], device: str, seed: int) -> dict[str, torch.Tensor]:
        """The prior's weights adapted to ``tasks``: latent search per task, then tau weight-search steps on the
        sum of their matching costs. Returns name -> adapted weight."""
        prior = self._prior
        scale = update_scale(tasks[0].config)
        # 1. regularised latent search per task, the prior fixed; tasks of one round share a public model: batched
        latents: dict[int, torch.Tensor] = {}
        problems: dict[int, object] = {}
        by_round: dict[tuple, list[int]] = {}
        for j, task in enumerate(tasks):
            by_round.setdefault((task.observed.round, task.observed.num_examples, task.config), []).append(j)
        latent_spec = EngineSpec(objective=self.objective, regularizers=(("tv", self.tv), ("latent_norm", self.latent_norm)),
                                 optimizer=OptimizerSpec(name="adam", lr=self.lr), iterations=self.task_latent_iterations,
                                 restarts=1, boxed=False, trace_every=0, update_scale=scale, batching=self.batching)
        for (_, _, task_cfg), members in by_round.items():
            observed = [tasks[j].observed for j in members]
            problem = inversion_problem(observed, task_cfg, [tasks[j].labels for j in members], device, seed=seed)
            result = AttackEngine(latent_spec, device=device, seed=seed).run(problem, LatentSpace(problem, prior, self.generator_bn))
            for i, j in enumerate(members):
                latents[j] = result.variables["z"][i, 0]
                problems[j] = inversion_problem([tasks[j].observed], task_cfg, [tasks[j].labels], device)
        # 2. tau steps of weight search on the sum of the tasks' matching costs (one generator, latents fixed)
        order = sorted(problems)
        weights = {WEIGHT + k: v.detach() for k, v in prior.named_parameters()}
        joint = JointProblem([problems[j] for j in order],
                             [{"z": f"z.{j}", **{k: k for k in weights}} for j in order])
        start = {**{k: v[None, None] for k, v in weights.items()}, **{f"z.{j}": latents[j][None, None] for j in order}}
        weight_spec = replace(latent_spec, regularizers=(("tv", self.tv),), iterations=self.task_weight_steps,
                              optimizer=OptimizerSpec(name="adam", lr=self.task_weight_lr, decay_milestones=()))
        space = WeightSpace(problems[order[0]], prior, self.generator_bn, per_image=False)
        adapted = AttackEngine(weight_spec, device=device, seed=seed).run(joint, space, start=start).variables
        return {k[len(WEIGHT):]: v[0, 0] for k, v in adapted.items() if k.startswith(WEIGHT)}

    def save_artefacts(self, folder: Path, server_round: int) -> None:
        """The prior as a loadable checkpoint and a grid of samples from fixed latents."""
        from fedsim.results import save_grid

        folder.mkdir(parents=True, exist_ok=True)
        m = self._meta
        save_prior(folder / f"prior_round_{server_round:03d}.pt", m["generator"], m["params"], m["image_size"],
                   m["channels"], self._prior, meta_steps=self._counts["meta_steps"], round=server_round)
        if self.samples:
            z = torch.randn(self.samples, *self._prior.latent_shape, generator=torch.Generator().manual_seed(SAMPLE_SEED))
            with torch.no_grad():
                images = (self._prior.eval()(z) + 1) / 2
            save_grid(folder / f"samples_round_{server_round:03d}.png", None,
                      [images[i:i + 8] for i in range(0, len(images), 8)])

    # -- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self._prior is None:
            return {}
        return {"prior": {k: v.detach().cpu() for k, v in self._prior.state_dict().items()}, "meta": dict(self._meta),
                "counts": dict(self._counts), "tasks": [pack(t) for t in self._tasks]}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        m = state["meta"]
        self._meta = dict(m)
        self._prior = build_generator(m["generator"], m["image_size"], m["channels"], **m["params"])
        self._prior.load_state_dict(state["prior"])
        self._prior.eval()
        self._counts = {k: int(v) for k, v in state["counts"].items()}
        self._tasks = [unpack(t) for t in state["tasks"]]


class _SharedPrior(dict):
    """The inner attack's generator cache, answering every image shape with GIML's current prior."""

    def __init__(self, owner: GIML) -> None:
        super().__init__()
        self.owner = owner

    def __contains__(self, key) -> bool:
        return True

    def __getitem__(self, key):
        return self.owner.prior_generator(key)


__all__ = ["GIML"]
