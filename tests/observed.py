"""Small observed updates for attacker-pool tests (the pool routes and records; these attacks ignore the numbers)."""

import numpy as np

from fedsim.contract import ModelSpec, ObservedUpdate
from fedsim.training import TrainConfig


def updates(server_round: int, clients: list[int]) -> list[ObservedUpdate]:
    spec = ModelSpec("lenet_zhu", 10, (3, 8, 8))
    return [ObservedUpdate(round=server_round, client_id=c, model=spec, normalization=((0.5,) * 3, (0.5,) * 3),
                           global_state={"w": np.zeros(2, np.float32)}, update={"w": np.ones(2, np.float32)},
                           train_config=TrainConfig().to_record(), num_examples=1) for c in clients]
