import math

import numpy as np
import pytest
import torch

from fedsim.defenses import DefenseContext, build_defense, global_norm
from fedsim.training import TrainConfig, local_train, step_schedule
from fedsim.models import build_model


def ctx(seed=0, **kw):
    return DefenseContext(generator=torch.Generator().manual_seed(seed), **kw)


def test_gaussian_noise_has_the_configured_std():
    update = {"w": torch.zeros(200_000), "b": torch.zeros(1000)}
    noised = build_defense({"name": "gaussian_noise", "std": 0.03}).apply(update, ctx())
    values = torch.cat([noised["w"], noised["b"]])
    assert abs(values.std().item() / 0.03 - 1) < 0.05
    assert abs(values.mean().item()) < 0.03 * 0.05


def test_noise_on_a_real_update_adds_exactly_the_stated_noise_after_clipping():
    """On a non-zero update: observed minus clean has mean 0 and the stated std; with a clip, the noise is added to
    the clipped update (observed minus the clipped update is the noise, and the clipped norm is the clip)."""
    g = torch.Generator().manual_seed(3)
    update = {"w": 5 * torch.randn(300_000, generator=g), "b": torch.randn(2000, generator=g) + 2}
    noised = build_defense({"name": "gaussian_noise", "std": 0.02}).apply(update, ctx(1))
    diff = torch.cat([noised[k] - update[k] for k in update])
    assert abs(diff.std().item() / 0.02 - 1) < 0.05 and abs(diff.mean().item()) < 0.02 * 0.05
    norm = global_norm(update).item()
    clipped = {k: v * (10.0 / norm) for k, v in update.items()}
    both = build_defense({"name": "gaussian_noise", "std": 0.02, "clip": 10.0}).apply(update, ctx(1))
    noise = torch.cat([both[k] - clipped[k] for k in update])
    assert abs(noise.std().item() / 0.02 - 1) < 0.05 and abs(noise.mean().item()) < 0.02 * 0.05
    assert torch.allclose(noise, diff, atol=1e-5)  # the same seeded draw, added after clipping


def test_gaussian_noise_clips_before_noising_and_is_seeded():
    update = {"w": torch.full((1000,), 1.0)}
    clipped = build_defense({"name": "gaussian_noise", "std": 0.0, "clip": 2.0}).apply(update, ctx())
    assert math.isclose(global_norm(clipped).item(), 2.0, rel_tol=1e-6)
    d = build_defense({"name": "gaussian_noise", "std": 1.0})
    assert torch.equal(d.apply(update, ctx(5))["w"], d.apply(update, ctx(5))["w"])
    assert not torch.equal(d.apply(update, ctx(5))["w"], d.apply(update, ctx(6))["w"])


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_topk_keeps_exactly_the_fraction_per_layer(fraction):
    update = {"a": torch.randn(1000), "b": torch.randn(20, 50)}
    out = build_defense({"name": "topk", "fraction": fraction}).apply(update, ctx())
    for key in update:
        kept = (out[key] != 0).sum().item()
        assert kept == round(fraction * update[key].numel())
        threshold = out[key][out[key] != 0].abs().min()
        assert (update[key].abs() > threshold).sum().item() <= kept  # the kept ones are the largest
        assert torch.equal(out[key][out[key] != 0], update[key][out[key] != 0])


def test_share_bn_stats_sends_the_first_step_batch_statistics():
    torch.manual_seed(0)
    model = build_model("convnet", 10, width=4)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4)
    first_conv = model.features[0]
    expected = first_conv(x).detach()
    cfg = TrainConfig(mode="fedsgd", lr=0.1, batch_size=4, num_samples=4)
    result = local_train(model, x, y, cfg, step_schedule(cfg))
    c = ctx(bn_stats=result.bn_stats)
    build_defense({"name": "share_bn_stats"}).apply({}, c)
    mean, var = c.shared["bn_stats"]["features.1"]
    assert torch.allclose(mean, expected.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(var, expected.var((0, 2, 3), unbiased=False), atol=1e-5)


def test_unknown_defense_and_bad_parameter_are_named():
    with pytest.raises(ValueError, match="unknown defense 'dp'"):
        build_defense({"name": "dp"})
    with pytest.raises(Exception, match="fraction"):
        build_defense({"name": "topk", "fraction": 0})


@pytest.mark.parametrize("fraction", [0.5, 0.1, 0.01])
def test_randomk_keeps_a_random_fraction_per_layer_seeded(fraction):
    g = torch.Generator().manual_seed(0)
    update = {"w": torch.randn(50, 40, generator=g) + 3.0, "b": torch.randn(300, generator=g) + 3.0}
    defense = build_defense({"name": "randomk", "fraction": fraction})
    out = defense.apply(update, ctx(5))
    for k, v in update.items():
        kept = out[k] != 0
        assert kept.sum().item() == max(1, int(math.floor(fraction * v.numel() + 0.5)))
        assert torch.equal(out[k][kept], v[kept])  # kept entries unchanged, the rest zero
    again, other = defense.apply(update, ctx(5)), defense.apply(update, ctx(6))
    assert torch.equal(again["w"], out["w"]) and not torch.equal(other["w"], out["w"])
    top = build_defense({"name": "topk", "fraction": fraction}).apply(update, ctx())
    assert not torch.equal(top["w"] != 0, out["w"] != 0)  # not the largest entries
    rescaled = build_defense({"name": "randomk", "fraction": fraction, "rescale": True}).apply(update, ctx(5))
    assert torch.allclose(rescaled["w"], out["w"] / fraction)


def test_quantize_rounds_to_the_stated_levels_and_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(1)
    update = {"w": torch.randn(20_000, generator=g), "zero": torch.zeros(5)}
    out = build_defense({"name": "quantize", "bits": 8}).apply(update, ctx())
    scale = update["w"].abs().max() / 127
    levels = out["w"] / scale
    assert torch.allclose(levels, levels.round(), atol=1e-4) and levels.abs().max() <= 127 + 1e-4
    assert (out["w"] - update["w"]).abs().max() <= scale / 2 + 1e-7  # round to nearest
    assert len(torch.unique(out["w"])) <= 255 and torch.equal(out["zero"], update["zero"])
    two = build_defense({"name": "quantize", "bits": 2, "stochastic": True})
    mean = torch.stack([two.apply(update, ctx(s))["w"] for s in range(400)]).mean(0)
    assert len(torch.unique(two.apply(update, ctx(0))["w"])) <= 3
    scale2 = update["w"].abs().max()  # one level at 2 bits: each entry rounds to -scale2, 0 or scale2
    assert abs((mean - update["w"]).mean()) < 0.01 * scale2  # unbiased (floor or ceil would be off by scale2 / 2)
    # and per entry: the error of a 400-draw mean is within a few standard errors of a Bernoulli rounding
    assert (mean - update["w"]).abs().mean() < 3 * scale2 * 0.5 / math.sqrt(400)


def test_sign_sends_one_bit_per_entry_with_the_layer_scale():
    update = {"w": torch.tensor([0.5, -2.0, 0.0, 1.5]), "b": torch.tensor([-0.1, 0.3])}
    out = build_defense({"name": "sign"}).apply(update, ctx())
    assert torch.equal(out["w"], torch.tensor([1.0, -1.0, 0.0, 1.0]) * 1.0)
    assert torch.allclose(out["b"], torch.tensor([-0.2, 0.2]))


@pytest.mark.ray
def test_fedbn_keeps_batchnorm_local_across_rounds_in_a_real_federation(tmp_path, data_dir):
    """One client, FedAvg, 2 rounds: the global BatchNorm state never moves, and replaying the client's second round
    matches the server's model only with the client's own BatchNorm layers from round 1 (its node state)."""
    from fedsim.client import choose_samples, client_round
    from fedsim.config import load_config
    from fedsim.clientapp import ClientSide, _client_process_state
    from fedsim.driver import run_federation
    from fedsim.federation import prepare

    cfg = load_config("experiments/quickstart.toml", [
        f'output_dir="{tmp_path}"', 'name="fedbn"', "federation.num_clients=1", "federation.clients_per_round=1",
        "federation.rounds=2", 'model.name="convnet"', "model.width=8", 'client.mode="fedavg"',
        "client.batch_size=4", "client.num_samples=8", "client.lr=0.05", "data.test_samples=50", "attacks=[]",
        "attack.clients_per_round=0", 'defenses=[{name="fedbn"}]', "seed=2"])
    store = run_federation(cfg, show_progress=False)
    saved = [{k: torch.from_numpy(v) for k, v in store.checkpoints.load(r).items()} for r in (0, 1, 2)]
    fedbn = cfg.build_defenses()[0]
    side = ClientSide.of(prepare(cfg))
    data, model, defenses = _client_process_state(side.plan)
    local = fedbn.local_keys(model)
    assert local and all(torch.equal(saved[r][k], saved[0][k]) for r in (1, 2) for k in local)
    assert any(not torch.equal(saved[2][k], saved[1][k]) for k in saved[0] if k not in local)
    train = cfg.client.train_config()
    threat = cfg.threat_model()

    def replay(server_round, start, local_state):
        ids = choose_samples(side.partitions[0], train.num_samples, cfg.seed, server_round, 0)
        return client_round(model, {k: v.clone() for k, v in start.items()}, data, ids, train, defenses, threat,
                            seed=cfg.seed, server_round=server_round, client_id=0, local_state=local_state)

    first = replay(1, saved[0], None)
    assert all(torch.equal(first.state[k], saved[1][k]) for k in saved[0])
    assert set(first.local_state) == local and any(not torch.equal(first.local_state[k], saved[0][k]) for k in local)
    second = replay(2, saved[1], first.local_state)
    assert all(torch.equal(second.state[k], saved[2][k]) for k in saved[0])  # bit-identical to the federation
    forgetful = replay(2, saved[1], None)
    assert not all(torch.equal(forgetful.state[k], saved[2][k]) for k in saved[0] if k not in local)


def test_mixup_trains_on_the_seeded_mixed_batch_and_leaves_the_sent_update_alone(cifar_test):
    import numpy as np

    cfg = TrainConfig(mode="fedsgd", lr=0.3, batch_size=4, num_samples=4)
    x, y = cifar_test.model_input(range(4)), cifar_test.label_tensor(range(4))
    model = build_model("lenet_zhu", 10, seed=1)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    mix = build_defense({"name": "mixup", "alpha": 0.4})
    out = local_train(model, x, y, cfg, step_schedule(cfg), defenses=(mix,), generator=torch.Generator().manual_seed(9),
                      num_classes=10)
    g = torch.Generator().manual_seed(9)  # the same draws, by hand
    lam = float(np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=g))).beta(0.4, 0.4))
    perm = torch.randperm(4, generator=g)
    assert 0.0 < lam < 1.0 and not torch.equal(perm, torch.arange(4))
    soft = torch.nn.functional.one_hot(y, 10).float()
    model.load_state_dict(start)
    loss = torch.nn.functional.cross_entropy(model(lam * x + (1 - lam) * x[perm]), lam * soft + (1 - lam) * soft[perm])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for (name, _), grad in zip(model.named_parameters(), grads):
        assert torch.allclose(out.state[name] - start[name], -0.3 * grad, atol=1e-7, rtol=1e-4), name
    model.load_state_dict(start)
    plain = local_train(model, x, y, cfg, step_schedule(cfg))
    assert not torch.allclose(plain.state["fc.weight"], out.state["fc.weight"])
    assert mix.apply({"w": torch.ones(3)}, ctx())["w"].equal(torch.ones(3))  # nothing changes on the way out


NOISY_CLIENT = """
import hashlib, numpy as np, torch
from fedsim.client import client_round
from fedsim.config import build_threat
from fedsim.data import ImageData
from fedsim.defenses import build_defense
from fedsim.models import build_model
from fedsim.training import TrainConfig
torch.manual_seed(0)
model = build_model("lenet_zhu", num_classes=10)
rng = np.random.default_rng(0)
data = ImageData(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), np.arange(4) % 10, 10, (0.5,) * 3, (0.25,) * 3)
defenses = [build_defense({"name": "gaussian_noise", "std": 0.1}), build_defense({"name": "randomk", "fraction": 0.5})]
reply = client_round(model, {k: v.clone() for k, v in model.state_dict().items()}, data, np.arange(4),
                     TrainConfig(mode="fedsgd", lr=0.1, epochs=1, batch_size=4, num_samples=4), defenses,
                     build_threat(defenses), seed=1, server_round=1, client_id=0)
print(hashlib.sha256(b"".join(reply.state[k].numpy().tobytes() for k in sorted(reply.state))).hexdigest())
"""


def test_randomised_defenses_give_the_same_update_in_every_process():
    """Noise is drawn layer by layer in the model's order: a process's string-hash seed (which orders sets) must
    not change which layer gets which draw."""
    import os
    import subprocess
    import sys

    digests = {subprocess.run([sys.executable, "-c", NOISY_CLIENT], check=True, capture_output=True, text=True,
                              env={**os.environ, "PYTHONHASHSEED": str(h)}).stdout.strip() for h in (1, 2, 3, 4)}
    assert len(digests) == 1, digests


def test_secure_aggregation_is_the_example_weighted_mean_for_unequal_counts():
    """Clients of 1, 3 and 6 examples: the one reply the server sees is sum(n_i w_i) / sum(n_i), checked against a
    hand sum in float64, with the total count, the count-weighted loss and the union of the samples."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from fedsim.protocol import ARRAYS, METRICS, SHARED, SIDE, read_side
    from flwr.serverapp.strategy import FedAvg

    from strategies.secure_aggregation import AGGREGATE_ID, SecureAggregation

    rng = np.random.default_rng(0)
    counts, losses = [1, 3, 6], [0.5, 1.0, 2.0]
    weights = [{"w": rng.normal(size=(4, 5)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32)}
               for _ in counts]
    contents = [RecordDict({ARRAYS: ArrayRecord({k: torch.from_numpy(v.copy()) for k, v in w.items()}),
                            METRICS: MetricRecord({"num-examples": n, "train-loss": loss}),
                            SHARED: ConfigRecord(),
                            SIDE: ConfigRecord({"partition-id": i, "sample-ids": list(range(10 * i, 10 * i + n)),
                                                "step-ids": []})})
                for i, (w, n, loss) in enumerate(zip(weights, counts, losses))]
    out = SecureAggregation(FedAvg(), {}).aggregate_content(contents)
    for key in ("w", "b"):
        hand = sum(n * w[key].astype(np.float64) for n, w in zip(counts, weights)) / sum(counts)
        np.testing.assert_allclose(out[ARRAYS][key].numpy(), hand, rtol=1e-6, atol=1e-7)
        assert not np.allclose(out[ARRAYS][key].numpy(), np.mean([w[key] for w in weights], axis=0), atol=1e-3)
    metrics = out[METRICS]
    assert metrics["num-examples"] == 10 and set(metrics) == {"num-examples", "train-loss"}
    assert metrics["train-loss"] == pytest.approx((0.5 * 1 + 1.0 * 3 + 2.0 * 6) / 10)
    audit = read_side(out, 1)
    assert audit.client_id == AGGREGATE_ID
    assert audit.sample_ids == (0, 10, 11, 12, 20, 21, 22, 23, 24, 25)


# ------------------------------------------------------------------------------------------------------------
# fedsim's defenses as Flower client mods (fedsim.mods)


@pytest.fixture
def in_a_flower_task(monkeypatch):
    """Real Flower Messages outside a run need the task's identity."""
    from flwr.supercore.task_identity import TaskIdentity

    for key, value in (("_run_id", 1), ("_node_id", 2), ("_task_id", 3)):
        monkeypatch.setattr(TaskIdentity, key, value)


def _train_exchange(rng):
    """A train message with a model (floats and an integer counter) and the client's reply to it."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    sent = {"conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
            "fc.bias": rng.normal(size=10).astype(np.float32), "bn.num_batches_tracked": np.array([5], np.int64)}
    new = {k: (v + rng.normal(scale=0.1, size=v.shape).astype(np.float32)) if v.dtype == np.float32 else v + 1
           for k, v in sent.items()}
    new["bn.num_batches_tracked"] = np.array([6], np.int64)
    msg = Message(RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(v.copy()) for k, v in sent.items()}),
                              "config": ConfigRecord({"lr": 0.1, "server-round": 3})}),
                  dst_node_id=2, message_type="train")

    def train(message, context):  # the ClientApp's train function the mod wraps
        return Message(RecordDict({"arrays": ArrayRecord({k: torch.from_numpy(v.copy()) for k, v in new.items()}),
                                   "metrics": MetricRecord({"num-examples": 4})}), reply_to=message)

    return sent, new, msg, train


def test_a_defense_mod_sends_the_sent_model_plus_the_defended_update(in_a_flower_task):
    from flwr.app import Context, RecordDict

    from fedsim import mods
    from fedsim.defenses import DefenseContext, build_defense

    sent, new, msg, train = _train_exchange(np.random.default_rng(0))
    context = Context(run_id=1, node_id=2, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
    reply = mods.topk(fraction=0.25)(msg, context, train)
    arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    assert list(arrays) == list(new)  # the reply's keys, in its order
    update = {k: torch.from_numpy(new[k] - sent[k]) for k in ("conv.weight", "fc.bias")}
    expected = build_defense({"name": "topk", "fraction": 0.25}).apply(update, DefenseContext(torch.Generator()))
    for key in update:  # the simulation's own top-k on the reply's update
        np.testing.assert_allclose(arrays[key], sent[key] + expected[key].numpy(), rtol=0, atol=1e-6)
        kept = np.count_nonzero(np.abs(arrays[key] - sent[key]) > 1e-7)
        assert kept == max(1, int(np.floor(0.25 * sent[key].size + 0.5)))
    assert arrays["bn.num_batches_tracked"] == 6 and arrays["bn.num_batches_tracked"].dtype == np.int64
    assert reply.content["metrics"]["num-examples"] == 4


def test_a_defense_mod_draws_from_its_seed_or_from_the_os(in_a_flower_task):
    from flwr.app import Context, RecordDict

    from fedsim import mods

    def defended(mod):
        _, _, msg, train = _train_exchange(np.random.default_rng(0))
        context = Context(run_id=1, node_id=2, node_config={"partition-id": 1}, state=RecordDict(), run_config={})
        return mod(msg, context, train).content["arrays"]["conv.weight"].numpy()

    assert np.array_equal(defended(mods.randomk(fraction=0.3, seed=7)), defended(mods.randomk(fraction=0.3, seed=7)))
    assert not np.array_equal(defended(mods.randomk(fraction=0.3, seed=7)),
                              defended(mods.randomk(fraction=0.3, seed=8)))
    assert not np.array_equal(defended(mods.gaussian_noise(std=0.1)), defended(mods.gaussian_noise(std=0.1)))


def test_a_defense_that_changes_training_is_refused_as_a_mod():
    from fedsim import mods

    for spec in ({"name": "mixup"}, {"name": "dp_sgd", "clip": 1.0, "noise_multiplier": 1.0}, {"name": "fedbn"},
                 {"name": "share_bn_stats"}):
        with pytest.raises(ValueError, match="cannot run as a mod"):
            mods.defense_mod(spec)
