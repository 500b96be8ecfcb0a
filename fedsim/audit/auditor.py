"""The attacker side of a round, in one place: what the server observes -> backlog queue -> attacker pool ->
evaluator -> run directory.

One :class:`Auditor` per run. Every path that attacks updates goes through it: the federation's honest-but-curious
strategy (``fedsim run`` and ``flwr run .``), resumed runs (the backlog), and the single-update path (``fedsim
attack``, ``fedsim experiment``). Its :class:`AuditPlan` is built once per run and passed, never re-derived.

The line that must not blur: :meth:`Auditor.observe` splits each reply into the :class:`ObservedUpdate` (built by
:meth:`ServerView.observe`, the only place one is made), which goes to the queue and the attacker, and its audit
record (ground truth), which goes to the evaluator only. The attacker workers get the attacker's root seed, never
the run seed the clients draw from.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..contract import LeakageRecord, ObservedUpdate, ServerView
from ..evaluation import GroundTruth, LeakageEvaluator
from ..pool import AttackerPool
from ..protocol import Exchange, RecordKeys, ReplyError, arrays_to_numpy, read_reply, read_side
from ..results import RunDirectory

log = logging.getLogger("fedsim")


@dataclass(frozen=True)
class PoolSettings:
    """Where and how the attacks run (see :class:`fedsim.pool.AttackerPool`)."""

    executor: str = "ray"  # ray: actors, the FL loop does not wait; inline: in the caller's thread
    workers: int = 2
    threads: int = 1  # torch threads per worker
    device: str = "cpu"
    gpus_per_worker: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per worker
    timeout: float | None = None  # seconds one attack call may run (ray executor)
    python_path: tuple[str, ...] = ()  # prepended to the workers' sys.path (an audited app's source tree)


class Recipe(Protocol):
    """What the server knows of a client's training, for a client that is not told its config in fedsim's own
    terms (a user's Flower app: :class:`fedsim.audit.app.DeclaredRecipe`)."""

    def train_config(self, sent: dict, num_examples: int) -> dict:
        """The :class:`fedsim.training.TrainConfig` record of one reply, from the config the server sent it."""


@dataclass(frozen=True)
class AuditPlan:
    """The attacker side of one run, decided before it starts.

    view: what the server knows besides the replies (architecture, normalisation, threat model, defenses).
    attacks: attack specs (``{"name": ..., **params}``), run in this order.
    attacked_per_round: how many of a round's replies are attacked (None: all), drawn from ``selection_seed`` and
        the round, so the same federation attacks the same clients.
    rounds: the attacked rounds (None: every round).
    attacker_seed: the attacker's root seed (fedsim.seeds.attacker_root).
    learn: stateful attacks learn after each round (end_round); False for a one-off attack with no next round.
    backlog: keep every observed update on disk until it has its rows (what ``--resume`` attacks).
    keys: where the messages keep the model, the config and the example count.
    recipe: how the client trains (None: the config sent is fedsim's own train config, which says it).
    """

    view: ServerView
    attacks: tuple[dict, ...]
    attacker_seed: int
    attacked_per_round: int | None = None
    rounds: frozenset[int] | None = None
    selection_seed: int = 0
    pool: PoolSettings = field(default_factory=PoolSettings)
    learn: bool = True
    backlog: bool = True
    keys: RecordKeys = RecordKeys()
    recipe: Recipe | None = None

    def train_config(self, sent: dict, num_examples: int) -> dict:
        return sent if self.recipe is None else self.recipe.train_config(sent, num_examples)

    def attacks_round(self, server_round: int) -> bool:
        return bool(self.attacks) and self.attacked_per_round != 0 and (
            self.rounds is None or server_round in self.rounds)

    def choose(self, server_round: int, client_ids: Sequence[int]) -> set[int]:
        """The clients attacked among a round's observed ones (the server's own, seeded choice)."""
        ids = sorted(client_ids)
        if self.attacked_per_round is None or self.attacked_per_round >= len(ids):
            return set(ids)
        rng = np.random.default_rng([self.selection_seed, server_round, 11])
        return set(rng.choice(ids, size=self.attacked_per_round, replace=False).tolist())


class Auditor:
    """Owns everything after the server observes a round, for one run directory.

    ``ground_truth`` maps an audit record's sample ids to (images in [0, 1], labels): it is the evaluator's alone.
    ``on_submit(n)`` / ``on_row(row)`` report progress. Rows already in the run directory are not attacked again.
    """

    def __init__(self, plan: AuditPlan, store: RunDirectory, ground_truth: GroundTruth, *,
                 on_submit: Callable[[int], None] | None = None,
                 on_row: Callable[[LeakageRecord], None] | None = None) -> None:
        self.plan, self.store = plan, store
        self._warned: set[str] = set()
        backlog = store.queue if plan.backlog else None
        self.evaluator = LeakageEvaluator(ground_truth, store.leakage.append, grid_dir=store.root / "grids",
                                          on_row=on_row, on_audit=backlog.put_audit if backlog else None,
                                          reconstruction_dir=store.reconstructions)
        self.pool: AttackerPool | None = None
        if not plan.attacks or plan.attacked_per_round == 0:  # nothing to attack: no workers
            return
        done = {(int(r["round"]), int(r["client_id"]), str(r["attack"])) for r in store.leakage.rows}
        p = plan.pool
        self.pool = AttackerPool(list(plan.attacks), plan.view.threat, self.evaluator.record, executor=p.executor,
                                 workers=p.workers, threads=p.threads, device=p.device,
                                 seed_root=plan.attacker_seed, gpus_per_worker=p.gpus_per_worker,
                                 resources=p.resources, timeout=p.timeout, state_dir=store.attacker,
                                 on_submit=on_submit, done=done, learn=plan.learn,
                                 on_round_done=backlog.drop if backlog else None, python_path=p.python_path)
        if p.executor == "ray":
            threading.Thread(target=self._record_placement, name="attacker-placement", daemon=True).start()

    def _record_placement(self) -> None:
        """Which node runs which attacker worker (off the start-up path; informational)."""
        try:
            (self.store.root / "attacker_workers.json").write_text(json.dumps(self.pool.placement(), indent=2))
        except Exception as err:  # noqa: BLE001 - informational only
            log.warning("could not record where the attacker workers run: %s", err)

    # -- a round ----------------------------------------------------------------------------------------------
    def observe(self, server_round: int, exchanges: Sequence[Exchange]) -> list[ObservedUpdate]:
        """A round's successful train exchanges -> the attacked ones' observed updates (queued on disk, then
        submitted to the attacker) and their audit records (to the evaluator). Returns what was submitted.

        A reply the audit cannot read (no side channel, another arrays key) is not audited, with one warning per
        kind of problem; the federation is not the auditor's to stop."""
        if self.pool is None or not exchanges or not self.plan.attacks_round(server_round):
            return []
        keys = self.plan.keys
        decoded: dict[int, dict] = {}  # one decode per distinct sent model (usually one a round, shared by all)
        seen = []
        for exchange in exchanges:
            try:
                arrays = exchange.sent[keys.arrays]
                if id(arrays) not in decoded:  # integer buffers (BatchNorm's counters) are no weights to invert
                    decoded[id(arrays)] = {k: v for k, v in arrays_to_numpy(arrays).items()
                                           if np.issubdtype(v.dtype, np.floating)}
                reply = read_reply(exchange.reply, keys)
                missing = sorted(set(decoded[id(arrays)]) - set(reply.arrays))
                if missing:
                    raise ReplyError(f"the reply's arrays lack {missing[:3]} of the model sent")
                config = self.plan.train_config(dict(exchange.sent[keys.config].items()), reply.num_examples)
                observed = self.plan.view.observe(server_round, decoded[id(arrays)], config, reply)
                seen.append((observed, read_side(exchange.reply, server_round, self.plan.view.normalization)))
            except ReplyError as err:
                self.warn_once(f"round {server_round}: a reply was not audited: {err}")
        chosen = self.plan.choose(server_round, [o.client_id for o, _ in seen])
        attacked = sorted(((o, a) for o, a in seen if o.client_id in chosen), key=lambda pair: pair[0].client_id)
        for observed, audit in attacked:
            self.evaluator.register_audit(audit)
            if self.plan.backlog:  # on disk before any attack of it starts
                self.store.queue.put(observed)
        submitted = [o for o, _ in attacked]
        self.pool.submit(submitted)
        return submitted

    def warn_once(self, message: str) -> None:
        """One warning per kind of problem (its text without the round), not one per reply and round."""
        kind = message.split(": ", 1)[-1]
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("fedsim audit: %s", message)

    def resume(self) -> int:
        """A resumed run: attack again every queued update that still misses a row, round by round (stateful
        attacks see rounds in order). Returns how many updates were queued."""
        if self.pool is None:
            return 0
        count = 0
        for server_round in self.store.queue.rounds():
            for audit in self.store.queue.audits(server_round):
                self.evaluator.register_audit(audit)
            observed = self.store.queue.observed(server_round)
            count += len(observed)
            self.pool.submit(observed)
        return count

    # -- the end ----------------------------------------------------------------------------------------------
    def drain(self) -> None:
        """Until every submitted attack has its row (Flower shuts Ray down when the server app returns)."""
        if self.pool is not None:
            self.pool.drain()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    def abort(self) -> None:
        """An interrupted run: no further Ray call; updates in flight stay queued for ``--resume``."""
        if self.pool is not None:
            self.pool.abort()
