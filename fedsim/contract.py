"""The contract between the platform, the server strategies and attacker plugins.

``ObservedUpdate`` is the whole of what an honest-but-curious server sees of one client in one round; nothing else
reaches an attack, and :class:`ServerView` is the one function that builds it, for the federation's tee and for the
single-update path alike. Ground truth (the audit record of sample ids) travels separately, to the evaluator only.
Attacks are classes registered by name in :data:`ATTACKS`; an outside package (fedsim's own ``attacker`` package is
one) fills the registry through the ``fedsim.attacks`` entry-point group, so the platform never imports it.
Arrays are numpy so records pickle cheaply to Ray workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np

from .params import Registered
from .registry import PluginRegistry, build_from_spec


@dataclass(frozen=True)
class ModelSpec:
    """The public architecture (the server built it, so it knows it); :func:`fedsim.models.build_from_spec` is the
    one place a model is built from it.

    ``name`` is a registered victim (``convnet``) or the import path of a user's ``nn.Module`` class or factory
    (``"myapp.task:Net"``, called with ``args``: an audited Flower app's own model).
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    width: int = 64
    activation: str = "default"  # "sigmoid": the victim's ReLUs are Sigmoids (fedsim.models.use_sigmoid)
    args: tuple[tuple[str, object], ...] = ()  # keyword arguments of an imported model factory


@dataclass(frozen=True)
class ThreatModel:
    """Explicit switches for what the attacker knows and may spend.

    labels: ``known`` (clients share their label list) or ``recovered`` (from the update, by ``label_method``).
    bn_stats_shared: clients send BatchNorm batch statistics of their first local step.
    hyperparameters_known: the attacker simulates the client's exact local steps (lr, epochs, batch size);
        otherwise it treats the update as a single gradient of all ``num-examples`` samples.
    secure_aggregation: the server sees only the sum of the round's updates, attacked as one update.
    public_data: the attacker's own auxiliary images (``cifar10:test`` or a path), never the clients': what a
        self-tuning attack computes its surrogate updates from (None: the attacker holds no data).
    """

    labels: Literal["known", "recovered"] = "recovered"
    label_method: str = "auto"
    bn_stats_shared: bool = False
    hyperparameters_known: bool = True
    secure_aggregation: bool = False
    public_data: str | None = None

    def visible(self, shared: dict) -> dict:
        """The part of a client's shared extras this threat model lets the server use."""
        allowed = {}
        if self.labels == "known" and "labels" in shared:
            allowed["labels"] = shared["labels"]
        if self.bn_stats_shared and "bn_stats" in shared:
            allowed["bn_stats"] = shared["bn_stats"]
        return allowed


@dataclass(frozen=True)
class ObservedUpdate:
    round: int
    client_id: int  # the stable partition id; -1 for a securely aggregated sum
    model: ModelSpec
    normalization: tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) the clients feed the model with
    global_state: dict[str, np.ndarray]  # the public model sent this round (parameters and float buffers)
    update: dict[str, np.ndarray]  # what the client sent minus global_state
    train_config: dict  # the training config the server sent
    num_examples: int  # reported by the client (FedAvg weighting)
    shared: dict = field(default_factory=dict)  # what the threat model says clients share
    defenses: tuple[str, ...] = ()  # the publicly announced defense pipeline


@dataclass(frozen=True)
class AuditRecord:
    """Which samples a client used, in step order. Only the evaluator may read it.

    fedsim's own clients name samples of the run's dataset by id (the evaluator fetches them). A client of an
    audited Flower app records the batches themselves (``fedsim.audit.record_batch``): then ``images`` (in [0, 1])
    and ``labels`` hold its distinct samples and the ids index them. No ids at all: nothing was recorded.
    """

    round: int
    client_id: int
    sample_ids: tuple[int, ...]  # the round's local samples
    step_ids: tuple[int, ...] = ()  # sample ids in the order the local steps consumed them
    images: np.ndarray | None = field(default=None, compare=False)  # recorded samples (N, C, H, W) in [0, 1]
    labels: np.ndarray | None = field(default=None, compare=False)

    @property
    def recorded(self) -> bool:
        return bool(self.sample_ids)


@dataclass(frozen=True)
class ReplyView:
    """A client's train reply as the server decodes it from Flower records (see fedsim.protocol)."""

    client_id: int
    arrays: dict[str, np.ndarray]  # the client's new weights (after its defenses)
    num_examples: int
    shared: dict  # every extra the client sent (filtered by the threat model before an attack sees it)


@dataclass(frozen=True)
class ServerView:
    """What the server knows besides the replies: the public architecture and input normalisation, the threat model
    and the announced defenses. :meth:`observe` is the one place an ``ObservedUpdate`` is made."""

    model: ModelSpec
    normalization: tuple[tuple[float, ...], tuple[float, ...]]
    threat: ThreatModel
    defenses: tuple[str, ...] = ()

    def observe(self, server_round: int, global_state: dict[str, np.ndarray], train_config: dict,
                reply: ReplyView) -> ObservedUpdate:
        update = {k: np.asarray(reply.arrays[k], dtype=np.float32) - np.asarray(v, dtype=np.float32)
                  for k, v in global_state.items()}
        return ObservedUpdate(round=server_round, client_id=reply.client_id, model=self.model,
                              normalization=self.normalization, global_state=global_state, update=update,
                              train_config={k: v for k, v in train_config.items() if k != "server-round"},
                              num_examples=reply.num_examples, shared=self.threat.visible(reply.shared),
                              defenses=self.defenses)


@dataclass
class Reconstruction:
    """What an attack returns: images in [0, 1] (B, C, H, W) and labels, plus how it got there."""

    attack: str
    images: np.ndarray
    labels: np.ndarray
    label_method: str
    loss: float  # matching loss of the chosen restart
    seconds: float
    iterations: int
    restarts: int
    trace: list[tuple[int, float]] = field(default_factory=list)  # (iteration, best matching loss so far)
    # label_candidates: {method: labels} every label method's answer (each scored in the row as
    # label_acc_<method>); update_l2 and the other update-fit numbers; anything else the attack keeps
    extra: dict = field(default_factory=dict)
    # numbers this attack reports per update, each its own column of the row (e.g. a learnt prior's round)
    columns: dict[str, float] = field(default_factory=dict)


@dataclass
class LeakageRecord:
    """One results row: how much one attack recovered of one client's data in one round."""

    round: int
    client_id: int
    attack: str
    defenses: str
    batch_size: int
    psnr_mean: float = float("nan")
    psnr_best: float = float("nan")
    ssim_mean: float = float("nan")
    ssim_best: float = float("nan")
    lpips_mean: float = float("nan")
    lpips_best: float = float("nan")
    label_accuracy: float = float("nan")
    label_method: str = ""
    matching_loss: float = float("nan")
    attack_seconds: float = float("nan")
    update_l2: float = float("nan")  # fit of the reconstruction's simulated update to the observed one
    update_sign_agreement: float = float("nan")
    update_cosine_distance: float = float("nan")
    iterations: int = 0
    restarts: int = 0
    status: str = "ok"  # ok | error | no ground truth (scored only by update fit: nothing was recorded)
    error: str = ""
    # columns the attack adds: label_acc_<method> for each label method it tried (scored on the same update,
    # whether labels were known or not) and its own numbers (Reconstruction.columns)
    reported: dict[str, float] = field(default_factory=dict)

    def to_row(self) -> dict:
        """The row as stored: the fixed columns, then the reported ones."""
        row = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "reported"}
        return {**row, **self.reported}


# ------------------------------------------------------------------------------------------------------------
# Attacks and label methods: registries filled by plugins

ATTACKS = PluginRegistry("fedsim.attacks", "attack")
# Label recovery methods by name (``threat.label_method``): callables of the attacker plugin, registered through
# the ``fedsim.label_methods`` group; the platform only validates names against it.
LABEL_METHODS = PluginRegistry("fedsim.label_methods", "label method")

StateScope = Literal["none", "client", "global"]


class Attack(Registered):
    """An attack: a pydantic model of its parameters (a config table validates by constructing it) that turns
    observed updates into reconstructions. Subclasses with a ``name`` register themselves in :data:`ATTACKS`.

    State: an attack that learns across rounds sets ``state_scope`` to ``"global"`` (one state for the whole
    federation, e.g. a GIML prior: one worker owns it) or ``"client"`` (a per-client history: workers may shard it by
    client id), keeps its state in private attributes and implements :meth:`state_dict` / :meth:`load_state_dict`
    (tensors and plain Python values, loadable with ``weights_only=True``). The pool calls :meth:`end_round` after a
    round's updates were attacked, then saves the state, and restores it on resume or when a worker restarts.
    """

    registry: ClassVar[dict[str, type]] = ATTACKS
    state_scope: ClassVar[StateScope] = "none"

    @property
    def kept_scope(self) -> StateScope:
        """The state this instance keeps: the class's ``state_scope``, unless its settings make it keep some (a
        self-tuning attack keeps its tuned settings: ``"global"``)."""
        return self.state_scope

    def reconstruct_many(self, observed: list[ObservedUpdate], threat: ThreatModel, *, device: str = "cpu",
                         seed: int = 0) -> list[Reconstruction]:
        raise NotImplementedError

    def reconstruct(self, observed: ObservedUpdate, threat: ThreatModel, **kwargs) -> Reconstruction:
        return self.reconstruct_many([observed], threat, **kwargs)[0]

    def check(self, model: ModelSpec) -> None:
        """Raise ValueError (one line) if this attack cannot run on ``model``: called before any work starts."""

    def check_threat(self, threat: ThreatModel) -> None:
        """Raise ValueError (one line) if this attack's settings need what ``threat`` does not give (e.g. shared
        BatchNorm statistics): called before any work starts."""

    def end_round(self, server_round: int, *, device: str = "cpu", seed: int = 0, folder: Path | None = None) -> None:
        """Called after the round's updates were attacked (e.g. meta-steps of a learnt prior); ``folder`` is where
        the pool keeps this attack's state, for artefacts such as sample grids (None when nothing is kept)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"attack {self.name} keeps no state but was given {sorted(state)}")


def build_attack(spec: dict) -> Attack:
    """Construct an attack from ``{"name": ..., **params}``; raises ValueError naming the bad key."""
    return build_from_spec(ATTACKS, spec, "attack")


def check_attacks(specs, model: ModelSpec, threat: ThreatModel) -> None:
    """Every attack spec builds and fits the victim and the threat model, or one ValueError ``attacks.<i>: ...``
    (before any work starts)."""
    for i, spec in enumerate(specs):
        try:
            built = build_attack(spec)
            built.check(model)
            built.check_threat(threat)
        except ValueError as err:
            raise ValueError(f"attacks.{i}: {err}") from None
