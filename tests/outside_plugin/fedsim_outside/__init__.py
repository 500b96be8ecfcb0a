"""An attack package that lives outside fedsim: its metadata (../fedsim_outside-0.1.dist-info/entry_points.txt)
registers attacks in the ``fedsim.attacks`` group and a fault-injecting defense in ``fedsim.defenses``. Put this folder on sys.path (or PYTHONPATH) to install it."""

from typing import ClassVar

import numpy as np
import torch
from pydantic import Field, PrivateAttr

from fedsim.contract import Attack, Reconstruction

SEEN: list = []  # every ObservedUpdate that reached SpyAttack in this process
SEEDS: list = []  # (round, seed) of every SpyAttack call in this process


class SpyAttack(Attack):
    """Records exactly what reaches an attack; returns a blank reconstruction. ``record_to``: also pickle what it
    received there (from any process, e.g. a Ray actor), with a copy of the round's on-disk queue folder under
    ``queue`` as it is while the attack runs."""

    name: ClassVar[str] = "outside_spy"
    record_to: str | None = None
    queue: str | None = None

    def reconstruct_many(self, observed, threat, *, device="cpu", seed=0):
        SEEN.extend(observed)
        SEEDS.append((observed[0].round, seed))
        if self.record_to:
            import os
            import pickle
            import shutil
            from pathlib import Path

            out = Path(self.record_to) / f"call_{observed[0].round}_{os.getpid()}_{len(SEEDS)}"
            out.mkdir(parents=True)
            (out / "observed.pkl").write_bytes(pickle.dumps(list(observed)))
            if self.queue:
                shutil.copytree(Path(self.queue) / f"round_{observed[0].round:03d}", out / "queue")
        return [Reconstruction(self.name, np.zeros((o.num_examples, *o.model.image_shape), np.float32),
                               np.zeros(o.num_examples, np.int64), "none", 0.0, 0.0, 0, 1) for o in observed]


class MeanImage(Attack):
    """Answers every image with one flat colour (``level`` in [0, 1]): a baseline any attack should beat."""

    name: ClassVar[str] = "outside_mean"
    level: float = Field(default=0.5, ge=0.0, le=1.0)

    def reconstruct_many(self, observed, threat, *, device="cpu", seed=0):
        return [Reconstruction(self.name, np.full((o.num_examples, *o.model.image_shape), self.level, np.float32),
                               np.zeros(o.num_examples, np.int64), "none", 0.0, 0.0, 0, 1) for o in observed]


class CountingAttack(Attack):
    """A stateful attack (one global state): counts the updates and rounds it has seen; each row reports them as its
    'prior' (round of the state used, updates seen before)."""

    name: ClassVar[str] = "outside_counter"
    state_scope: ClassVar[str] = "global"
    _state: dict = PrivateAttr(default_factory=lambda: {"updates": 0, "rounds": []})

    def reconstruct_many(self, observed, threat, *, device="cpu", seed=0):
        seen_before = self._state["updates"]
        self._state["updates"] += len(observed)
        last = self._state["rounds"][-1] if self._state["rounds"] else -1
        return [Reconstruction(self.name, np.zeros((o.num_examples, *o.model.image_shape), np.float32),
                               np.zeros(o.num_examples, np.int64), "none", 0.0, 0.0, 0, 1,
                               extra={"seed": seed}, columns={"prior_round": last, "prior_meta_steps": seen_before})
                for o in observed]

    def end_round(self, server_round, *, device="cpu", seed=0, folder=None):
        self._state["rounds"].append(server_round)

    def state_dict(self):
        return {"updates": torch.tensor(self._state["updates"]), "rounds": list(self._state["rounds"])}

    def load_state_dict(self, state):
        self._state = {"updates": int(state["updates"]), "rounds": [int(r) for r in state["rounds"]]}


class FailingAttack(Attack):
    """Raises on every call (an attack with a bug): its rows are errors with the reason."""

    name: ClassVar[str] = "outside_fail"

    def reconstruct_many(self, observed, threat, *, device="cpu", seed=0):
        raise RuntimeError("deliberate failure in outside_fail")


class SleepingAttack(Attack):
    """Hangs for ``seconds`` (a stuck attack), then answers like MeanImage."""

    name: ClassVar[str] = "outside_sleep"
    seconds: float = Field(default=3600.0, ge=0.0)
    started_file: str | None = None  # a line is appended here each time a call starts (tests kill it then)

    def reconstruct_many(self, observed, threat, *, device="cpu", seed=0):
        import time

        if self.started_file:
            with open(self.started_file, "a") as f:
                f.write(f"{observed[0].round}\n")
        time.sleep(self.seconds)
        return MeanImage().reconstruct_many(observed, threat, device=device, seed=seed)


from fedsim.defenses import Defense  # noqa: E402


class CrashingClient(Defense):
    """A fault injected for real: the client with id ``client`` raises in round ``round``."""

    name: ClassVar[str] = "outside_crash"
    round: int = 2
    client: int = 0

    def apply(self, update, ctx):
        if ctx.server_round == self.round and ctx.client_id == self.client:
            raise RuntimeError(f"injected fault in client {self.client}, round {self.round}")
        return update


class Dropout(Defense):
    """The README's example defense: zero each entry of the update with probability p (seeded per client, round)."""

    name: ClassVar[str] = "update_dropout"
    p: float = Field(default=0.5, ge=0, lt=1)

    def apply(self, update, ctx):
        return {k: v * (torch.rand(v.shape, generator=ctx.generator) >= self.p) for k, v in update.items()}
