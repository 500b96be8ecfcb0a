"""Search spaces (:data:`SEARCH_SPACES`): what is optimised and how it is projected."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
from torch.func import vmap


from .simulator import Tensors

if TYPE_CHECKING:
    from .problem import InversionProblem

# ------------------------------------------------------------------------------------------------------------
# Search spaces


class SearchSpace:
    """What an attack searches. A space owns its variables (each ``[P, R, ...]``: problems x restarts), their
    initialisation, how one candidate's variables decode into model inputs (normalised images) and labels, and
    their projection after every step. The engine's loop and scoring know nothing else about them.

    Subclasses implement :meth:`init` and :meth:`decode`; :meth:`decode_many` (flat candidates ``[N, ...]``, used by
    the stacked path and for read-out) defaults to ``vmap(decode)``; :meth:`project_` to nothing."""

    searches_labels = False  # labels come out of the search (DLG's joint labels), not from the threat model
    fixed: tuple[str, ...] = ()  # variables that are per-candidate inputs, not searched (e.g. a fixed latent)

    def __init__(self, problem: "InversionProblem") -> None:
        self.problem = problem
        self.mean = torch.tensor(problem.mean).view(-1, 1, 1)
        self.std = torch.tensor(problem.std).view(-1, 1, 1)

    def to(self, device: torch.device) -> "SearchSpace":
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def init(self, P: int, R: int, generator: torch.Generator) -> Tensors:
        raise NotImplementedError

    def init_each(self, seeds: Sequence[int], R: int) -> Tensors:
        """Initial variables of every problem ([P, R, ...]), each problem drawn from its own seed: a problem starts
        from the same point whichever problems share its run (and in whatever order)."""
        draws = [self.init(1, R, torch.Generator().manual_seed(int(s))) for s in seeds]
        return {k: torch.cat([d[k] for d in draws]) for k in draws[0]}

    def decode(self, variables: Tensors, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One candidate -> (model input [B, C, H, W], labels [B] or soft [B, K])."""
        raise NotImplementedError

    def decode_many(self, variables: Tensors, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat candidates ``[N, ...]`` and labels ``[N, B]`` -> (inputs [N, B, C, H, W], labels)."""
        return vmap(self.decode)(variables, labels)

    def project_(self, variables: Tensors) -> None:
        """Projection after each step, in place (none by default)."""

    def labels_out(self, variables: Tensors, labels: torch.Tensor) -> torch.Tensor:
        """Stacked variables and the given labels [P, B] -> the labels each candidate stands for [P, R, B]."""
        R = next(iter(variables.values())).shape[1]
        return labels[:, None].expand(-1, R, -1)

    def inputs(self, variables: Tensors, labels: torch.Tensor) -> torch.Tensor:
        """Every candidate's model input [P, R, B, C, H, W] (for group consensus and read-out)."""
        P, R = next(iter(variables.values())).shape[:2]
        flat = {k: v.reshape(P * R, *v.shape[2:]) for k, v in variables.items()}
        x, _ = self.decode_many(flat, labels[:, None].expand(P, R, *labels.shape[1:]).reshape(P * R, *labels.shape[1:]))
        return x.reshape(P, R, *x.shape[1:])

    def unit_images(self, variables: Tensors, labels: torch.Tensor) -> torch.Tensor:
        """Every candidate's images in [0, 1], [P, R, B, C, H, W]."""
        return (self.inputs(variables, labels) * self.std + self.mean).clamp(0, 1)


def _init_images(problem: "InversionProblem", P: int, R: int, init: str, generator: torch.Generator) -> torch.Tensor:
    shape = (P, R, problem.batch_size, *problem.image_shape)
    if init == "randn":
        return torch.randn(shape, generator=generator)
    if init == "rand":
        return torch.rand(shape, generator=generator) * 2 - 1
    if init == "zeros":
        return torch.zeros(shape)
    raise ValueError(f"unknown init {init!r}; use randn, rand or zeros")


class PixelSpace(SearchSpace):
    """Pixels of the (normalised) model input, optionally boxed to the valid range [0, 1] after every step."""

    def __init__(self, problem: "InversionProblem", init: str = "randn", boxed: bool = True) -> None:
        super().__init__(problem)
        self.init_mode, self.boxed = init, boxed

    def init(self, P, R, generator):
        return {"x": _init_images(self.problem, P, R, self.init_mode, generator)}

    def decode(self, variables, labels):
        return variables["x"], labels

    def decode_many(self, variables, labels):
        return variables["x"], labels

    def project_(self, variables):
        if self.boxed:
            low, high = (0 - self.mean) / self.std, (1 - self.mean) / self.std
            variables["x"].data = torch.maximum(torch.minimum(variables["x"], high), low)


class PixelAndLabelSpace(PixelSpace):
    """DLG: pixels and soft labels optimised jointly (labels as logits, read out by argmax)."""

    searches_labels = True

    def init(self, P, R, generator):
        pr = self.problem
        return {"x": _init_images(pr, P, R, self.init_mode, generator),
                "label_logits": torch.randn(P, R, pr.batch_size, pr.num_classes, generator=generator)}

    def decode(self, variables, labels):
        return variables["x"], variables["label_logits"].softmax(-1)

    decode_many = decode

    def labels_out(self, variables, labels):
        return variables["label_logits"].argmax(-1)


# Spaces an EngineSpec can name (built from the problem, ``init`` and ``boxed``); spaces that need more (a
# generator, fixed latents) are built by their attack and passed to AttackEngine.run.
SEARCH_SPACES: dict[str, type[PixelSpace]] = {"pixels": PixelSpace, "pixels_and_labels": PixelAndLabelSpace}


