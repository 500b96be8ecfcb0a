"""Client-side local training: FedSGD (one gradient step on one batch) and FedAvg (local epochs of plain SGD).

The step schedule is explicit (:func:`step_schedule`) because the attacker's simulation of the client must follow
the same arithmetic: plain SGD on the mean cross-entropy, batches taken in order unless the client shuffles.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class TrainConfig:
    """What the server tells a client to do in a round (this is also what the attacker may know)."""

    mode: Literal["fedsgd", "fedavg"] = "fedsgd"
    lr: float = 0.1
    epochs: int = 1
    batch_size: int = 1
    num_samples: int = 1
    shuffle: bool = False
    # "train": BatchNorm normalises with batch statistics (a real client in train mode); "eval": with the running
    # statistics, which stay fixed (Geiping et al.'s reference code simulated clients this way).
    bn_mode: Literal["train", "eval"] = "train"

    def to_record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> "TrainConfig":
        """The config from a record with every field and no other key (Flower's ``server-round`` aside): a silently
        defaulted field would make a client and the attacker's simulation of it train differently."""
        fields = cls.__dataclass_fields__
        unknown = sorted(set(record) - set(fields) - {"server-round"})
        missing = sorted(set(fields) - set(record))
        if unknown or missing:
            raise ValueError(f"train config: {'unknown key ' + repr(unknown[0]) if unknown else ''}"
                             f"{'; ' if unknown and missing else ''}"
                             f"{'missing key ' + repr(missing[0]) if missing else ''}")
        return cls(**{k: record[k] for k in fields})


def step_schedule(cfg: TrainConfig, rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Positions (into the round's local samples) used at each local SGD step, in order."""
    if cfg.mode == "fedsgd":
        return [np.arange(cfg.num_samples)]
    steps = []
    for _ in range(cfg.epochs):
        order = rng.permutation(cfg.num_samples) if (cfg.shuffle and rng is not None) else np.arange(cfg.num_samples)
        steps += [order[i:i + cfg.batch_size] for i in range(0, cfg.num_samples, cfg.batch_size)]
    return steps


@dataclass
class LocalResult:
    """The client's new state and what it observed while training (the first step's BN batch statistics)."""

    state: dict[str, torch.Tensor]
    loss: float
    bn_stats: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _capture_bn_stats(model: nn.Module, store: dict) -> list:
    """Record each BatchNorm layer's batch mean and (biased) variance the first time it runs."""
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            def hook(mod, inputs, name=name):
                if name not in store:
                    x = inputs[0].detach()
                    dims = [d for d in range(x.dim()) if d != 1]
                    store[name] = (x.mean(dims), x.var(dims, unbiased=False))
            handles.append(module.register_forward_pre_hook(hook))
    return handles


def local_train(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, cfg: TrainConfig,
                schedule: list[np.ndarray], defenses: tuple = (), generator: torch.Generator | None = None,
                num_classes: int | None = None) -> LocalResult:
    """Plain SGD in train mode (BatchNorm as ``cfg.bn_mode``) over ``schedule``; returns the new state dict.
    ``defenses`` with training-time hooks (DP-SGD, batch mixing) change the steps, drawing from ``generator``."""
    set_bn_mode(model, cfg.bn_mode)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    forward: nn.Module = model
    optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    cleanups = []
    loss_fn = nn.CrossEntropyLoss()  # takes class indices or, after batch mixing, class probabilities
    bn_stats: dict = {}
    handles = _capture_bn_stats(model, bn_stats)
    losses = []
    try:
        for defense in defenses:
            forward, optimizer, cleanup = defense.wrap_training(forward, optimizer, cfg, generator)
            if cleanup is not None:
                cleanups.append(cleanup)
        for positions in schedule:
            idx = torch.from_numpy(np.asarray(positions, dtype=np.int64))
            x, y = inputs[idx], labels[idx]
            for defense in defenses:
                x, y = defense.mix_batch(x, y, num_classes or int(labels.max()) + 1, generator)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(forward(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        for h in handles:
            h.remove()
        for cleanup in reversed(cleanups):
            cleanup()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return LocalResult(state=state, loss=float(np.mean(losses)), bn_stats=bn_stats)


def set_bn_mode(model: nn.Module, bn_mode: str) -> None:
    """Train mode, with BatchNorm layers in ``bn_mode`` (see TrainConfig.bn_mode)."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train(bn_mode == "train")


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The arrays that travel between server and clients: parameters and float buffers (BN running stats).

    Integer buffers (``num_batches_tracked``) stay local: averaging counters is meaningless."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


def load_public_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load the arrays that travel (:func:`float_state`) strictly: every float entry of the model must be there
    with its shape and nothing else may be (integer counters stay local). A silent partial load would leave the
    seeded initial weights in place and publish convincing wrong numbers."""
    expected = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the public model does not fit {type(model).__name__}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"the public model does not fit {type(model).__name__}: {k} has shape "
                             f"{tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    model.load_state_dict(state, strict=False)  # only integer counters are left out, checked above


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> tuple[float, float]:
    """(accuracy, mean loss) of ``model`` in eval mode."""
    model.eval()
    correct, total_loss = 0, 0.0
    for i in range(0, len(inputs), batch_size):
        out = model(inputs[i:i + batch_size])
        total_loss += nn.functional.cross_entropy(out, labels[i:i + batch_size], reduction="sum").item()
        correct += (out.argmax(1) == labels[i:i + batch_size]).sum().item()
    n = max(len(inputs), 1)
    return correct / n, total_loss / n
