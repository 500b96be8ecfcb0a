"""Privacy accounting for the DP defenses: epsilon after each round, from Opacus's RDP accountant.

A DP defense declares its :class:`Mechanism` (noise multiplier, sampling rate, steps per round) for a federation;
:func:`epsilon` is the pure formula (a fresh accountant over ``rounds``), :class:`PrivacyLedger` the stateful
accountant the server advances once per finished round (``state_dict`` / ``load_state_dict`` as Opacus's).

The bound is Opacus's RDP analysis of the *Poisson*-subsampled Gaussian mechanism. Under ``federation.sampling =
"poisson"`` that is the sampling the run does; under fixed-size sampling (the default) the figure is the usual
approximation, as in most DP-FedAvg papers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Mechanism:
    """One Gaussian mechanism applied ``steps_per_round`` times per round with sensitivity-normalised noise."""

    name: str  # the defense's tag, for reports
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int = 1


def epsilon(mechanisms: list[Mechanism], rounds: int, delta: float) -> float:
    """Epsilon after ``rounds`` rounds of every mechanism (composed), for ``delta``. 0 rounds: 0; no noise: inf."""
    ledger = PrivacyLedger(mechanisms, delta)
    for _ in range(rounds):
        ledger.advance()
    return ledger.epsilon()


class PrivacyLedger:
    """Stateful accountant: ``advance()`` once per finished round, ``epsilon()`` at any time."""

    def __init__(self, mechanisms: list[Mechanism], delta: float) -> None:
        from opacus.accountants import RDPAccountant

        self.mechanisms = list(mechanisms)
        self.delta = delta
        self.rounds = 0
        self._accountant = RDPAccountant()

    def advance(self) -> None:
        for m in self.mechanisms:
            if m.noise_multiplier > 0:
                for _ in range(m.steps_per_round):
                    self._accountant.step(noise_multiplier=m.noise_multiplier, sample_rate=m.sample_rate)
        self.rounds += 1

    def epsilon(self) -> float:
        if self.rounds == 0 or not self.mechanisms:
            return 0.0 if self.mechanisms else math.nan
        if any(m.noise_multiplier == 0 for m in self.mechanisms):
            return math.inf
        return float(self._accountant.get_epsilon(delta=self.delta))

    def state_dict(self) -> dict:
        return {"rounds": self.rounds, "accountant": self._accountant.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.rounds = int(state["rounds"])
        self._accountant.load_state_dict(state["accountant"])


def noise_for_epsilon(target_epsilon: float, sample_rate: float, rounds: int, delta: float,
                      steps_per_round: int = 1) -> float:
    """The noise multiplier that reaches ``target_epsilon`` after ``rounds`` rounds (Opacus's search)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=rounds * steps_per_round, accountant="rdp"))
