"""The run config (`RunConfig`): one TOML file, validated in full before anything starts.

Unknown keys and bad values raise :class:`ConfigError` with one line naming the key (the CLI exits with code 2).
``--set a.b=value`` overrides any key; values parse as TOML literals (``0.1``, ``true``, ``"x"``, ``[1, 2]``),
falling back to plain strings; ``attacks.0.iterations=100`` indexes into lists.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .checks import check_device_name
from .contract import LABEL_METHODS, ThreatModel, build_attack
from .data import is_same_data
from .defenses import Defense, build_defense, shared_by
from .models import MODELS
from .registry import SpecError, lookup, validation_problems
from .training import TrainConfig


def registered(registry: Callable[[], dict], kind: str) -> AfterValidator:
    """A validator that accepts only names in ``registry()`` (looked up late: plugins may register after import)."""

    def check(value: str) -> str:
        lookup(registry(), value, kind)
        return value

    return AfterValidator(check)


def build_threat(defenses: list[Defense], *, labels: str = "recovered", label_method: str = "auto",
                 hyperparameters_known: bool = True, secure_aggregation: bool = False,
                 public_data: str | None = None) -> ThreatModel:
    """The threat model of a run: what clients share follows from their defense pipeline (the one place this is
    derived for `fedsim run`, `fedsim attack` and `fedsim experiment`)."""
    return ThreatModel(labels=labels, label_method=label_method, bn_stats_shared="bn_stats" in shared_by(defenses),
                       hyperparameters_known=hyperparameters_known, secure_aggregation=secure_aggregation,
                       public_data=public_data)


def _device_name(device: str) -> str:
    try:
        return check_device_name(device, "device")
    except ValueError as err:
        raise ValueError(str(err).removeprefix("device: ")) from None


class ConfigError(ValueError):
    """A bad configuration; the message is one line that names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    dataset: str = "cifar10"  # cifar10 | cifar100 | imagefolder | npz | ffhq | a path to an .npz or a folder
    path: str | None = None  # explicit location (tried before FEDSIM_DATA_DIR and download)
    annotations: str | None = None  # ffhq: the folder of ffhq-features-dataset json files (<ffhq id>.json)
    attribute: str = "gender"  # ffhq: the categorical face attribute used as the label
    test_path: str | None = None  # held-out split for npz/imagefolder sources (else test_fraction of the data)
    test_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    image_size: int = Field(default=32, ge=8)  # resize for image folders and ffhq
    partition: Literal["iid", "dirichlet"] = "iid"
    alpha: float = Field(default=0.5, gt=0.0)  # Dirichlet concentration (smaller: more label skew)
    test_samples: int = Field(default=500, ge=0)  # held-out images for the global accuracy (0: all)


class FederationConfig(Section):
    num_clients: int = Field(default=8, ge=1)
    clients_per_round: int = Field(default=4, ge=1)
    rounds: int = Field(default=3, ge=1)
    # a client that raises: "skip" records it in failures.parquet and aggregates the others; "stop" ends the run
    # with one line naming the client and round
    on_client_error: Literal["skip", "stop"] = "skip"
    # "fixed": exactly clients_per_round clients per round; "poisson": each client independently with probability
    # clients_per_round / num_clients (the sampling the DP accountant's bound assumes; a round may have none)
    sampling: Literal["fixed", "poisson"] = "fixed"

    @property
    def sample_rate(self) -> float:
        return self.clients_per_round / self.num_clients

    @model_validator(mode="after")
    def _fits(self):
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"clients_per_round ({self.clients_per_round}) exceeds num_clients ({self.num_clients})")
        return self


class ModelConfig(Section):
    name: Annotated[str, registered(lambda: MODELS, "model")] = "lenet_zhu"
    width: int = Field(default=64, ge=1)  # convnet / resnet18 base width
    activation: Literal["default", "sigmoid"] = "default"  # sigmoid: the victim's ReLUs become Sigmoids
    checkpoint: str | None = None  # a state dict saved by `fedsim train-victim` (loaded with weights_only=True)


class ClientConfig(Section):
    mode: Literal["fedsgd", "fedavg"] = "fedsgd"
    lr: float = Field(default=0.1, gt=0.0)
    epochs: int = Field(default=1, ge=1)  # FedAvg local epochs
    batch_size: int = Field(default=1, ge=1)  # FedSGD: the one batch; FedAvg: local mini-batch size
    num_samples: int | None = Field(default=None, ge=1)  # local samples per round (FedSGD: batch_size)
    shuffle: bool = False  # FedAvg: reshuffle local samples every epoch
    bn_mode: Literal["train", "eval"] = "train"  # BatchNorm statistics during local steps: batch or running (fixed)

    def train_config(self) -> TrainConfig:
        n = self.num_samples or self.batch_size
        if self.mode == "fedsgd":
            return TrainConfig(mode="fedsgd", lr=self.lr, epochs=1, batch_size=n, num_samples=n, bn_mode=self.bn_mode)
        return TrainConfig(mode="fedavg", lr=self.lr, epochs=self.epochs, batch_size=self.batch_size,
                           num_samples=n, shuffle=self.shuffle, bn_mode=self.bn_mode)


class ThreatConfig(Section):
    labels: Literal["known", "recovered"] = "recovered"
    label_method: Annotated[str, registered(lambda: LABEL_METHODS, "label method")] = "auto"
    bn_stats_shared: bool | None = None  # derived from the defense pipeline (share_bn_stats) when unset
    hyperparameters_known: bool = True
    secure_aggregation: bool = False
    # the attacker's own auxiliary images ("cifar10:test" or a path), never the clients': a self-tuning attack's
    # surrogate updates are computed from them (attacks.<i>.tune)
    public_data: str | None = None


class AttackSettings(Section):
    clients_per_round: int = Field(default=2, ge=0)  # how many of the sampled clients are attacked each round
    executor: Literal["ray", "inline"] = "ray"  # ray: actors, FL loop does not wait; inline: in the server thread
    workers: int = Field(default=2, ge=1)
    threads: int = Field(default=1, ge=1)  # torch threads per attack worker
    gpus_per_worker: float | None = Field(default=None, ge=0.0)  # default: 1/workers when device is cuda, else 0
    # custom Ray resources each attacker worker requests, e.g. {attacker_node = 1}: places the workers on the nodes
    # started with that resource (`ray start --resources='{"attacker_node": 4}'`)
    resources: dict[str, float] = Field(default_factory=dict)
    # seconds one attack call (one attack on one worker's share of a round) may run; past it the round's rows for
    # that attack are errors with the reason and the worker restarts (ray executor). None: no limit
    timeout: float | None = Field(default=None, gt=0.0)
    # the rounds whose updates are attacked (None: every round); e.g. [1] attacks the first round of a long run
    # that trains on for its utility
    rounds: list[Annotated[int, Field(ge=1)]] | None = None
    # the attacker's own seed (restart inits, prior task sampling), on the attacker's branch of the run seed; None:
    # the branch itself. Another value repeats the attacks of an identical federation with other random draws.
    seed: int | None = Field(default=None, ge=0)


class PrivacyConfig(Section):
    delta: float = Field(default=1e-5, gt=0.0, lt=1.0)  # the delta epsilon is reported for (rounds.parquet)


class RayConfig(Section):
    address: str | None = None  # join an existing cluster (e.g. "auto" or "ray://host:10001")
    num_cpus: int | None = Field(default=None, ge=1)  # local cluster size (default: all cores)
    client_cpus: float = Field(default=1.0, gt=0.0)
    client_gpus: float = Field(default=0.0, ge=0.0)
    object_store_memory_mb: int = Field(default=512, ge=78)


class RunConfig(Section):
    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    device: Annotated[str, AfterValidator(_device_name)] = "cpu"  # cpu, cuda, cuda:N, mps
    data: DataConfig = Field(default_factory=DataConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    client: ClientConfig = Field(default_factory=ClientConfig)
    defenses: list[dict[str, Any]] = Field(default_factory=list)  # [{name = "topk", fraction = 0.1}, ...]
    threat: ThreatConfig = Field(default_factory=ThreatConfig)
    attack: AttackSettings = Field(default_factory=AttackSettings)
    attacks: list[dict[str, Any]] = Field(default_factory=list)  # [{name = "inverting_gradients", ...}, ...]
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("defenses", "attacks")
    @classmethod
    def _buildable(cls, specs, info):
        build = build_defense if info.field_name == "defenses" else build_attack
        for i, spec in enumerate(specs):
            _construct(build, spec, f"{info.field_name}.{i}")
        return specs

    @model_validator(mode="after")
    def _consistent(self):
        shares_bn = self.threat_model().bn_stats_shared
        if self.threat.bn_stats_shared is not None and self.threat.bn_stats_shared != shares_bn:
            raise ValueError(f"threat.bn_stats_shared={self.threat.bn_stats_shared} but the defense pipeline "
                             f"{'does' if shares_bn else 'does not'} contain share_bn_stats")
        if self.attack.clients_per_round > self.federation.clients_per_round:
            raise ValueError(f"attack.clients_per_round ({self.attack.clients_per_round}) exceeds "
                             f"federation.clients_per_round ({self.federation.clients_per_round})")
        late = [r for r in self.attack.rounds or [] if r > self.federation.rounds]
        if late:
            raise ValueError(f"attack.rounds: round {late[0]} is past federation.rounds ({self.federation.rounds})")
        if self.threat.labels == "known" and self.threat.secure_aggregation:
            raise ValueError("threat.labels=known with threat.secure_aggregation=true: under secure aggregation "
                             "the server sees only the round's sum, not a client's label list")
        if self.threat.secure_aggregation and self.threat_model().bn_stats_shared:
            raise ValueError("share_bn_stats with threat.secure_aggregation=true: per-client batch statistics would "
                             "reach the server beside the aggregate")
        cfg = self.client
        if cfg.shuffle and cfg.mode == "fedavg" and self.threat.hyperparameters_known:
            raise ValueError("client.shuffle=true makes the clients' sample order unknowable to the server, but "
                             "threat.hyperparameters_known=true replays it step by step; set "
                             "threat.hyperparameters_known=false (attack the update as one gradient) or "
                             "client.shuffle=false")
        if self.threat.public_data and is_same_data(self.threat.public_data, self.data.dataset, "train", self.data.path):
            raise ValueError(f"threat.public_data={self.threat.public_data!r} is the clients' own data set; the "
                             f"attacker's public data must be another (e.g. {self.data.dataset}:test)")
        if cfg.mode == "fedsgd" and cfg.num_samples not in (None, cfg.batch_size):
            raise ValueError("client.num_samples must equal client.batch_size in fedsgd mode")
        self._resolve_privacy()
        return self

    def _resolve_privacy(self) -> None:
        """A DP defense given a target ``epsilon`` gets the noise multiplier that reaches it after the configured
        rounds at privacy.delta and the federation's sampling rate (written into its spec, so clients use it)."""
        from .privacy import noise_for_epsilon

        train = self.client.train_config()
        for spec in self.defenses:
            if spec.get("epsilon") is None or spec.get("noise_multiplier") is not None:
                continue
            probe = build_defense({**spec, "noise_multiplier": 1.0}).mechanism(self.federation.sample_rate, train)
            if probe is None:
                continue
            spec["noise_multiplier"] = noise_for_epsilon(float(spec["epsilon"]), probe.sample_rate,
                                                         self.federation.rounds, self.privacy.delta,
                                                         probe.steps_per_round)

    def privacy_mechanisms(self):
        """The DP mechanisms of the defense pipeline, for the server's accountant."""
        train = self.client.train_config()
        found = (d.mechanism(self.federation.sample_rate, train) for d in self.build_defenses())
        return [m for m in found if m is not None]

    # Derived views -------------------------------------------------------------------------------------------
    def threat_model(self) -> ThreatModel:
        t = self.threat
        return build_threat(self.build_defenses(), labels=t.labels, label_method=t.label_method,
                            hyperparameters_known=t.hyperparameters_known, secure_aggregation=t.secure_aggregation,
                            public_data=t.public_data)

    def build_defenses(self):
        return [build_defense(spec) for spec in self.defenses]

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _construct(factory, spec, where: str):
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a table with a name")
    try:
        factory(spec)
    except SpecError as err:
        raise ValueError(f"{where}.{err.key}: {err.problem}") from None


# ------------------------------------------------------------------------------------------------------------
# Loading and overrides


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for key, msg in validation_problems(err, RunConfig):
        key = key or "config"
        parts.append(msg if msg.startswith(f"{key}.") else f"{key}: {msg}")
    return "invalid config: " + "; ".join(parts)


def parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict, assignment: str) -> None:
    """``--set key=value``: the value is read as TOML (a string if it is not valid TOML)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    key, value = assignment.split("=", 1)
    set_key(raw, key.strip(), parse_value(value.strip()), where="--set")


def set_key(raw: dict, key: str, value: Any, where: str = "--set") -> None:
    """Set a dotted key (``attacks.0.iterations``: list items by index) in a raw config, creating tables."""
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{where} {key}: no list item {part!r}")
            node = node[int(part)]
        else:
            node = node.setdefault(part, [] if nxt.isdigit() else {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{where} {key}: {part!r} is a value, not a table")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"{where} {key}: no list item {last!r}")
        node[int(last)] = value
    else:
        node[last] = value


def read_toml(path: str | Path, kind: str = "config") -> dict:
    """A TOML file as a dict; a missing file or bad TOML is one ConfigError line naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{kind} file not found: {p}")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{p}: not valid TOML: {err}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    raw: dict = read_toml(path) if path is not None else {}
    for assignment in overrides or []:
        apply_override(raw, assignment)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


# Keys a resumed run may change: they do not change what was computed (where and how fast it runs, or more rounds).
RESUMABLE = ("federation.rounds", "ray.", "attack.executor", "attack.workers", "attack.threads",
             "attack.gpus_per_worker", "device")


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def resume_conflict(stored: dict, current: dict) -> str | None:
    """The first key (dotted) in which a run's stored config and the config it is resumed with differ in a way
    that would change its results, as ``"key: stored -> current"``; None if they agree."""
    old, new = _flat(json.loads(json.dumps(stored, default=str))), _flat(json.loads(json.dumps(current, default=str)))
    for key in sorted(set(old) | set(new)):
        if key.startswith(RESUMABLE) or old.get(key) == new.get(key):
            continue
        return f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
    return None
