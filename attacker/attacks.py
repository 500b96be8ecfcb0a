"""Attacks, registered by name. An attack is a pydantic model of its parameters that composes engine parts.

Every attack takes only :class:`~attacker.records.ObservedUpdate` records and a
:class:`~attacker.records.ThreatModel`; it never sees sample ids or ground truth.
"""

from __future__ import annotations

import time
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from fedsim.models import build_model
from fedsim.registry import Registered, build_from_spec
from fedsim.training import TrainConfig, step_schedule

from .engine import AttackEngine, EngineSpec, InversionProblem, OptimizerSpec, VictimSimulator
from .labels import recover_labels
from .records import ObservedUpdate, Reconstruction, ThreatModel

ATTACKS: dict[str, type["Attack"]] = {}


def attacker_train_config(observed: ObservedUpdate, threat: ThreatModel) -> TrainConfig:
    """The client computation the attacker simulates: the sent config if hyperparameters are known, else a single
    gradient step over all reported examples (the FedSGD approximation of a FedAvg update)."""
    sent = TrainConfig.from_record(observed.train_config)
    if threat.hyperparameters_known and not threat.secure_aggregation:
        return sent
    return TrainConfig(mode="fedsgd", lr=sent.lr, num_samples=observed.num_examples, batch_size=observed.num_examples)


def attacker_labels(observed: ObservedUpdate, threat: ThreatModel) -> tuple[np.ndarray, str]:
    if threat.labels == "known":
        if "labels" not in observed.shared:
            raise ValueError("threat model says labels are known but the client shared none")
        return np.asarray(observed.shared["labels"], dtype=np.int64), "known"
    labels = recover_labels(observed.update, observed.model.num_classes, observed.num_examples, threat.label_method)
    return labels, threat.label_method


class Attack(Registered):
    registry: ClassVar[dict[str, type]] = ATTACKS

    def reconstruct_many(self, observed: list[ObservedUpdate], threat: ThreatModel, *, device: str = "cpu",
                         seed: int = 0) -> list[Reconstruction]:
        raise NotImplementedError

    def reconstruct(self, observed: ObservedUpdate, threat: ThreatModel, **kwargs) -> Reconstruction:
        return self.reconstruct_many([observed], threat, **kwargs)[0]


class OptimizationAttack(Attack):
    """Base of attacks that run the engine. Updates that share a public model, a batch size and a client config are
    inverted together: ``vmap`` over updates and restarts (at most ``max_parallel`` candidates at once)."""

    iterations: int = Field(default=4800, ge=1)
    restarts: int = Field(default=1, ge=1)
    lr: float = Field(default=0.1, gt=0)
    max_parallel: int = Field(default=64, ge=1)
    trace_every: int = Field(default=100, ge=0)
    batching: Literal["auto", "vmap", "loop"] = "auto"
    compile: bool = False

    def engine_spec(self) -> EngineSpec:
        raise NotImplementedError

    def reconstruct_many(self, observed, threat, *, device="cpu", seed=0):
        groups: dict[tuple, list[int]] = {}
        for i, obs in enumerate(observed):
            cfg = attacker_train_config(obs, threat)
            # Same round means the same public model; the config fixes the batch and the step schedule.
            groups.setdefault((obs.round, obs.num_examples, cfg), []).append(i)
        results: list[Reconstruction | None] = [None] * len(observed)
        chunk = max(1, self.max_parallel // self.restarts)
        for (_, _, cfg), members in groups.items():
            for start in range(0, len(members), chunk):
                part = members[start:start + chunk]
                for i, rec in zip(part, self._run([observed[i] for i in part], threat, cfg, device, seed + start)):
                    results[i] = rec
        return results  # type: ignore[return-value]

    def side_information(self, observed: list[ObservedUpdate], simulator: VictimSimulator,
                         threat: ThreatModel) -> dict[str, torch.Tensor]:
        """Per-update extras the regularisers need, stacked [P, ...] (none by default)."""
        return {}

    def labels_for(self, observed: ObservedUpdate, threat: ThreatModel) -> tuple[np.ndarray, str]:
        return attacker_labels(observed, threat)

    def _run(self, observed: list[ObservedUpdate], threat: ThreatModel, cfg: TrainConfig, device: str,
             seed: int) -> list[Reconstruction]:
        t0 = time.perf_counter()
        first = observed[0]
        spec = first.model
        model = build_model(spec.name, spec.num_classes, image_size=spec.image_shape[1], width=spec.width)
        state = {k: torch.from_numpy(np.asarray(v)) for k, v in first.global_state.items()}
        model.load_state_dict(state, strict=False)
        simulator = VictimSimulator(model, step_schedule(cfg), cfg.lr, device)
        label_sets = [self.labels_for(obs, threat) for obs in observed]
        targets = {k: torch.stack([torch.from_numpy(np.asarray(obs.update[k], dtype=np.float32)) for obs in observed])
                   for k in simulator.params}
        problem = InversionProblem(simulator, targets, torch.from_numpy(np.stack([l for l, _ in label_sets])),
                                   spec.image_shape, *first.normalization, num_classes=spec.num_classes,
                                   aux=self.side_information(observed, simulator, threat))
        engine_spec = self.engine_spec()
        result = AttackEngine(engine_spec, device=device, seed=seed).run(problem)
        setup = time.perf_counter() - t0 - result.seconds
        share = (result.seconds + setup) / len(observed)
        joint = engine_spec.search_space != "pixels"
        return [
            Reconstruction(attack=self.name, images=result.images[i].numpy(), labels=result.labels[i].numpy(),
                           label_method="joint" if joint else label_sets[i][1], loss=float(result.losses[i]),
                           seconds=share, iterations=result.iterations, restarts=self.restarts,
                           trace=[(it, losses[i]) for it, losses in result.trace],
                           extra={"batched_with": len(observed), "gradient_evaluations": result.evaluations})
            for i in range(len(observed))
        ]


class InvertingGradients(OptimizationAttack):
    """Geiping et al. 2020: 1 - cosine matching of the whole update plus TV, Adam on signed gradients, step decay
    at 3/8, 5/8 and 7/8 of the budget, pixels boxed to the valid range, the best restart by matching loss."""

    name: ClassVar[str] = "inverting_gradients"
    tv: float = Field(default=1e-2, ge=0)
    objective: str = "cosine"
    init: str = "randn"

    def engine_spec(self) -> EngineSpec:
        return EngineSpec(objective=self.objective, regularizers=(("tv", self.tv),),
                          optimizer=OptimizerSpec(name="signed_adam", lr=self.lr), iterations=self.iterations,
                          restarts=self.restarts, boxed=True, init=self.init, trace_every=self.trace_every,
                          batching=self.batching, compile=self.compile)


def build_attack(spec: dict) -> Attack:
    """Construct an attack from ``{"name": ..., **params}``; raises ValueError naming the bad key."""
    return build_from_spec(ATTACKS, spec, "attack")
