"""Issue 23: the FedAvg attack of Dimitrov et al. (per-epoch copies, epoch-order-invariant prior), label counts
averaged along the local trajectory, and ``auto`` label recovery that says what it ran."""

import numpy as np
import pytest
import torch

from attacker.engine import CandidateContext, epoch_invariant
from attacker.fedavg_leakage import copies_layout, fold_copies, mean_weights
from attacker.labels import model_probe, recover_labels_named
from fedsim.contract import build_attack
from fedsim.models import build_model
from fedsim.training import TrainConfig, float_state, local_train, step_schedule


def test_copies_layout_keeps_the_label_multiset_per_epoch_and_groups_by_label_or_position():
    labels = np.array([3, 8, 8, 0])
    arranged, groups = copies_layout(labels, 3, known_order=False, seed=5)
    for epoch in range(3):
        span = slice(4 * epoch, 4 * epoch + 4)
        assert sorted(arranged[span]) == sorted(labels)
        # a group is a label: equal labels, equal groups, in every epoch
        assert all((groups[span][i] == groups[span][j]) == (arranged[span][i] == arranged[span][j])
                   for i in range(4) for j in range(4))
    assert not all((arranged[:4] == arranged[4 * e:4 * e + 4]).all() for e in (1, 2))  # epochs are rearranged
    arranged, groups = copies_layout(labels, 2, known_order=True, seed=5)
    assert arranged.tolist() == [3, 8, 8, 0] * 2 and groups.tolist() == [0, 1, 2, 3] * 2


def test_epoch_invariant_prior_is_zero_exactly_when_every_epoch_holds_the_same_images_in_any_order():
    torch.manual_seed(0)
    images = torch.randn(4, 3, 8, 8)
    labels = np.array([1, 2, 2, 7])
    arranged, groups = copies_layout(labels, 3, known_order=False, seed=1)
    # copies of epoch e: the images whose labels the arrangement asks for, in that order
    copies = []
    for epoch in range(3):
        pool = {lab: [i for i in range(4) if labels[i] == lab] for lab in set(labels.tolist())}
        order = [pool[lab].pop(0) for lab in arranged[4 * epoch:4 * epoch + 4]]
        copies.append(images[order])
    x = torch.cat(copies)
    ctx = CandidateContext(None, {"copy_means": mean_weights(groups, 3)}, torch.zeros(()))
    assert float(epoch_invariant(x, ctx)) < 1e-12
    moved = x.clone()
    moved[5] += 0.5  # one copy of one epoch differs
    assert float(epoch_invariant(moved, ctx)) > 1e-3
    # folding matches each epoch's copies back to the first epoch's and returns the images themselves
    folded, folded_labels = fold_copies(x, torch.from_numpy(arranged), torch.from_numpy(groups), 3)
    order = [int((folded[i] - images).flatten(1).norm(dim=1).argmin()) for i in range(4)]
    assert sorted(order) == [0, 1, 2, 3]
    assert torch.allclose(folded, images[order], atol=1e-6)
    assert folded_labels.tolist() == [int(labels[i]) for i in order]


def test_fedavg_leakage_beats_replayed_inverting_gradients_on_shuffled_multi_epoch_updates(cifar_test, tmp_path):
    """Two FedAvg updates of 4 CIFAR-10 images (2 epochs x 2 shuffled batches of 2, LeNet(Zhu), lr 0.1), labels
    known, 300 iterations each: the per-epoch copies with the invariant prior recover clearly more than Inverting
    Gradients replaying the steps on one copy in a fixed order (measured +1.1 and +1.0 dB mean PSNR at seeds 0 and 1;
    the test asks for +0.5 dB on average and on each update's images no worse than 0.5 dB below)."""
    from fedsim.contract import ThreatModel
    from fedsim.single import SingleUpdateJob, run_single

    cfg = TrainConfig(mode="fedavg", lr=0.1, epochs=2, batch_size=2, num_samples=4, shuffle=True)
    psnr = {}
    for name in ("inverting_gradients", "fedavg_leakage"):
        attack = build_attack({"name": name, "iterations": 300})
        rows = run_single(SingleUpdateJob(cifar_test, "lenet_zhu", list(range(8)), 4, attack, cfg,
                                          threat=ThreatModel(labels="known")), tmp_path / name)
        assert all(r.status == "ok" and r.batch_size == 4 for r in rows)
        psnr[name] = np.array([r.psnr_mean for r in rows])
    gain = psnr["fedavg_leakage"] - psnr["inverting_gradients"]
    assert gain.mean() > 0.5 and gain.min() > -0.5, psnr


def _update(model, images, labels, cfg, seed=0):
    start = float_state(model)
    import copy

    out = local_train(copy.deepcopy(model), images, labels, cfg, step_schedule(cfg, np.random.default_rng(seed)))
    return {k: (out.state[k] - start[k]).numpy() for k in start}


def test_auto_label_method_names_what_it_ran_and_trajectory_probe_changes_only_multi_step_counts(cifar_test):
    model = build_model("convnet", 10, width=16, seed=0)
    ids = np.arange(16)
    x, y = cifar_test.model_input(ids), cifar_test.label_tensor(ids)
    one = TrainConfig(mode="fedsgd", lr=0.1, batch_size=1, num_samples=1)
    update = _update(model, x[:1], y[:1], one)
    labels, ran = recover_labels_named(update, 10, 1, "auto", lr=0.1, probe=model_probe(model, (3, 32, 32)))
    assert ran == "auto:idlg" and labels.tolist() == [int(y[0])]
    batch = TrainConfig(mode="fedsgd", lr=0.1, batch_size=8, num_samples=8)
    update = _update(model, x[:8], y[:8], batch)
    _, ran = recover_labels_named(update, 10, 8, "auto", lr=0.1, probe=model_probe(model, (3, 32, 32)))
    assert ran == "auto:count"
    _, ran = recover_labels_named(update, 10, 8, "auto", lr=0.1)  # no probe of the public model
    assert ran == "auto:llg"
    # one step: the probe along the trajectory is the probe at the sent weights
    start = model_probe(model, (3, 32, 32))()
    along = model_probe(model, (3, 32, 32), update=update, points=1)()
    assert torch.equal(start.mean_probs, along.mean_probs)
    # many steps: the mean prediction is averaged over the weights the client passed through
    fedavg = TrainConfig(mode="fedavg", lr=0.1, epochs=5, batch_size=4, num_samples=16, shuffle=True)
    update = _update(model, x, y, fedavg)
    along = model_probe(model, (3, 32, 32), update=update, points=8)()
    assert not torch.allclose(start.mean_probs, along.mean_probs, atol=1e-4)


@pytest.mark.parametrize("order", ["auto", "unknown"])
def test_fedavg_leakage_on_a_fedsgd_update_is_one_copy(order, cifar_test, tmp_path):
    """One local step: one epoch, one copy; the attack runs and reports the labels it recovered by name."""
    from fedsim.single import SingleUpdateJob, run_single

    attack = build_attack({"name": "fedavg_leakage", "iterations": 5, "order": order})
    rows = run_single(SingleUpdateJob(cifar_test, "lenet_zhu", [0, 1, 2, 3], 4, attack,
                                      TrainConfig(mode="fedsgd", lr=0.1, batch_size=4, num_samples=4)), tmp_path)
    assert [r.status for r in rows] == ["ok"] and rows[0].label_method == "auto:count"
