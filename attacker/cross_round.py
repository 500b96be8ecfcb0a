"""Cross-round inversion (GIAS appendix D): when a client's local data stay the same across rounds, the server links
its updates by client id and inverts them jointly, the sum of the matching costs each under that round's public
model. The worker keeps a bounded history per client (``state_scope = "client"``: workers shard it by client id),
saved after every round."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import ClassVar

import numpy as np
from pydantic import Field, PrivateAttr

from fedsim.contract import Reconstruction

from .attacks import InvertingGradients, attacker_train_config, inversion_problem, public_model, update_scale
from .attacks import with_label_candidates
from .engine import AttackEngine, JointProblem
from .history import Kept, pack, unpack


class CrossRoundInversion(InvertingGradients):
    """Inverting Gradients on the sum of a client's last ``rounds_used`` updates (this round's and its history's),
    one image batch for all of them. Labels come from this round's update (the same images every round)."""

    name: ClassVar[str] = "cross_round"
    state_scope: ClassVar[str] = "client"
    rounds_used: int = Field(default=4, ge=1)
    _history: dict = PrivateAttr(default_factory=dict)  # client id -> [Kept], oldest first, at most rounds_used - 1

    def reconstruct_many(self, observed, threat, *, device="cpu", seed=0):
        out = []
        for obs in observed:
            t0 = time.perf_counter()
            cfg = attacker_train_config(obs, threat)
            labels, method = self.labels_for(obs, threat, cfg, public_model(obs))
            past = [k for k in self._history.get(obs.client_id, []) if k.observed.num_examples == obs.num_examples]
            used = past[len(past) - (self.rounds_used - 1):] if self.rounds_used > 1 else []
            parts = [inversion_problem([obs], cfg, [labels], device, seed=seed)]  # part 0's seed starts the search
            parts += [inversion_problem([k.observed], k.config, [labels], device) for k in reversed(used)]
            spec = replace(self.engine_spec(), update_scale=update_scale(cfg))
            result = AttackEngine(spec, device=device, seed=seed).run(JointProblem(parts, [{}] * len(parts)))
            out.append(Reconstruction(
                attack=self.name, images=result.images[0].numpy(), labels=result.labels[0].numpy(), label_method=method,
                loss=float(result.losses[0]), seconds=time.perf_counter() - t0, iterations=result.iterations,
                restarts=self.restarts, trace=[(it, losses[0]) for it, losses in result.trace],
                extra={"rounds_used": len(parts), "rounds": [obs.round] + [k.observed.round for k in reversed(used)],
                       **{k: float(v[0]) for k, v in result.update_fit.items()}}))
            self.remember(Kept(obs, np.asarray(labels), cfg))
        return with_label_candidates(observed, threat, out)

    def remember(self, kept: Kept) -> None:
        """Add an update to its client's history (bounded to the ``rounds_used - 1`` newest)."""
        history = self._history.get(kept.observed.client_id, []) + [kept]
        self._history[kept.observed.client_id] = history[-(self.rounds_used - 1):] if self.rounds_used > 1 else []

    def state_dict(self) -> dict:
        return {"history": {str(c): [pack(k) for k in kept] for c, kept in self._history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._history = {int(c): [unpack(k) for k in kept] for c, kept in state.get("history", {}).items()}
