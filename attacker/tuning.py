"""An attack that tunes itself without ground truth: hyperparameter search on surrogate updates of public data.

A hand-set attack that is badly tuned reports less leakage than there is, the one error an audit must not make.
With ``tune = {...}`` an optimisation attack first searches its own settings (step size, TV weight, ...) with
Optuna: for each trial it attacks *surrogate* updates the attacker computes itself, from its own public images
(``threat.public_data``, never the clients' data) under the round's public model and the declared recipe, by the
platform's client code (:func:`fedsim.client.client_round`) and the server's one observation function
(:meth:`fedsim.contract.ServerView.observe`); it scores each trial by PSNR against those public images it drew.
The best settings are cached per (architecture, recipe): the first round of a recipe tunes, later rounds reuse.

What reaches the tuner of a real update is a :class:`SurrogateTemplate`: the architecture, the weights the server
sent, the training config it sent and the reported example count — never the update itself, nor anything the
client shared. The configured settings are always the search's first trial, so a tuned attack is never worse
than the configured one on the surrogates.

Left out, on purpose: the announced defenses' parameters are not public (the observed record names them only), so
surrogates are undefended updates; a defense changes the best settings, not which data the tuner may see.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedsim.client import observed_round
from fedsim.contract import ObservedUpdate, ServerView, ThreatModel
from fedsim.data import ImageData, load_public_data
from fedsim.metrics import score
from fedsim.models import build_from_spec
from fedsim.training import TrainConfig

if TYPE_CHECKING:
    from .attacks import OptimizationAttack

log = logging.getLogger(__name__)
TUNING_FILE = "tuning.json"
SURROGATE_CLIENT = 1_000_000  # surrogate i is "client" SURROGATE_CLIENT + i (seeds want ids >= 0; no real client)


class Range(BaseModel):
    """A numeric interval searched by Optuna: ``log`` (default: when ``low > 0`` and ``high >= 100 low``) samples
    on a log scale; integers when both ends are integers."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    low: int | float  # both ints (and not log): an integer parameter
    high: int | float
    log: bool | None = None

    @model_validator(mode="after")
    def _ordered(self):
        if not self.low < self.high:
            raise ValueError(f"range low={self.low} must be below high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, got {self.low}")
        return self

    @property
    def is_log(self) -> bool:
        return self.log if self.log is not None else (self.low > 0 and self.high >= 100 * self.low)


Choices = list[Union[int, float, str, bool]]


class TuneSpec(BaseModel):
    """``tune = {trials = 12, surrogates = 2, space = {lr = {low = 0.001, high = 1.0}, iterations = [200, 400]}}``.

    ``space``: parameter -> a :class:`Range` or a list of choices; empty: the attack's own default space
    (``OptimizationAttack.tune_space``). ``surrogates``: public batches attacked per trial (their mean PSNR is the
    trial's score). ``iterations``: the budget of each trial's attack (None: the attack's own); the tuned attack
    then runs with its own budget unless ``iterations`` is itself in the space."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    trials: int = Field(default=12, ge=1)
    surrogates: int = Field(default=2, ge=1)
    iterations: int | None = Field(default=None, ge=1)
    space: dict[str, Union[Range, Choices]] = Field(default_factory=dict)
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _choices(self):
        for key, value in self.space.items():
            if isinstance(value, list) and not value:
                raise ValueError(f"space.{key}: no choices")
        return self


@dataclass(frozen=True)
class SurrogateTemplate:
    """What the tuner may know of a round's update: everything public about it and nothing the client sent."""

    round: int
    model: object  # fedsim.contract.ModelSpec
    normalization: tuple[tuple[float, ...], tuple[float, ...]]
    global_state: dict[str, np.ndarray]
    train_config: dict
    num_examples: int

    @classmethod
    def of(cls, observed: ObservedUpdate) -> "SurrogateTemplate":
        return cls(round=observed.round, model=observed.model, normalization=observed.normalization,
                   global_state=observed.global_state, train_config=dict(observed.train_config),
                   num_examples=observed.num_examples)

    @property
    def key(self) -> str:
        """The cache key: architecture and recipe (not the round: later rounds reuse a recipe's settings)."""
        spec = self.model
        return json.dumps({"model": [spec.name, spec.num_classes, list(spec.image_shape), spec.width,
                                     spec.activation], "recipe": self.train_config,
                           "num_examples": self.num_examples}, sort_keys=True)


@dataclass(frozen=True)
class Surrogate:
    """One surrogate update and the attacker's own truth for it (public images it drew)."""

    observed: ObservedUpdate
    images: torch.Tensor  # [B, C, H, W] in [0, 1]
    labels: np.ndarray


@functools.lru_cache(maxsize=4)
def public_images(spec: str) -> ImageData:
    return load_public_data(spec)


def surrogates(template: SurrogateTemplate, threat: ThreatModel, public: ImageData, count: int,
               seed: int) -> list[Surrogate]:
    """``count`` updates of public batches, computed as a client would (the platform's client round, no defenses)
    and observed as the server would (the one observation function)."""
    cfg = TrainConfig.from_record(template.train_config)
    if len(public) < template.num_examples:
        raise ValueError(f"threat.public_data has {len(public)} images, fewer than a client's "
                         f"{template.num_examples}")
    if public.shape != tuple(template.model.image_shape):
        raise ValueError(f"threat.public_data images are {public.shape}, the model takes "
                         f"{tuple(template.model.image_shape)}")
    data = replace(public, mean=tuple(template.normalization[0]), std=tuple(template.normalization[1]))
    model = build_from_spec(template.model)
    global_state = {k: torch.from_numpy(np.array(v)) for k, v in template.global_state.items()}
    view = ServerView(model=template.model, normalization=template.normalization, threat=threat)
    rng = np.random.default_rng([seed, template.round])
    out = []
    for i in range(count):
        ids = np.sort(rng.choice(len(data), size=template.num_examples, replace=False))
        observed, _ = observed_round(view, model, global_state, data, ids, cfg, seed=seed,
                                     server_round=template.round, client_id=SURROGATE_CLIENT + i)
        out.append(Surrogate(observed, data.unit_tensor(ids), np.asarray(data.labels[ids])))
    return out


@dataclass
class Tuned:
    """The search's outcome for one (architecture, recipe): the settings and how they scored on the surrogates."""

    params: dict
    psnr: float  # mean PSNR of the best trial on the surrogates
    configured_psnr: float  # the configured settings' (the first trial)
    trials: list[dict]  # every trial: params, psnr (nan: the settings were invalid or the attack failed)

    def to_state(self) -> dict:
        return {"params": dict(self.params), "psnr": self.psnr, "configured_psnr": self.configured_psnr,
                "trials": [dict(t) for t in self.trials]}

    @classmethod
    def from_state(cls, state: dict) -> "Tuned":
        return cls(params=dict(state["params"]), psnr=float(state["psnr"]),
                   configured_psnr=float(state["configured_psnr"]), trials=list(state["trials"]))

    def columns(self) -> dict[str, float]:
        """What each row carries: the numeric settings used and the surrogate scores that chose them."""
        cols = {f"tuned_{k}": float(v) for k, v in self.params.items() if isinstance(v, (int, float, bool))}
        return {**cols, "tune_surrogate_psnr": self.psnr, "tune_configured_psnr": self.configured_psnr}


def search_space(attack: "OptimizationAttack", spec: TuneSpec) -> dict:
    space = spec.space or attack.tune_space()
    fields = type(attack).model_fields
    for key in space:
        if key not in fields or key in ("tune", "max_parallel", "trace_every", "batching", "compile"):
            raise ValueError(f"tune.space: {key!r} is not a tunable setting of {attack.name}")
    return space


def tune(attack: "OptimizationAttack", template: SurrogateTemplate, threat: ThreatModel, *, device: str = "cpu",
         seed: int = 0) -> Tuned:
    """Search ``attack``'s settings on surrogate updates of ``threat.public_data`` (Optuna, TPE, seeded)."""
    import optuna

    spec = attack.tune
    assert spec is not None and threat.public_data
    space = search_space(attack, spec)
    tasks = surrogates(template, threat, public_images(threat.public_data), spec.surrogates, spec.seed)
    configured = {k: getattr(attack, k) for k in space}
    fixed = {"iterations": spec.iterations} if spec.iterations and "iterations" not in space else {}
    trials: list[dict] = []

    def objective(trial: optuna.Trial) -> float:
        params = {k: suggest(trial, k, v) for k, v in space.items()}
        try:
            candidate = attack.with_settings({**params, **fixed})
            recs = candidate.reconstruct_many([t.observed for t in tasks], threat, device=device, seed=seed)
            value = float(np.mean([score(torch.from_numpy(np.asarray(r.images, dtype=np.float32)), t.images,
                                         r.labels, t.labels).summary()["psnr_mean"] for r, t in zip(recs, tasks)]))
        except ValueError as err:  # settings the attack rejects (a validator) score as failed trials
            log.info("tune %s: trial %s rejected: %s", attack.name, params, err)
            value = float("nan")
        trials.append({**params, "psnr": value})
        return value if math.isfinite(value) else float("-inf")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=spec.seed))
    study.enqueue_trial(configured)
    with warnings.catch_warnings():
        # the configured settings may lie outside the space (a mis-set attack): Optuna evaluates them as given
        warnings.filterwarnings("ignore", message="Fixed parameter .* is out of range")
        study.optimize(objective, n_trials=spec.trials)
    best = dict(study.best_trial.params)
    return Tuned(params=best, psnr=float(study.best_value), configured_psnr=trials[0]["psnr"], trials=trials)


def suggest(trial, name: str, domain) -> object:
    if isinstance(domain, Range):
        if isinstance(domain.low, int) and isinstance(domain.high, int):
            return trial.suggest_int(name, domain.low, domain.high, log=domain.is_log)
        return trial.suggest_float(name, float(domain.low), float(domain.high), log=domain.is_log)
    return trial.suggest_categorical(name, list(domain))


def write_tuning(folder: Path, tuned: dict[str, Tuned]) -> Path:
    """The run directory's record of every search: ``tuning.json`` beside the attack's state."""
    path = folder / TUNING_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps([{"key": json.loads(k), **t.to_state()} for k, t in tuned.items()], indent=1,
                              default=float))
    tmp.replace(path)
    return path
