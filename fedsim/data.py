"""Image data sets held in memory as uint8 HWC arrays, their resolution on disk, and client partitions.

Sources, tried in order for a named data set: an explicit path, the folder in ``FEDSIM_DATA_DIR``, then
torchvision's download. Every source yields the same :class:`ImageData`, so fixtures and full data sets go through
one loader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

DATA_DIR_ENV = "FEDSIM_DATA_DIR"

# Per-channel statistics used to normalise model inputs (the values the IG/DLG code uses).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914672374725342, 0.4822617471218109, 0.4467701315879822),
                (0.24703224003314972, 0.2434851378202438, 0.26158784329891205)),
    "cifar100": ((0.5071598291397095, 0.4866936206817627, 0.44120192527770996),
                 (0.2673342823982239, 0.2564384639263153, 0.2761504650115967)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}


class DataError(ValueError):
    """A data set could not be found or read; the message says what was tried."""


@dataclass
class ImageData:
    """Images (N, H, W, C uint8), integer labels (or None), and how to normalise them for a model."""

    images: np.ndarray
    labels: np.ndarray | None
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""
    source: str = ""
    extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise DataError(f"{self.name}: images must be uint8 of shape (N, H, W, C), got {self.images.dtype} "
                            f"{self.images.shape}")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise DataError(f"{self.name}: {len(self.labels)} labels for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one model input."""
        _, h, w, c = self.images.shape
        return (c, h, w)

    def subset(self, indices: np.ndarray | list[int]) -> "ImageData":
        idx = np.asarray(indices, dtype=np.int64)
        return ImageData(self.images[idx], None if self.labels is None else self.labels[idx], self.num_classes,
                         self.mean, self.std, self.name, self.source)

    def resized(self, size: int) -> "ImageData":
        """The same images at ``size`` x ``size`` (centre square crop, bicubic), e.g. 64x64 ImageNet for a 32x32
        prior."""
        from PIL import Image

        if self.shape[1:] == (size, size):
            return self
        images = np.stack([np.asarray(_square(Image.fromarray(img), size)) for img in self.images])
        return ImageData(images, self.labels, self.num_classes, self.mean, self.std, self.name, self.source,
                         self.extras)

    def unit_tensor(self, indices: np.ndarray | list[int]) -> torch.Tensor:
        """Images at ``indices`` as float (N, C, H, W) in [0, 1]."""
        batch = self.images[np.asarray(indices, dtype=np.int64)]
        return torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)

    def ground_truth(self, indices: list[int]) -> tuple[torch.Tensor, np.ndarray | None]:
        """Images in [0, 1] and labels at ``indices``: the evaluator's source (fedsim.evaluation.GroundTruth)."""
        return self.unit_tensor(indices), None if self.labels is None else self.labels[np.asarray(indices)]

    def model_input(self, indices: np.ndarray | list[int]) -> torch.Tensor:
        return normalize(self.unit_tensor(indices), self.mean, self.std)

    def label_tensor(self, indices: np.ndarray | list[int]) -> torch.Tensor:
        if self.labels is None:
            raise DataError(f"{self.name}: this data set has no labels")
        return torch.from_numpy(self.labels[np.asarray(indices, dtype=np.int64)].astype(np.int64))


def normalize(unit: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=unit.dtype, device=unit.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=unit.dtype, device=unit.device).view(1, -1, 1, 1)
    return (unit - m) / s


def denormalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    shape = [1] * (x.dim() - 3) + [-1, 1, 1]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(shape)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(shape)
    return x * s + m


# --------------------------------------------------------------------------------------------------------------
# Readers for the three on-disk formats


def read_npz(path: Path, name: str = "", num_classes: int | None = None) -> ImageData:
    """An ``npz`` with ``images`` (N, H, W, 3 uint8) and optional ``labels``."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive.files:
                raise DataError(f"{path}: npz has no 'images' array (has {archive.files})")
            images = archive["images"]
            labels = archive["labels"].astype(np.int64) if "labels" in archive.files else None
            extras = {k: archive[k] for k in archive.files if k not in ("images", "labels")}
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read npz file {path}: {err}") from None
    classes = num_classes or NUM_CLASSES.get(name) or (int(labels.max()) + 1 if labels is not None else 1)
    mean, std = NORMALIZATION.get(name) or _stats(images)
    return ImageData(images, labels, classes, mean, std, name or path.stem, str(path), extras)


def _read_square(path: Path, image_size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return np.asarray(_square(img.convert("RGB"), image_size))
    except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"cannot read image {path}: {type(err).__name__}") from None


def read_image_folder(root: Path, image_size: int, name: str = "") -> ImageData:
    """An ImageNet/FFHQ-style folder: class sub-folders (labels in sorted order) or a flat folder (no labels).

    Each image is centre-cropped to a square and resized to ``image_size`` (bicubic)."""
    suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    entries: list[tuple[Path, int | None]] = []
    if classes:
        for label, cls in enumerate(classes):
            entries += [(p, label) for p in sorted((root / cls).rglob("*")) if p.suffix.lower() in suffixes]
    else:
        entries = [(p, None) for p in sorted(root.iterdir()) if p.suffix.lower() in suffixes]
    if not entries:
        raise DataError(f"image folder {root} holds no images ({', '.join(sorted(suffixes))})")
    images = np.empty((len(entries), image_size, image_size, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(entries):
        images[i] = _read_square(path, image_size)
    labels = np.array([lbl for _, lbl in entries], dtype=np.int64) if classes else None
    mean, std = NORMALIZATION["imagenet"]
    return ImageData(images, labels, max(len(classes), 1), mean, std, name or root.name, str(root))


def read_ffhq(root: Path, annotations: Path, attribute: str = "gender", image_size: int = 64) -> ImageData:
    """FFHQ faces (``<ffhq id>.png`` anywhere below ``root``) labelled by an attribute of the ffhq-features-dataset
    annotations (``annotations/<ffhq id>.json``, ``[0].faceAttributes.<attribute>``, e.g. gender or glasses).
    Classes are the attribute's values in sorted order (gender: female 0, male 1). A face without an annotation
    (no file, or no face found in it) is reported and skipped, never guessed."""
    import json
    import logging

    root, annotations = Path(root), Path(annotations)
    if not root.is_dir():
        raise DataError(f"ffhq image folder not found: {root}")
    if not annotations.is_dir():
        raise DataError(f"ffhq annotation folder not found: {annotations}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})
    if not files:
        raise DataError(f"ffhq image folder {root} holds no images")
    kept, values, skipped = [], [], []
    for path in files:
        note = annotations / f"{path.stem}.json"
        try:
            faces = json.loads(note.read_text()) if note.is_file() else []
            value = faces[0]["faceAttributes"][attribute] if faces else None
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise DataError(f"{note}: no faceAttributes.{attribute} ({type(err).__name__}: {err})") from None
        if value is None:
            skipped.append(path.stem)
            continue
        if not isinstance(value, str):
            raise DataError(f"ffhq attribute {attribute!r} is numeric ({value!r} in {note}); use a categorical one "
                            "such as gender or glasses")
        kept.append(path)
        values.append(value)
    if skipped:
        logging.getLogger("fedsim").warning("ffhq: %d faces without an annotation skipped: %s", len(skipped),
                                            ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    if not kept:
        raise DataError(f"no face in {root} has an annotation in {annotations}")
    names = sorted(set(values))
    images = np.empty((len(kept), image_size, image_size, 3), dtype=np.uint8)
    for i, path in enumerate(kept):
        images[i] = _read_square(path, image_size)
    labels = np.array([names.index(v) for v in values], dtype=np.int64)
    mean, std = _stats(images)
    return ImageData(images, labels, len(names), mean, std, "ffhq", str(root),
                     {"ffhq_ids": np.array([p.stem for p in kept]), "class_names": np.array(names),
                      "skipped": np.array(skipped)})


def _square(img, size: int):
    """Centre square crop, bicubic resize (PIL image)."""
    from PIL import Image

    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def _stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    flat = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    std = np.maximum(flat.std(0), 1e-3)
    return tuple(float(v) for v in flat.mean(0)), tuple(float(v) for v in std)


def _read_torchvision_cifar(name: str, root: Path, train: bool, download: bool) -> ImageData:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    ds = cls(root=str(root), train=train, download=download)
    mean, std = NORMALIZATION[name]
    return ImageData(np.asarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64),
                     NUM_CLASSES[name], mean, std, name, f"{root} (torchvision)")


_TV_FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def _cifar_from_folder(name: str, folder: Path, split: str) -> ImageData | None:
    """A torchvision-format CIFAR folder, else an npz named ``<name>_<split>*.npz`` (the fixture format)."""
    if (folder / _TV_FOLDER[name]).is_dir():
        return _read_torchvision_cifar(name, folder, split == "train", download=False)
    matches = sorted(folder.glob(f"{name}_{split}*.npz"))
    if matches:
        return read_npz(matches[0], name=name)
    return None


def load_public_data(spec: str) -> ImageData:
    """The attacker's own auxiliary images (``threat.public_data``): a named set and split (``cifar10:test``) or a
    path to an ``.npz`` or an image folder. Never the clients' data (the run config refuses the clients' own set)."""
    name, _, split = spec.partition(":")
    if split and name in _TV_FOLDER:
        return load_dataset(name, split, path_key="threat.public_data")
    return load_dataset(spec, path_key="threat.public_data")


def is_same_data(public: str, dataset: str, split: str = "train", path: str | Path | None = None) -> bool:
    """Whether ``public`` (a ``threat.public_data`` spec) names the data set ``dataset`` / ``split`` / ``path``: the
    same named set and split (a bare name is its training split, as :func:`load_public_data` reads it) or the same
    file or folder."""
    name, _, public_split = public.partition(":")
    if name == dataset and not path:
        return (public_split or "train") == split
    target = Path(public).expanduser()
    return target.exists() and any(Path(p).expanduser().exists() and target.resolve() == Path(p).expanduser().resolve()
                                   for p in (dataset, path) if p)


def load_dataset(
    dataset: str,
    split: str = "train",
    *,
    path: str | Path | None = None,
    image_size: int = 64,
    download_root: str | Path | None = None,
    annotations: str | Path | None = None,
    attribute: str = "gender",
    path_key: str = "data.path",
) -> ImageData:
    """Load a data set split by name (``cifar10``, ``cifar100``, ``imagefolder``, ``npz``, ``ffhq``) or by path.

    ``dataset`` may itself be a path to an ``.npz`` file or an image folder. For CIFAR an explicit ``path`` is the
    only place looked in (a path the user names is never passed over for another); without one, ``$FEDSIM_DATA_DIR``
    then torchvision's download into ``download_root``. ``ffhq`` reads the image folder ``path`` with labels from the
    json ``annotations`` (see :func:`read_ffhq`). ``path_key`` is how the user named ``path`` (for errors).
    """
    if path and not Path(path).expanduser().exists():
        raise DataError(f"{path_key}={path}: no such file or folder")
    if dataset == "ffhq":
        if not path or not annotations:
            raise DataError("data set 'ffhq' needs data.path (the images) and data.annotations (the json files)")
        return read_ffhq(Path(path).expanduser(), Path(annotations).expanduser(), attribute, image_size)
    as_path = Path(dataset).expanduser()
    if dataset.endswith(".npz") or as_path.exists():
        return _load_path(as_path, image_size)
    if dataset in ("npz", "imagefolder"):
        if not path:
            raise DataError(f"data set {dataset!r} needs data.path")
        return _load_path(Path(path).expanduser(), image_size)
    if dataset not in _TV_FOLDER:
        raise DataError(f"unknown data set {dataset!r}; use cifar10, cifar100, imagefolder, npz, ffhq or a path")

    tried: list[str] = []
    if path:
        folder = Path(path).expanduser()
        if folder.is_file():
            return _load_path(folder, image_size, name=dataset)
        found = _cifar_from_folder(dataset, folder, split)
        if found is None:
            raise DataError(f"{path_key}={path}: no {_TV_FOLDER[dataset]}/ or {dataset}_{split}*.npz there")
        return found
    if os.environ.get(DATA_DIR_ENV):
        folder = Path(os.environ[DATA_DIR_ENV]).expanduser()
        found = _cifar_from_folder(dataset, folder, split) if folder.is_dir() else None
        if found is not None:
            return found
        tried.append(f"{folder} (no {_TV_FOLDER[dataset]}/ or {dataset}_{split}*.npz)")
    root = Path(download_root or Path.home() / ".cache" / "fedsim" / "data").expanduser()
    try:
        return _read_torchvision_cifar(dataset, root, split == "train", download=True)
    except Exception as err:  # noqa: BLE001 - network errors come in many types; we report them all the same way
        tried.append(f"torchvision download into {root} ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
    raise DataError(f"data set {dataset!r} ({split}) not found; tried: " + "; ".join(tried)
                    + f". Set data.path or {DATA_DIR_ENV}.")


def _load_path(path: Path, image_size: int, name: str = "") -> ImageData:
    if path.is_file() and path.suffix == ".npz":
        return read_npz(path, name=name or _infer_name(path))
    if path.is_dir():
        return read_image_folder(path, image_size)
    raise DataError(f"data path {path} is neither an .npz file nor an image folder")


def _infer_name(path: Path) -> str:
    stem = path.stem.lower()
    for name in ("cifar100", "cifar10", "imagenet"):
        if stem.startswith(name):
            return name
    return path.stem


# --------------------------------------------------------------------------------------------------------------
# Partitions


def partition_indices(labels: np.ndarray | None, num_clients: int, scheme: str, *, alpha: float = 0.5,
                      seed: int = 0, min_partition_size: int = 1) -> list[np.ndarray]:
    """Split sample indices over clients with flwr-datasets partitioners (IID or Dirichlet label skew).

    The partitioners run offline on an in-memory ``datasets.Dataset`` that holds only indices and labels.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    n = len(labels) if labels is not None else 0
    if n < num_clients:
        raise DataError(f"{n} samples cannot be split over {num_clients} clients")
    if n < num_clients * min_partition_size:
        raise DataError(f"{n} samples cannot give each of {num_clients} clients {min_partition_size} "
                        "(client.num_samples)")
    table = Dataset.from_dict({"idx": np.arange(n), "label": labels.astype(np.int64)})
    if scheme == "iid":
        # IidPartitioner splits in order; shuffle first with the run seed so partitions are random but reproducible.
        table = table.shuffle(seed=seed)
        partitioner = IidPartitioner(num_partitions=num_clients)
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(num_partitions=num_clients, partition_by="label", alpha=alpha,
                                           min_partition_size=min_partition_size, self_balancing=True, seed=seed)
    else:
        raise DataError(f"unknown partitioning {scheme!r}; use iid or dirichlet")
    partitioner.dataset = table
    try:
        return [np.asarray(partitioner.load_partition(i).with_format("numpy")["idx"], dtype=np.int64)
                for i in range(num_clients)]
    except ValueError as err:  # the Dirichlet draw could not give every client min_partition_size samples
        raise DataError(f"data.alpha={alpha}: no Dirichlet split gives each of {num_clients} clients "
                        f"{min_partition_size} samples (client.num_samples); raise data.alpha or lower "
                        f"client.num_samples ({str(err).splitlines()[0]})") from None
