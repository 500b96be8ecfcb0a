"""Central training of victim models, so attacks can be measured on trained as well as untrained networks."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .data import ImageData
from .models import build_model
from .training import evaluate_accuracy


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and 4-pixel padded crops (the standard CIFAR recipe)."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    padded = nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    dx, dy = torch.randint(0, 9, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + h, dx:dx + w]


def train_centrally(model_name: str, train: ImageData, test: ImageData | None, *, epochs: int, batch_size: int,
                    lr: float, width: int = 64, seed: int = 0, output: Path | None = None,
                    log: Callable[[str], None] = print, activation: str = "default") -> dict:
    if train.labels is None:
        raise ValueError(f"--dataset {train.name} has no labels")
    torch.manual_seed(seed)
    model = build_model(model_name, train.num_classes, image_size=train.shape[1], width=width, seed=seed,
                        activation=activation)
    inputs = train.model_input(np.arange(len(train)))
    labels = train.label_tensor(np.arange(len(train)))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * -(-len(train) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        total = 0.0
        for i in range(0, len(train), batch_size):
            idx = order[i:i + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(_augment(inputs[idx], generator)), labels[idx])
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        log(f"epoch {epoch + 1}/{epochs}: train loss {total / len(train):.4f}")
    train_acc, _ = evaluate_accuracy(model, inputs, labels)
    test_acc = float("nan")
    if test is not None and test.labels is not None:
        idx = np.arange(len(test))
        test_acc, _ = evaluate_accuracy(model, test.model_input(idx), test.label_tensor(idx))
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, output)
    return {"train_accuracy": train_acc, "test_accuracy": test_acc}
