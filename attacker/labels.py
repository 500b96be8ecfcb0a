"""Label recovery from the last fully connected layer of an observed update (analytic, no optimisation).

For softmax cross-entropy, the gradient of the logit bias averaged over a batch is ``mean_n (p_n - y_n)`` and the
weight gradient row of class ``c`` is ``mean_n (p_nc - y_nc) h_n`` (``h_n``: the classifier's input features). Rows
of the classes present carry the negative ``-y`` mass. A weight *update* is ``-lr`` times the sum of the local step
gradients, so the sign is flipped back and the scale divided out first (:func:`label_evidence`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from fedsim.contract import LABEL_METHODS
from fedsim.registry import lookup, register


@dataclass
class LabelEvidence:
    weight_grad: torch.Tensor  # [classes, features]: mean per-step gradient of the classifier weight
    bias_grad: torch.Tensor | None  # [classes]
    num_images: int
    mean_probs: torch.Tensor | None = None  # [classes]: the public model's mean softmax on probe inputs
    mean_feature_sum: float | None = None  # mean over probe inputs of sum_j h_j
    classifier: Callable[[torch.Tensor], torch.Tensor] | None = None  # features -> logits: the public last layer


@dataclass
class ModelEvidence:
    """What the public model itself says, computed by a probe (no client data)."""

    mean_probs: torch.Tensor  # [classes]: mean softmax on probe inputs
    mean_feature_sum: float  # mean over probe inputs of sum_j h_j (the classifier's input)
    classifier: Callable[[torch.Tensor], torch.Tensor]  # features -> logits, the public last Linear layer


LabelMethod = Callable[[LabelEvidence], torch.Tensor]
# The platform's registry (fedsim.contract.LABEL_METHODS): this module fills it when the entry point loads it.


def register_label_method(name: str) -> Callable[[LabelMethod], LabelMethod]:
    return register(LABEL_METHODS, name)


@register_label_method("idlg")
def idlg(ev: LabelEvidence) -> torch.Tensor:
    """iDLG (Zhao et al. 2020), one image: the only class whose weight-gradient row sums negative."""
    if ev.num_images != 1:
        raise ValueError(f"idlg recovers the label of one image, not {ev.num_images}")
    return ev.weight_grad.sum(dim=1).argmin().view(1)


@register_label_method("yin")
def yin(ev: LabelEvidence) -> torch.Tensor:
    """Yin et al. 2021 (GradInversion), distinct labels: the ``num_images`` rows with the smallest minima."""
    row_min = ev.weight_grad.min(dim=1).values
    k = min(ev.num_images, ev.weight_grad.shape[0])
    chosen = row_min.topk(k, largest=False).indices
    if k < ev.num_images:  # more images than classes: repeat the strongest candidates
        chosen = chosen.repeat(-(-ev.num_images // k))[: ev.num_images]
    return chosen.sort().values


@register_label_method("count")
def count(ev: LabelEvidence) -> torch.Tensor:
    """Counts for repeated labels (bias-corrected, after Geng et al. 2021): ``n_c = B (p_c - g_c)`` with ``g_c``
    the mean bias gradient and ``p_c`` the model's mean prediction estimated on probe inputs; without a bias the
    weight rows' sums divided by the mean feature sum stand in for ``g_c``. Counts are rounded by largest
    remainder so they sum to the batch size."""
    if ev.mean_probs is None:
        raise ValueError("count needs the public model's mean prediction (mean_probs)")
    if ev.bias_grad is not None:
        g = ev.bias_grad
    else:
        if not ev.mean_feature_sum:
            raise ValueError("count without a classifier bias needs mean_feature_sum")
        g = ev.weight_grad.sum(dim=1) / ev.mean_feature_sum
    estimate = (ev.num_images * (ev.mean_probs.to(g) - g)).clamp_min(0)
    if float(estimate.sum()) <= 0:
        estimate = (-g).clamp_min(0) + 1e-12
    return labels_from_counts(estimate, ev.num_images)


def labels_from_counts(estimate: torch.Tensor, num_images: int) -> torch.Tensor:
    """Real-valued class counts -> ``num_images`` sorted labels: scaled to the batch size, rounded by largest
    remainder (so every method that estimates counts rounds the same way)."""
    estimate = estimate.clamp_min(0)
    if float(estimate.sum()) <= 0:
        raise ValueError("no class has a positive count estimate")
    estimate = estimate * (num_images / estimate.sum())
    counts = estimate.floor().long()
    missing = num_images - int(counts.sum())
    if missing > 0:
        counts[(estimate - counts).topk(missing).indices] += 1
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


@register_label_method("ilrg")
def ilrg(ev: LabelEvidence) -> torch.Tensor:
    """iLRG (Wang et al., ICLR 2023): per-class counts from the batch-averaged gradient. Row ``c`` of the weight
    gradient over the bias gradient is the ``(p - y)``-weighted mean feature of the batch, dominated by the class-``c``
    images when they are present (exactly their mean feature for an untrained, near-uniform model). Through the
    public classifier it gives the mean softmax ``q_c`` of those images, and the bias gradient is linear in the
    counts: ``B g_i = sum_c k_c q_c[i] - k_i`` with ``sum_c k_c = B``, solved by least squares and rounded."""
    if ev.bias_grad is None or ev.classifier is None:
        raise ValueError("ilrg needs the classifier's bias gradient and the public classifier")
    g = ev.bias_grad
    safe = torch.where(g.abs() > 1e-30, g, torch.full_like(g, 1e-30))
    features = ev.weight_grad / safe[:, None]  # [classes, features]
    with torch.no_grad():
        q = ev.classifier(features.to(torch.get_default_dtype())).double().softmax(-1)  # [classes c, classes i]
    classes = len(g)
    system = torch.cat([torch.ones(1, classes, dtype=torch.float64), q.T - torch.eye(classes, dtype=torch.float64)])
    target = torch.cat([torch.tensor([float(ev.num_images)], dtype=torch.float64), ev.num_images * g.double()])
    counts = torch.linalg.lstsq(system, target[:, None]).solution[:, 0]
    return labels_from_counts(counts, ev.num_images)


@register_label_method("llg")
def llg(ev: LabelEvidence) -> torch.Tensor:
    """LLG (Wainakh et al., PETS 2022), the heuristic without a model: every class whose weight-gradient row sums
    negative is present once; each recovered label then lifts its class's sum by the mean impact of one image (the
    negative mass over the batch size) and the next label is the class with the most negative sum left."""
    sums = ev.weight_grad.sum(dim=1).clone()
    present = torch.nonzero(sums < 0).flatten()
    if len(present) == 0:
        raise ValueError("llg: no class has a negative weight-gradient sum")
    impact = float(sums[present].sum()) / ev.num_images
    labels = present[sums[present].argsort()][: ev.num_images].tolist()
    sums[present] -= impact
    while len(labels) < ev.num_images:
        chosen = int(sums.argmin())
        labels.append(chosen)
        sums[chosen] -= impact
    return torch.tensor(sorted(labels))


def choose_method(ev: LabelEvidence) -> str:
    """What ``auto`` runs for this setting (measured in experiments/label_recovery.md): iDLG for one image (exact);
    for a batch the bias-corrected count, which handles repeated labels and multi-step updates and was exact or
    best at every batch size measured on 10 classes, when the public model can be probed; LLG, which needs no
    model, otherwise."""
    if ev.num_images == 1:
        return "idlg"
    if ev.mean_probs is not None and (ev.bias_grad is not None or ev.mean_feature_sum):
        return "count"
    return "llg"


@register_label_method("auto")
def auto(ev: LabelEvidence) -> torch.Tensor:
    """The method :func:`choose_method` picks for the setting (rows name it, e.g. ``auto:count``)."""
    return LABEL_METHODS[choose_method(ev)](ev)


def last_linear(update: dict[str, np.ndarray], num_classes: int) -> tuple[str, str | None]:
    """Names of the classifier's weight and bias: the last 2-D array with ``num_classes`` rows."""
    keys = list(update)
    for key in reversed(keys):
        if update[key].ndim == 2 and update[key].shape[0] == num_classes:
            bias = key[: -len("weight")] + "bias" if key.endswith("weight") else None
            return key, bias if bias in update else None
    raise ValueError("the update has no fully connected layer with one row per class")


def label_evidence(update: dict[str, np.ndarray], num_classes: int, num_images: int, *, lr: float = 1.0,
                   steps: int = 1, probe: Callable[[], ModelEvidence] | None = None) -> LabelEvidence:
    """Evidence from a parameter update (new minus old weights) of ``steps`` SGD steps at rate ``lr``."""
    w_key, b_key = last_linear(update, num_classes)
    scale = -1.0 / (lr * steps)
    # np.array copies: arrays that came through Ray's object store are read-only views
    weight_grad = scale * torch.from_numpy(np.array(update[w_key], dtype=np.float64))
    bias_grad = scale * torch.from_numpy(np.array(update[b_key], dtype=np.float64)) if b_key else None
    model = probe() if probe is not None else None
    if model is None:
        return LabelEvidence(weight_grad, bias_grad, num_images)
    return LabelEvidence(weight_grad, bias_grad, num_images, model.mean_probs, model.mean_feature_sum,
                         model.classifier)


def recover_labels(update: dict[str, np.ndarray], num_classes: int, num_images: int, method: str = "auto", *,
                   lr: float = 1.0, steps: int = 1,
                   probe: Callable[[], ModelEvidence] | None = None) -> np.ndarray:
    """Recover ``num_images`` labels from a parameter update with a registered method."""
    return recover_labels_named(update, num_classes, num_images, method, lr=lr, steps=steps, probe=probe)[0]


def recover_labels_named(update: dict[str, np.ndarray], num_classes: int, num_images: int, method: str = "auto", *,
                         lr: float = 1.0, steps: int = 1,
                         probe: Callable[[], ModelEvidence] | None = None) -> tuple[np.ndarray, str]:
    """:func:`recover_labels` and the name of the method that ran (``auto:<chosen>`` for ``auto``)."""
    fn = lookup(LABEL_METHODS, method, "label method")
    ev = label_evidence(update, num_classes, num_images, lr=lr, steps=steps, probe=probe)
    name = f"auto:{choose_method(ev)}" if fn is auto else method
    return fn(ev).numpy().astype(np.int64), name


def model_probe(model: torch.nn.Module, image_shape: tuple[int, int, int], samples: int = 64, seed: int = 0,
                update: dict[str, np.ndarray] | None = None, points: int = 1) -> Callable[[], ModelEvidence]:
    """A lazy probe of the public model on Gaussian inputs (in normalised space): mean softmax and mean feature sum
    entering the classifier (the last Linear layer), and that layer itself (of the sent model).

    With the observed ``update`` and ``points > 1`` the mean softmax and feature sum are averaged over models along
    the client's local trajectory, interpolated between the sent weights and the returned ones (sent + update): a
    multi-step update sums gradients taken at all those weights, so the label estimate of every local step is
    averaged (Dimitrov et al. 2022, after Geng et al.'s count)."""

    def evidence_at(alpha: float) -> tuple[torch.Tensor, float, torch.nn.Module]:
        probe_model = copy.deepcopy(model).train()  # train mode like the client; the copy keeps BN buffers intact
        if alpha:
            with torch.no_grad():
                for name, param in probe_model.named_parameters():
                    if name in update:
                        param.add_(alpha * torch.as_tensor(np.array(update[name]), dtype=param.dtype))
        linear = [m for m in probe_model.modules() if isinstance(m, torch.nn.Linear)][-1]
        captured: list = []
        linear.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0]))
        x = torch.randn(samples, *image_shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            probs = probe_model(x).softmax(-1).mean(0).double()
        return probs, float(captured[0].sum(dim=1).mean()), linear.eval().requires_grad_(False)

    def run() -> ModelEvidence:
        alphas = np.linspace(0.0, 1.0, points) if update is not None and points > 1 else [0.0]
        along = [evidence_at(float(a)) for a in alphas]
        return ModelEvidence(torch.stack([p for p, _, _ in along]).mean(0), float(np.mean([f for _, f, _ in along])),
                             along[0][2])

    return run
