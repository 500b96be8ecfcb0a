"""The attacker plugin's attacks, registered by name (entry-point group ``fedsim.attacks``). An attack is a pydantic
model of its parameters (the platform's :class:`fedsim.contract.Attack`) that composes engine parts.

Every attack takes only :class:`~fedsim.contract.ObservedUpdate` records and a
:class:`~fedsim.contract.ThreatModel`; it never sees sample ids or ground truth.
"""

from __future__ import annotations

import functools
import time
from dataclasses import replace
from typing import Callable, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from fedsim.contract import Attack, ObservedUpdate, Reconstruction, ThreatModel, build_attack
from fedsim.data import denormalize
from fedsim.models import build_from_spec
from fedsim.seeds import update_seed
from fedsim.training import TrainConfig, load_public_state, step_schedule

from .analytic import first_layer_is_linear, linear_layers, recover_layer_input
from .engine import (SEARCH_SPACES, AttackEngine, EngineResult, EngineSpec, GroupSpec, InversionProblem, OptimizerSpec,
                     VictimSimulator, check_compile)
from .labels import ModelEvidence, model_probe, recover_labels_named
from .tuning import Range, SurrogateTemplate, Tuned, TuneSpec, public_images, search_space, tune, write_tuning

__all__ = ["Attack", "build_attack", "OptimizationAttack", "InvertingGradients", "DeepLeakage", "GradInversion",
           "AnalyticRecovery"]


def attacker_train_config(observed: ObservedUpdate, threat: ThreatModel) -> TrainConfig:
    """The client computation the attacker simulates: the sent config if hyperparameters are known, else a single
    gradient step over all reported examples (the FedSGD approximation of a FedAvg update)."""
    sent = TrainConfig.from_record(observed.train_config)
    if threat.hyperparameters_known and not threat.secure_aggregation:
        return sent
    return TrainConfig(mode="fedsgd", lr=sent.lr, num_samples=observed.num_examples, batch_size=observed.num_examples)


def public_model(observed: ObservedUpdate) -> torch.nn.Module:
    """The model the server sent this round, rebuilt from the public architecture and weights."""
    spec = observed.model
    model = build_from_spec(spec)
    load_public_state(model, {k: torch.from_numpy(np.array(v)) for k, v in observed.global_state.items()})
    return model


TRAJECTORY_POINTS = 8  # models probed along a multi-step client's local trajectory (labels.model_probe)


def recover_with(method: str, observed: ObservedUpdate, cfg: TrainConfig, model: torch.nn.Module,
                 probe: Callable[[], ModelEvidence] | None = None) -> tuple[np.ndarray, str]:
    """Labels by ``method`` and the name of what ran (``auto:<chosen>``). ``probe``: one shared by several methods
    (see :func:`update_probe`)."""
    steps = len(step_schedule(cfg))
    return recover_labels_named(observed.update, observed.model.num_classes, observed.num_examples, method,
                                lr=cfg.lr, steps=steps, probe=probe or update_probe(observed, cfg, model))


def update_probe(observed: ObservedUpdate, cfg: TrainConfig, model: torch.nn.Module) -> Callable[[], ModelEvidence]:
    """The public model's evidence for this update's label recovery, computed once however often it is asked."""
    points = min(len(step_schedule(cfg)), TRAJECTORY_POINTS)
    return functools.cache(model_probe(model, observed.model.image_shape, update=observed.update, points=points))


def attacker_labels(observed: ObservedUpdate, threat: ThreatModel, cfg: TrainConfig,
                    model: torch.nn.Module) -> tuple[np.ndarray, str]:
    if threat.labels == "known":
        if "labels" not in observed.shared:
            raise ValueError("threat model says labels are known but the client shared none")
        return np.asarray(observed.shared["labels"], dtype=np.int64), "known"
    return recover_with(threat.label_method, observed, cfg, model)


def label_candidates(observed: ObservedUpdate, threat: ThreatModel) -> dict[str, np.ndarray]:
    """Every applicable label-recovery method's answer, so the leakage table can score each of them."""
    cfg = attacker_train_config(observed, threat)
    model = public_model(observed)
    methods = ["idlg"] if observed.num_examples == 1 else []
    probe = update_probe(observed, cfg, model)
    out = {}
    for method in methods + ["yin", "count", "llg", "ilrg"]:
        try:
            out[method] = recover_with(method, observed, cfg, model, probe)[0]
        except ValueError:  # e.g. no classifier bias and no feature statistics
            continue
    return out


def with_label_candidates(observed: list[ObservedUpdate], threat: ThreatModel,
                          recs: list[Reconstruction]) -> list[Reconstruction]:
    """Attach every label method's answer to each reconstruction (the evaluator scores each of them)."""
    for obs, rec in zip(observed, recs):
        rec.extra.setdefault("label_candidates", label_candidates(obs, threat))
    return recs


class OptimizationAttack(Attack):
    """Base of attacks that run the engine. Updates that share a public model, a batch size and a client config are
    inverted together: ``vmap`` over updates and restarts (at most ``max_parallel`` candidates at once)."""

    iterations: int = Field(default=4800, ge=1)
    restarts: int = Field(default=1, ge=1)
    lr: float = Field(default=0.1, gt=0)
    max_parallel: int = Field(default=64, ge=1)
    trace_every: int = Field(default=100, ge=0)
    batching: Literal["auto", "stacked", "vmap", "loop"] = "auto"
    compile: bool = False
    tune: TuneSpec | None = None  # search the settings on surrogate updates of threat.public_data (attacker.tuning)

    _tuned: dict[str, Tuned] = PrivateAttr(default_factory=dict)  # (architecture, recipe) key -> tuned settings

    @classmethod
    def tune_space(cls) -> dict:
        """The settings ``tune`` searches when its ``space`` is empty."""
        return {"lr": Range(low=1e-3, high=1.0)}

    @model_validator(mode="after")
    def _tunable(self):
        if self.tune is not None:
            if self.state_scope != "none":
                raise ValueError(f"tune: {self.name} learns across rounds; only stateless attacks tune")
            search_space(self, self.tune)
        return self

    @property
    def kept_scope(self):
        return "global" if self.tune is not None else self.state_scope  # one worker tunes each recipe once

    def with_settings(self, settings: dict) -> "OptimizationAttack":
        """This attack with ``settings`` replacing its own (validated) and no tuning."""
        return type(self)(**{**self.model_dump(exclude={"tune"}), **settings})

    def check_threat(self, threat: ThreatModel) -> None:
        if self.tune is not None:
            if not threat.public_data:
                raise ValueError("tune needs threat.public_data: the attacker's own images to compute surrogate "
                                 "updates from (e.g. cifar10:test)")
            try:
                public_images(threat.public_data)
            except Exception as err:  # noqa: BLE001 - any load failure is one line naming the key
                raise ValueError(str(err) if "threat.public_data" in str(err)
                                 else f"threat.public_data={threat.public_data!r}: {err}") from None

    def state_dict(self) -> dict:
        return {"tuned": {k: t.to_state() for k, t in self._tuned.items()}} if self.tune is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.tune is None:
            return super().load_state_dict(state)
        self._tuned = {k: Tuned.from_state(v) for k, v in state.get("tuned", {}).items()}

    def end_round(self, server_round, *, device="cpu", seed=0, folder=None):
        if self.tune is not None and folder is not None and self._tuned:
            write_tuning(folder, self._tuned)

    def tuned_settings(self, template: SurrogateTemplate, threat: ThreatModel, device: str, seed: int) -> Tuned:
        """The settings for this (architecture, recipe), searched the first time it is seen."""
        if template.key not in self._tuned:
            self._tuned[template.key] = tune(self, template, threat, device=device, seed=seed)
        return self._tuned[template.key]

    @field_validator("compile")
    @classmethod
    def _compile_needs_vmap(cls, compile: bool, info: ValidationInfo) -> bool:
        # Checked when the config loads, so a federation does not run its rounds before the attack refuses.
        check_compile(info.data.get("batching", "auto"), compile)
        return compile

    def engine_spec(self) -> EngineSpec:
        raise NotImplementedError

    def reconstruct_many(self, observed, threat, *, device="cpu", seed=0):
        if self.tune is not None:
            return self._reconstruct_tuned(observed, threat, device, seed)
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
                for i, rec in zip(part, self._run([observed[i] for i in part], threat, cfg, device, seed)):
                    results[i] = rec
        return with_label_candidates(observed, threat, results)  # type: ignore[arg-type]

    def _reconstruct_tuned(self, observed, threat, device, seed):
        """Each (architecture, recipe) group with its tuned settings; rows carry the settings used."""
        templates = [SurrogateTemplate.of(obs) for obs in observed]
        groups: dict[str, list[int]] = {}
        for i, template in enumerate(templates):
            groups.setdefault(template.key, []).append(i)
        results: list[Reconstruction | None] = [None] * len(observed)
        for key, members in groups.items():
            tuned = self.tuned_settings(templates[members[0]], threat, device, seed)
            settings = dict(tuned.params)
            recs = self.with_settings(settings).reconstruct_many([observed[i] for i in members], threat,
                                                                 device=device, seed=seed)
            for i, rec in zip(members, recs):
                rec.columns.update(tuned.columns())
                rec.extra["tuned"] = dict(settings)
                results[i] = rec
        return results

    def side_information(self, observed: list[ObservedUpdate], simulator: VictimSimulator,
                         threat: ThreatModel) -> dict[str, torch.Tensor]:
        """Per-update extras the regularisers need, stacked [P, ...] (none by default)."""
        return {}

    def search(self, spec: EngineSpec, problem: InversionProblem, device: str, seed: int) -> EngineResult:
        """The engine run(s) of this attack (one run of the spec's search space by default; a multi-stage attack
        composes several)."""
        return AttackEngine(spec, device=device, seed=seed).run(problem)

    def build_problem(self, observed: list[ObservedUpdate], cfg: TrainConfig, labels: list[np.ndarray], device: str,
                      model: torch.nn.Module, seed: int) -> InversionProblem:
        """The engine's problem for a group of updates (the client's steps replayed on one copy of the images by
        default; ``fedavg_leakage`` simulates one copy per local epoch)."""
        return inversion_problem(observed, cfg, labels, device, model, seed=seed)

    def labels_for(self, observed: ObservedUpdate, threat: ThreatModel, cfg: TrainConfig,
                   model: torch.nn.Module) -> tuple[np.ndarray, str]:
        return attacker_labels(observed, threat, cfg, model)

    def _run(self, observed: list[ObservedUpdate], threat: ThreatModel, cfg: TrainConfig, device: str,
             seed: int) -> list[Reconstruction]:
        t0 = time.perf_counter()
        model = public_model(observed[0])
        label_sets = [self.labels_for(obs, threat, cfg, model) for obs in observed]
        problem = self.build_problem(observed, cfg, [labels for labels, _ in label_sets], device, model, seed)
        problem.aux.update(self.side_information(observed, problem.simulator, threat))
        engine_spec = replace(self.engine_spec(), update_scale=update_scale(cfg))
        result = self.search(engine_spec, problem, device, seed)
        setup = time.perf_counter() - t0 - result.seconds
        share = (result.seconds + setup) / len(observed)
        joint = SEARCH_SPACES[engine_spec.search_space].searches_labels
        return [
            Reconstruction(attack=self.name, images=result.images[i].numpy(), labels=result.labels[i].numpy(),
                           label_method="joint" if joint else label_sets[i][1], loss=float(result.losses[i]),
                           seconds=share, iterations=result.iterations, restarts=self.restarts,
                           trace=[(it, losses[i]) for it, losses in result.trace],
                           extra={"batched_with": len(observed), "gradient_evaluations": result.evaluations,
                                  **{k: float(v[i]) for k, v in result.update_fit.items()}})
            for i in range(len(observed))
        ]


def update_scale(cfg: TrainConfig) -> float:
    """lr x local steps: dividing updates by it compares them in gradient units."""
    return cfg.lr * len(step_schedule(cfg))


def inversion_problem(observed: list[ObservedUpdate], cfg: TrainConfig, labels: list[np.ndarray], device: str,
                      model: torch.nn.Module | None = None, seed: int = 0) -> InversionProblem:
    """The engine's problem for updates computed under one public model with one client config: the simulated
    client (replaying ``cfg``), the observed updates as targets, the labels the attack uses, and each update's own
    random stream from the call's ``seed`` and the update's identity (so its result does not depend on which other
    updates are attacked with it)."""
    first = observed[0]
    spec = first.model
    simulator = VictimSimulator(model if model is not None else public_model(first), step_schedule(cfg), cfg.lr,
                                device, bn_mode=cfg.bn_mode)
    targets = {k: torch.stack([torch.from_numpy(np.asarray(obs.update[k], dtype=np.float32)) for obs in observed])
               for k in simulator.params}
    return InversionProblem(simulator, targets, torch.from_numpy(np.stack(labels)), spec.image_shape,
                            *first.normalization, num_classes=spec.num_classes,
                            seeds=[update_seed(seed, obs.round, obs.client_id) for obs in observed])


def analytic_features(observed: list[ObservedUpdate], simulator: VictimSimulator) -> torch.Tensor:
    """[P, B, F]: the classifier's input recovered analytically from each update (NaN where B > 1, where the
    formula only gives a mixture)."""
    layer = simulator.feature_layer
    rows = []
    for obs in observed:
        feats = recover_layer_input(obs.update, layer).float()
        rows.append(feats[None].expand(obs.num_examples, -1) if obs.num_examples == 1
                    else torch.full((obs.num_examples, feats.numel()), float("nan")))
    return torch.stack(rows)


class InvertingGradients(OptimizationAttack):
    """Geiping et al. 2020: 1 - cosine matching of the whole update plus TV, Adam on signed gradients, step decay
    at 3/8, 5/8 and 7/8 of the budget, pixels boxed to the valid range, the best restart by matching loss.
    ``features > 0`` adds matching of the classifier's input recovered analytically from the update."""

    name: ClassVar[str] = "inverting_gradients"
    tv: float = Field(default=1e-2, ge=0)
    features: float = Field(default=0.0, ge=0)
    objective: str = "cosine"
    init: str = "randn"

    @classmethod
    def tune_space(cls) -> dict:
        return {"lr": Range(low=1e-3, high=1.0), "tv": Range(low=1e-6, high=0.3)}

    def engine_spec(self) -> EngineSpec:
        regs = (("tv", self.tv),) + ((("features", self.features),) if self.features else ())
        return EngineSpec(objective=self.objective, regularizers=regs,
                          optimizer=OptimizerSpec(name="signed_adam", lr=self.lr), iterations=self.iterations,
                          restarts=self.restarts, boxed=True, init=self.init, trace_every=self.trace_every,
                          batching=self.batching, compile=self.compile)

    def side_information(self, observed, simulator, threat):
        return {"features": analytic_features(observed, simulator)} if self.features else {}


class DeepLeakage(OptimizationAttack):
    """DLG (Zhu et al. 2019): squared L2 distance of the updates, L-BFGS (``max_iter`` iterations per step),
    dummy labels optimised jointly as soft labels (``labels="joint"``) or taken from the threat model's label
    recovery (``labels="recovered"``, iDLG when the batch is one image).

    ``line_search = "strong_wolfe"`` (default) is torch.optim.LBFGS's line search; ``"none"`` moves ``lr`` along each
    direction as Zhu et al.'s code does, which stalled or fell into a wrong-label basin from 22% of random starts on
    CIFAR-10 test images 5-9 (and from every start tried on image 12). Four restarts by default: the best by
    matching loss catches a start that still lands in a wrong-label basin."""

    name: ClassVar[str] = "dlg"
    iterations: int = Field(default=300, ge=1)
    restarts: int = Field(default=4, ge=1)
    lr: float = Field(default=1.0, gt=0)
    max_iter: int = Field(default=20, ge=1)
    history_size: int = Field(default=100, ge=1)
    line_search: Literal["strong_wolfe", "none"] = "strong_wolfe"
    labels: Literal["joint", "recovered"] = "joint"
    objective: str = "l2"
    tv: float = Field(default=0.0, ge=0)

    def engine_spec(self) -> EngineSpec:
        return EngineSpec(objective=self.objective, regularizers=(("tv", self.tv),),
                          search_space="pixels_and_labels" if self.labels == "joint" else "pixels",
                          optimizer=OptimizerSpec(name="lbfgs", lr=self.lr, max_iter=self.max_iter,
                                                  history_size=self.history_size,
                                                  line_search=None if self.line_search == "none" else self.line_search),
                          iterations=self.iterations, restarts=self.restarts, boxed=False, init="randn",
                          trace_every=self.trace_every, batching=self.batching, compile=self.compile)


class GradInversion(OptimizationAttack):
    """Yin et al. 2021: L2 matching + BatchNorm fidelity + image prior (TV, L2) + group consistency.

    BN targets (``bn_source``): ``shared`` (the batch statistics clients send; needs share_bn_stats), ``running``
    (the global model's running statistics, a proxy the server always has), ``auto`` (shared if the threat model
    says so, else running). Group consistency (``group``): restarts pulled every ``group_every`` iterations toward
    their mean (``lazy``) or toward the mean after aligning each restart to it by translation (``registered``)."""

    name: ClassVar[str] = "gradinversion"
    iterations: int = Field(default=2400, ge=1)
    restarts: int = Field(default=4, ge=1)
    lr: float = Field(default=0.1, gt=0)
    objective: str = "l2"
    grad_weight: float = Field(default=1e-4, gt=0)  # weights as in Yin et al. (breaching's reading of them)
    tv: float = Field(default=1e-4, ge=0)
    l2: float = Field(default=1e-6, ge=0)
    bn: float = Field(default=1e-1, ge=0)
    bn_source: Literal["auto", "shared", "running"] = "auto"
    group: Literal["none", "lazy", "registered"] = "none"
    group_weight: float = Field(default=1e-2, ge=0)
    group_every: int = Field(default=100, ge=1)
    group_start: int = Field(default=0, ge=0)
    signed: bool = False

    def check_threat(self, threat):
        super().check_threat(threat)
        check_bn_source(self.bn, self.bn_source, threat)

    def engine_spec(self) -> EngineSpec:
        regs = [("tv", self.tv), ("l2", self.l2), ("bn", self.bn)]
        group = None
        if self.group != "none":
            regs.append(("group", self.group_weight))
            group = GroupSpec(mode=self.group, every=self.group_every, start=self.group_start)
        return EngineSpec(objective=self.objective, regularizers=tuple(regs), matching_weight=self.grad_weight,
                          optimizer=OptimizerSpec(name="signed_adam" if self.signed else "adam", lr=self.lr),
                          iterations=self.iterations, restarts=self.restarts, boxed=True, init="randn",
                          trace_every=self.trace_every, group=group, batching=self.batching, compile=self.compile)

    def side_information(self, observed, simulator, threat):
        return bn_targets(observed, simulator, threat, self.bn_source) if self.bn else {}


def check_bn_source(bn: float, source: str, threat: ThreatModel) -> None:
    if bn and source == "shared" and not threat.bn_stats_shared:
        raise ValueError("bn_source=shared but the clients share no BatchNorm statistics (add the share_bn_stats "
                         "defense, or use bn_source=auto or running)")


def bn_targets(observed: list[ObservedUpdate], simulator: VictimSimulator, threat: ThreatModel,
               source: str = "auto") -> dict[str, torch.Tensor]:
    """BatchNorm-fidelity targets per update, stacked [P, channels] as ``bn.mean.i`` / ``bn.var.i``: the batch
    statistics clients share (``shared``; needs share_bn_stats), the public model's running statistics
    (``running``, a proxy the server always has), or ``auto`` (shared if the threat model says so)."""
    if not simulator.bn_layers:
        return {}
    if source == "auto":
        source = "shared" if threat.bn_stats_shared else "running"
    aux: dict[str, list] = {}
    for obs in observed:
        for i, layer in enumerate(simulator.bn_layers):
            if source == "shared":
                if "bn_stats" not in obs.shared:
                    raise ValueError("bn_source=shared but the clients share no BatchNorm statistics")
                mean, var = obs.shared["bn_stats"][layer]
            else:
                mean, var = obs.global_state[f"{layer}.running_mean"], obs.global_state[f"{layer}.running_var"]
            aux.setdefault(f"bn.mean.{i}", []).append(torch.as_tensor(np.asarray(mean), dtype=torch.float32))
            aux.setdefault(f"bn.var.{i}", []).append(torch.as_tensor(np.asarray(var), dtype=torch.float32))
    return {k: torch.stack(v) for k, v in aux.items()}


class AnalyticRecovery(Attack):
    """Geiping et al. Prop. 3.1 on the first layer of a network that starts fully connected: the image itself
    (exact for one image per update; a mixture for larger batches). Labels follow the threat model."""

    name: ClassVar[str] = "analytic"

    def check(self, model):
        victim = build_from_spec(model)
        if not first_layer_is_linear(victim):
            raise ValueError(f"analytic recovery needs a victim whose first layer is fully connected (e.g. mlp), "
                             f"not {model.name}")

    def reconstruct_many(self, observed, threat, *, device="cpu", seed=0):
        out = []
        for obs in observed:
            t0 = time.perf_counter()
            model = public_model(obs)
            if not first_layer_is_linear(model):
                raise ValueError(f"analytic recovery needs a model that starts fully connected, not {obs.model.name}")
            cfg = attacker_train_config(obs, threat)
            labels, method = attacker_labels(obs, threat, cfg, model)
            x = recover_layer_input(obs.update, linear_layers(model)[0]).float()
            mean, std = obs.normalization
            image = denormalize(x.view(1, *obs.model.image_shape), mean, std).clamp(0, 1)
            images = image.expand(obs.num_examples, -1, -1, -1).numpy().copy()
            out.append(Reconstruction(self.name, images, labels, method, loss=0.0, seconds=time.perf_counter() - t0,
                                      iterations=0, restarts=1))
        return with_label_candidates(observed, threat, out)
