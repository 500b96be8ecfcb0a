"""fedsim's client-side defenses as Flower client mods, for a user's own ClientApp::

    from fedsim import mods
    from fedsim.audit import audit_mod

    @app.train(mods=[audit_mod, mods.topk(fraction=0.1)])
    def train(msg, context): ...

A mod runs the same :class:`fedsim.defenses.Defense` code the simulation runs, on the reply's update (the reply's
arrays minus the arrays the server sent, every floating-point array) and sends ``sent + defended update``. Like
Flower's own clipping mods it needs exactly one ArrayRecord in the message and in the reply. Defenses that change
training itself (DP-SGD, MixUp) or keep layers local (FedBN) cannot act from outside the train function and are
refused with one line. Put :func:`fedsim.audit.audit_mod` first so the audit sees what leaves the client.

Randomness (noise, random-k): by default fresh from the operating system, as a deployed client's should be; give
``seed`` for a reproducible run (then drawn per (seed, round, partition), as in fedsim's simulation).
"""

from __future__ import annotations

import secrets
from typing import Callable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MessageType

from .defenses import Defense, DefenseContext, build_defense
from .seeds import round_seed

Mod = Callable[[Message, Context, Callable[[Message, Context], Message]], Message]


def _changes_training(defense: Defense) -> bool:
    cls = type(defense)
    return (cls.wrap_training is not Defense.wrap_training or cls.mix_batch is not Defense.mix_batch
            or cls.local_keys is not Defense.local_keys or bool(cls.shares))


def _single(records: dict, where: str) -> tuple[str, ArrayRecord]:
    if len(records) != 1:
        raise ValueError(f"{where} has {len(records)} ArrayRecords; a fedsim defense mod needs exactly one")
    return next(iter(records.items()))


def defense_mod(spec: dict | Defense, *, seed: int | None = None) -> Mod:
    """A Flower client mod applying one fedsim defense (``{"name": "topk", "fraction": 0.1}`` or a built one)."""
    defense = build_defense(spec) if isinstance(spec, dict) else spec
    if _changes_training(defense):
        raise ValueError(f"defense {defense.name!r} changes local training or what the client keeps or shares; it "
                         f"cannot run as a mod around the train function (use it in fedsim's own clients)")

    def mod(msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, context)
        _, sent = _single(msg.content.array_records, "the train message")
        sent_arrays = {k: v.numpy() for k, v in sent.items()}
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        key, arrays = _single(reply.content.array_records, "the reply")
        new = {k: v.numpy() for k, v in arrays.items()}
        floating = [k for k, v in new.items() if np.issubdtype(v.dtype, np.floating) and k in sent_arrays]
        update = {k: torch.from_numpy(new[k].astype(np.float32) - sent_arrays[k].astype(np.float32))
                  for k in floating}
        config = next(iter(msg.content.config_records.values()), {})
        server_round = int(config.get("server-round", 0))
        partition = int(context.node_config.get("partition-id", -1))
        draw = secrets.randbits(63) if seed is None else round_seed(seed, server_round, max(partition, 0), 2)
        ctx = DefenseContext(generator=torch.Generator().manual_seed(draw), server_round=server_round,
                             client_id=partition)
        defended = defense.apply(update, ctx)
        out = {}
        for k, v in new.items():  # the reply's order and dtypes; untouched arrays as they were
            if k in defended:
                v = (sent_arrays[k].astype(np.float32) + defended[k].numpy()).astype(new[k].dtype)
            out[k] = Array(np.ascontiguousarray(v))
        reply.content[key] = ArrayRecord(out)
        return reply

    mod.__name__ = f"fedsim_{defense.name}_mod"
    mod.__qualname__ = mod.__name__
    return mod


def topk(*, fraction: float, seed: int | None = None) -> Mod:
    """Keep the ``fraction`` largest-magnitude update coordinates (fedsim's ``topk``)."""
    return defense_mod({"name": "topk", "fraction": fraction}, seed=seed)


def randomk(*, fraction: float, rescale: bool = False, seed: int | None = None) -> Mod:
    """Keep a random ``fraction`` of update coordinates (fedsim's ``randomk``)."""
    return defense_mod({"name": "randomk", "fraction": fraction, "rescale": rescale}, seed=seed)


def quantize(*, seed: int | None = None, **params) -> Mod:
    """Quantise the update (fedsim's ``quantize``; its parameters as keywords)."""
    return defense_mod({"name": "quantize", **params}, seed=seed)


def sign(*, seed: int | None = None) -> Mod:
    """Send only the update's signs (fedsim's ``sign``)."""
    return defense_mod({"name": "sign"}, seed=seed)


def gaussian_noise(*, std: float, clip: float | None = None, seed: int | None = None) -> Mod:
    """Clip to ``clip`` (if given) and add N(0, std^2) per coordinate: no DP accounting (fedsim's
    ``gaussian_noise``)."""
    return defense_mod({"name": "gaussian_noise", "std": std, "clip": clip}, seed=seed)


def client_dp(*, clip: float, noise_multiplier: float, seed: int | None = None) -> Mod:
    """Client-level DP-FedAvg's client half: clip to ``clip``, add N(0, (noise_multiplier * clip)^2) (fedsim's
    ``client_dp``)."""
    return defense_mod({"name": "client_dp", "clip": clip, "noise_multiplier": noise_multiplier}, seed=seed)


__all__ = ["defense_mod", "topk", "randomk", "quantize", "sign", "gaussian_noise", "client_dp"]
