"""Seed streams. Clients and attackers draw from separate branches of the run seed.

Clients: one seed per (run seed, round, client, purpose): sample choice, step order, defense noise.
Attacker workers: a root derived on a spawn branch of the run seed that no client seed lies on; workers are given
only that root (never the run seed), so an attack cannot regenerate the clients' sample choice or partitioning, and
the attack seed of each (round, attack) is drawn from the root, and each update's own stream from that seed and the
update's identity (round, client), so an update is attacked from the same draws whichever updates share its call.
"""

from __future__ import annotations

import numpy as np

ATTACKER_BRANCH = 0xA77AC  # spawn key of the attacker's branch


def round_seed(seed: int, server_round: int, client_id: int, stream: int) -> int:
    """A client's seed for one (run, round, client, purpose) that does not depend on scheduling."""
    return int(np.random.SeedSequence([seed, server_round, client_id, stream]).generate_state(1)[0])


def attacker_root(seed: int, attack_seed: int | None = None) -> int:
    """The attacker's root seed: a 64-bit value on its own spawn branch of the run seed (``attack_seed``, the
    ``attack.seed`` key, picks another root on that branch)."""
    key = (ATTACKER_BRANCH,) if attack_seed is None else (ATTACKER_BRANCH, attack_seed)
    words = np.random.SeedSequence(seed, spawn_key=key).generate_state(2, dtype=np.uint32)
    return int(words[0]) << 32 | int(words[1])


def attack_seed(root: int, server_round: int, attack_index: int) -> int:
    """The seed an attack runs with on one round's updates (restart inits, prior task sampling)."""
    return int(np.random.SeedSequence(root, spawn_key=(server_round, attack_index)).generate_state(1)[0])


def update_seed(call_seed: int, server_round: int, client_id: int) -> int:
    """One update's stream within an attack call (restart inits, random codes): a function of the call's seed and
    the update's identity only, never of its position among the updates attacked with it."""
    return int(np.random.SeedSequence([call_seed, server_round, client_id + 1]).generate_state(1)[0])
