"""The model, the data and the training loop of the app (a usual Flower PyTorch layout)."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedsim.audit import record_batch

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


class Net(nn.Module):
    """A small CNN for 32x32 RGB images: two conv-ReLU-max-pool blocks and two linear layers."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 5 * 5, 128), nn.ReLU(),
                                        nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _local_file(data_dir: str, name: str) -> Path | None:
    folder = data_dir or os.environ.get("FEDSIM_DATA_DIR", "")
    path = Path(folder).expanduser() / name if folder else None
    return path if path is not None and path.is_file() else None


def _to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """HWC uint8 -> normalised CHW float (torchvision's ToTensor + Normalize(0.5, 0.5))."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std, torch.from_numpy(np.asarray(labels, dtype=np.int64))


@lru_cache(maxsize=4)
def _partitioner(num_partitions: int, data_dir: str):
    """flwr-datasets' IID partitioner over CIFAR-10: the local copy if there is one, else the Hugging Face set."""
    from flwr_datasets.partitioner import IidPartitioner

    partitioner = IidPartitioner(num_partitions=num_partitions)
    local = _local_file(data_dir, "cifar10_train_0-3999.npz")
    if local is None:
        from flwr_datasets import FederatedDataset

        return FederatedDataset(dataset="uoft-cs/cifar10", partitioners={"train": partitioner})
    from datasets import Array3D, ClassLabel, Dataset, Features

    with np.load(local) as data:
        images, labels = data["images"], data["labels"]
    features = Features({"img": Array3D(shape=images.shape[1:], dtype="uint8"), "label": ClassLabel(num_classes=10)})
    partitioner.dataset = Dataset.from_dict({"img": images, "label": labels}, features=features)
    return partitioner


def load_data(partition_id: int, num_partitions: int, data_dir: str = "",
              max_examples: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """This client's training images (normalised) and labels."""
    partition = _partitioner(num_partitions, data_dir).load_partition(partition_id).with_format("numpy")
    images, labels = np.asarray(partition["img"]), np.asarray(partition["label"])
    if max_examples:
        images, labels = images[:max_examples], labels[:max_examples]
    return _to_tensors(images, labels)


def load_test_data(data_dir: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    local = _local_file(data_dir, "cifar10_test_0-199.npz")
    if local is not None:
        with np.load(local) as data:
            return _to_tensors(data["images"], data["labels"])
    from datasets import load_dataset

    test = load_dataset("uoft-cs/cifar10", split="test").with_format("numpy")
    return _to_tensors(np.asarray(test["img"]), np.asarray(test["label"]))


def train(net: Net, images: torch.Tensor, labels: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
          seed: int) -> float:
    """Local SGD on shuffled mini-batches; returns the mean training loss."""
    loader = DataLoader(list(zip(images, labels)), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    net.train()
    losses = []
    for _ in range(epochs):
        for x, y in loader:
            record_batch(x, y)  # fedsim's audit: the batch as it goes into the model (a no-op when unaudited)
            optimizer.zero_grad()
            loss = criterion(net(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return float(np.mean(losses))


@torch.no_grad()
def test(net: Net, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(loss, accuracy) on a held-out set."""
    net.eval()
    out = net(images)
    return nn.functional.cross_entropy(out, labels).item(), (out.argmax(1) == labels).float().mean().item()
