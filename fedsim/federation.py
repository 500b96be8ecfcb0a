"""A simulated federation, resolved before Flower starts: where the data comes from (:class:`DataPlan`, picklable
for client processes), the partitions and held-out set, the public model, and the attacker side of the run
(:func:`audit_plan`), all checked before Ray starts (:func:`prepare`).

The rest of a run lives beside it: :mod:`fedsim.clientapp` (the ClientApp), :mod:`fedsim.serverapp` (the ServerApp's
main: strategies and rounds) and :mod:`fedsim.driver` (``fedsim run``: run directory, Ray, progress,
``run_simulation``); ``flwr run .`` builds the same apps from Flower's run config (:mod:`fedsim.flower_app`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch


from .audit import AuditPlan, PoolSettings
from .checks import check_device, check_resources
from .config import RunConfig
from .contract import ModelSpec, ServerView, check_attacks
from .data import DataError, ImageData, load_dataset, partition_indices
from .models import build_model
from .seeds import attacker_root

log = logging.getLogger("fedsim")
QUERY_PARTITION = "partition"
LOCAL = "fedsim.local-state"  # a client's own values of the layers its defenses keep local, in its node state


# ------------------------------------------------------------------------------------------------------------
# Data: the same sources in the driver and in every client process


@dataclass(frozen=True)
class DataPlan:
    """Where training and held-out images come from; picklable, so client actors can rebuild the same data."""

    dataset: str
    path: str | None
    test_path: str | None
    image_size: int
    test_fraction: float
    seed: int
    data_dir: str | None  # FEDSIM_DATA_DIR as seen by the driver
    annotations: str | None = None  # ffhq labels
    attribute: str = "gender"

    def train_source(self) -> ImageData:
        return _load(self.dataset, "train", self.path, self.image_size, self.data_dir, self.annotations,
                     self.attribute)

    def test_source(self) -> ImageData | None:
        """A separate held-out split if the source has one, else None (then a fraction is split off)."""
        if self.test_path:
            if not Path(self.test_path).exists():
                raise DataError(f"data.test_path={self.test_path}: no such file or folder")
            return _load(self.test_path, "test", None, self.image_size, self.data_dir)
        if self.dataset in ("cifar10", "cifar100"):
            return _load(self.dataset, "test", self.path, self.image_size, self.data_dir)
        return None

    def split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(train, held-out) indices when one source serves both."""
        perm = np.random.default_rng([self.seed, 3]).permutation(n)
        cut = int(round(n * self.test_fraction))
        return np.sort(perm[cut:]), np.sort(perm[:cut])


@lru_cache(maxsize=4)
def _load(dataset: str, split: str, path: str | None, image_size: int, data_dir: str | None,
          annotations: str | None = None, attribute: str = "gender") -> ImageData:
    if data_dir and not os.environ.get("FEDSIM_DATA_DIR"):
        os.environ["FEDSIM_DATA_DIR"] = data_dir
    return load_dataset(dataset, split, path=path, image_size=image_size, annotations=annotations,
                        attribute=attribute)


@dataclass
class Federation:
    """Everything resolved before Flower starts."""

    cfg: RunConfig
    plan: DataPlan
    train: ImageData
    partitions: list[np.ndarray]  # indices into ``train`` per partition id
    test_inputs: torch.Tensor
    test_labels: torch.Tensor
    spec: ModelSpec
    audit: AuditPlan  # the attacker side of the run, built once here


def prepare(cfg: RunConfig, *, checks: bool = True) -> Federation:
    """Resolve data, partitions and the held-out set; with ``checks``, also everything that would otherwise fail
    after Ray has started (checkpoint, device, resources, attack/threat fit). Client processes skip the checks."""
    d = cfg.data
    def absolute(p: str | None) -> str | None:  # client actors may run in another working directory
        return os.path.abspath(os.path.expanduser(p)) if p else None

    dataset = absolute(d.dataset) if Path(d.dataset).expanduser().exists() else d.dataset
    plan = DataPlan(dataset, absolute(d.path), absolute(d.test_path), d.image_size, d.test_fraction, cfg.seed,
                    absolute(os.environ.get("FEDSIM_DATA_DIR")), absolute(d.annotations), d.attribute)
    train = plan.train_source()
    if train.labels is None:
        raise ValueError(f"data.dataset: {train.name} has no labels; victims are classifiers")
    test = plan.test_source()
    if test is None:
        train_idx, test_idx = plan.split(len(train))
        test, pool = train.subset(test_idx), train_idx
    else:
        pool = np.arange(len(train))
    parts = partition_indices(train.labels[pool], cfg.federation.num_clients, d.partition, alpha=d.alpha,
                              seed=cfg.seed, min_partition_size=cfg.client.train_config().num_samples)
    partitions = [pool[p] for p in parts]
    need = cfg.client.train_config().num_samples
    small = [i for i, p in enumerate(partitions) if len(p) < need]
    if small:
        raise ValueError(f"client.num_samples={need} exceeds the partition size of clients {small[:5]}")
    n_test = len(test) if d.test_samples == 0 else min(d.test_samples, len(test))
    idx = np.arange(n_test)
    spec = ModelSpec(cfg.model.name, train.num_classes, train.shape, cfg.model.width, cfg.model.activation)
    fed = Federation(cfg, plan, train, partitions, test.model_input(idx), test.label_tensor(idx), spec,
                     audit_plan(cfg, spec, (train.mean, train.std)))
    if checks:
        _check_before_start(fed)
    return fed


def audit_plan(cfg: RunConfig, spec: ModelSpec, normalization) -> AuditPlan:
    """The attacker side of a configured federation: the server's view, the attacks and where they run."""
    a = cfg.attack
    view = ServerView(spec, normalization, cfg.threat_model(), tuple(d.tag() for d in cfg.build_defenses()))
    pool = PoolSettings(a.executor, a.workers, a.threads, cfg.device, attacker_gpus(cfg) if cfg.attacks else 0.0,
                        dict(a.resources), a.timeout)
    return AuditPlan(view, tuple(cfg.attacks), attacker_root(cfg.seed, a.seed), a.clients_per_round,
                     None if a.rounds is None else frozenset(a.rounds), cfg.seed, pool)


def _check_before_start(fed: Federation) -> None:
    cfg, spec = fed.cfg, fed.spec
    # the victim as the server builds it, so a missing, corrupt or mismatched checkpoint fails now, not after Ray
    victim = build_model(cfg.model.name, spec.num_classes, image_size=spec.image_shape[1], width=cfg.model.width,
                         seed=cfg.seed, checkpoint=cfg.model.checkpoint, activation=cfg.model.activation)
    for i, defense in enumerate(cfg.build_defenses()):
        try:
            defense.check(victim)
        except ValueError as err:
            raise ValueError(f"defenses.{i}: {err}") from None
    if not cfg.ray.address:  # on a cluster the GPUs are the cluster's: checked once Ray is up (check_cluster)
        check_device(cfg.device)
        check_resources(cpus=cfg.ray.num_cpus or os.cpu_count() or 1,
                        gpus=torch.cuda.device_count() if torch.cuda.is_available() else 0,
                        client_cpus=cfg.ray.client_cpus, client_gpus=cfg.ray.client_gpus,
                        attacker_gpus=attacker_gpus(cfg) if cfg.attacks else 0.0,
                        attacker_resources=cfg.attack.resources if cfg.attacks else None)
    check_attacks(cfg.attacks, spec, fed.audit.view.threat)




def attacker_gpus(cfg: RunConfig) -> float:
    """GPUs each attacker worker requests: ``attack.gpus_per_worker``, else a share of one GPU on cuda."""
    if cfg.attack.gpus_per_worker is not None:
        return cfg.attack.gpus_per_worker
    return 1.0 / cfg.attack.workers if cfg.device.startswith("cuda") else 0.0


