"""Issue-3 engine parts: analytic recovery, batched L-BFGS, count labels, registration, BN fidelity, consensus."""

import numpy as np
import pytest
import torch
from kornia.geometry.transform import translate

from attacker.analytic import linear_input
from attacker.engine import (BatchedLBFGS, CandidateContext, OptimizerSpec, VictimSimulator, bn_fidelity, lazy_consensus, registered_consensus)
from attacker.labels import model_probe, recover_labels
from fedsim.metrics import label_accuracy
from attacker.registration import pixel_shift, register_translation
from fedsim.models import build_model
from fedsim.training import TrainConfig, float_state, local_train, step_schedule


def test_analytic_recovery_is_exact_on_a_fully_connected_network():
    torch.manual_seed(0)
    model = build_model("mlp", 10, width=256)
    x, y = torch.randn(1, 3, 32, 32), torch.tensor([4])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    first = model.net[1]
    gw, gb = torch.autograd.grad(loss, [first.weight, first.bias])
    recovered = linear_input(gw, gb)
    assert torch.allclose(recovered.float(), x.flatten(), atol=1e-5)
    # the classifier's input (features after the hidden ReLU) is recovered the same way
    last = model.net[-1]
    gw, gb = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), [last.weight, last.bias])
    features = model.net[:-1](x).flatten()
    assert torch.allclose(linear_input(gw, gb).float(), features, atol=1e-5)


@pytest.mark.parametrize("tolerance_change,line_search", [(1e-9, None), (1e-2, None), (1e-9, "strong_wolfe"),
                                                         (1e-2, "strong_wolfe")])
def test_batched_lbfgs_follows_torch_lbfgs_per_candidate(tolerance_change, line_search, float64):
    """Each candidate follows its own torch.optim.LBFGS run, with and without the strong-Wolfe line search (a
    quartic term makes the line search bracket and zoom). With tolerance_change 1e-2 candidates end steps early at
    different points (a stopping test ends the step, not the run: torch moves them again next step)."""
    torch.manual_seed(0)
    dim, problems, steps, max_iter = 6, 3, 4, 6
    A = [torch.randn(dim, dim) for _ in range(problems)]
    A = [a @ a.T * scale + torch.eye(dim) for a, scale in zip(A, (0.1, 1.0, 4.0))]
    b = [torch.randn(dim) for _ in range(problems)]
    start = torch.randn(problems, 1, dim)
    quartic = 0.0 if line_search is None else 0.5  # a fixed step of 0.5 diverges on the quartic

    def f(x, i):
        return 0.5 * x @ A[i] @ x - b[i] @ x + quartic * x.pow(4).sum()

    variables = {"x": start.clone().requires_grad_(True)}

    def closure():
        totals, grads = torch.zeros(problems, 1), torch.zeros_like(start)
        for i in range(problems):
            xi = variables["x"][i, 0].detach().requires_grad_(True)
            value = f(xi, i)
            grads[i, 0] = torch.autograd.grad(value, xi)[0]
            totals[i, 0] = value.detach()
        return totals, totals, {"x": grads}

    spec = OptimizerSpec(name="lbfgs", lr=0.5, max_iter=max_iter, history_size=4, line_search=line_search)
    ours = BatchedLBFGS(variables, spec, steps, tolerance_change=tolerance_change)
    for _ in range(steps):
        ours.step(closure)
    short_steps, reference_evaluations = 0, 0
    for i in range(problems):
        xi = start[i, 0].clone().requires_grad_(True)
        ref = torch.optim.LBFGS([xi], lr=0.5, max_iter=max_iter, history_size=4, tolerance_change=tolerance_change,
                                line_search_fn=line_search)
        calls = []

        def ref_closure():
            calls.append(1)
            ref.zero_grad()
            value = f(xi, i)
            value.backward()
            return value

        for _ in range(steps):
            before = len(calls)
            ref.step(ref_closure)
            short_steps += len(calls) - before < max_iter
        reference_evaluations = max(reference_evaluations, len(calls))
        assert torch.allclose(variables["x"][i, 0], xi.detach(), atol=1e-10), i
    assert ours.evaluations >= reference_evaluations  # one batched call serves every candidate's evaluation
    if line_search is not None and tolerance_change < 1e-3:
        assert reference_evaluations > steps * max_iter  # the line search took extra evaluations, as torch's
    if tolerance_change > 1e-3:
        assert short_steps >= problems  # early stops were exercised


def _update(model, x, y, lr=0.1):
    start = float_state(model)
    cfg = TrainConfig(lr=lr, batch_size=len(y), num_samples=len(y))
    result = local_train(model, x, y, cfg, step_schedule(cfg))
    return {k: (result.state[k] - start[k]).numpy() for k, _ in model.named_parameters()}, result


def test_count_method_recovers_repeated_labels(data_dir):
    from fedsim.data import load_dataset

    data = load_dataset("cifar10", "train")
    scores = {"yin": [], "count": []}
    for trial in range(4):
        labels = torch.tensor([1, 1, 1, 4, 4, 7, 9, 9])
        idx = [int(np.flatnonzero(data.labels == c)[trial * 3 + k]) for k, c in enumerate(labels.tolist())]
        model = build_model("convnet", 10, width=16, seed=trial)
        probe_model = build_model("convnet", 10, width=16, seed=trial)
        update, _ = _update(model, data.model_input(idx), labels)
        for method in scores:
            got = recover_labels(update, 10, 8, method, lr=0.1, probe=model_probe(probe_model, (3, 32, 32)))
            scores[method].append(label_accuracy(got, labels.numpy()))
    assert np.mean(scores["count"]) >= 0.9
    assert np.mean(scores["yin"]) <= 0.625  # distinct-label methods cannot express repeats (4 distinct of 8)


def test_ilrg_recovers_exact_counts_on_an_untrained_victim_at_batch_8(data_dir):
    """iLRG (Wang et al. 2023) recovers the exact number of images per class from one batch-averaged gradient of an
    untrained victim with repeated labels, where distinct-label methods cannot; LLG's heuristic gets most labels."""
    from fedsim.data import load_dataset

    data = load_dataset("cifar10", "train")
    rng = np.random.default_rng(0)
    scores = {"ilrg": [], "llg": [], "yin": []}
    for trial in range(4):
        labels = torch.tensor(sorted(rng.integers(0, 10, 8).tolist()))
        seen: dict[int, int] = {}
        idx = []
        for c in labels.tolist():
            idx.append(int(np.flatnonzero(data.labels == c)[trial * 40 + seen.get(c, 0)]))
            seen[c] = seen.get(c, 0) + 1
        update, _ = _update(build_model("convnet", 10, width=16, seed=trial), data.model_input(idx), labels)
        probe = model_probe(build_model("convnet", 10, width=16, seed=trial), (3, 32, 32))
        for method in scores:
            got = recover_labels(update, 10, 8, method, lr=0.1, probe=probe)
            scores[method].append(label_accuracy(got, labels.numpy()))
    assert scores["ilrg"] == [1.0] * 4, scores  # every count exact
    assert np.mean(scores["llg"]) >= 0.8 and np.mean(scores["yin"]) < 0.8, scores


def test_registration_recovers_a_known_shift(cifar_test):
    images = cifar_test.unit_tensor([0, 1, 2, 3])
    shifts = torch.tensor([[3.0, -2.0], [1.0, 1.0], [-2.0, 0.0], [0.0, 2.5]])
    moved = translate(images, shifts, padding_mode="border", align_corners=True)
    found = pixel_shift(register_translation(moved, images), 32, 32)
    assert torch.allclose(found, shifts, atol=0.35), found


def test_consensus_lazy_is_the_mean_and_registered_undoes_shifts(cifar_test):
    image = cifar_test.unit_tensor([5])[0]
    shifted = translate(image[None].repeat(4, 1, 1, 1), torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, -2.0], [-1.0, 1.0]]),
                        padding_mode="border", align_corners=True)
    x = shifted[None, :, None]  # P=1, R=4 restarts, B=1
    assert torch.allclose(lazy_consensus(x)[0, 2, 0], shifted.mean(0), atol=1e-6)
    registered = registered_consensus(x)
    # each restart's registered consensus sits where that restart is: much closer than the blurry lazy mean
    inner = (slice(None), slice(4, -4), slice(4, -4))
    err_reg = (registered[0, :, 0] - shifted)[:, inner[0], inner[1], inner[2]].abs().mean()
    err_lazy = (lazy_consensus(x)[0, :, 0] - shifted)[:, inner[0], inner[1], inner[2]].abs().mean()
    assert err_reg < 0.5 * err_lazy


def test_bn_fidelity_vanishes_at_the_true_batch_with_shared_statistics():
    torch.manual_seed(0)
    model = build_model("convnet", 10, width=4)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    _, result = _update(model, x, y)
    cfg = TrainConfig(lr=0.1, batch_size=2, num_samples=2)
    sim = VictimSimulator(build_model("convnet", 10, width=4), step_schedule(cfg), 0.1)
    aux = {}
    for i, layer in enumerate(sim.bn_layers):
        aux[f"bn.mean.{i}"], aux[f"bn.var.{i}"] = result.bn_stats[layer]
    ctx = CandidateContext(sim, aux, torch.zeros_like(x))
    assert bn_fidelity(x, ctx).item() < 1e-4
    assert bn_fidelity(torch.randn_like(x), ctx).item() > 0.1


def test_dlg_recovers_images_where_a_fixed_step_fails(cifar_test, tmp_path):
    """DLG as fedsim runs it (4 restarts, strong-Wolfe L-BFGS, joint labels) on CIFAR-10 test images 6 and 12, the
    two where fixed-step L-BFGS failed from most starts (5-7 dB after 300 steps): above 20 dB at a budget of 80
    steps (measured 25.8 and 24.3), every label right. With ``line_search = "none"`` the same budget stayed below
    15 dB when this test was written (checked once; not rerun here, it costs 40 s)."""
    from attacker.attacks import build_attack
    from fedsim.single import SingleUpdateJob, run_single

    attack = build_attack({"name": "dlg", "iterations": 80})
    assert attack.restarts == 4 and attack.labels == "joint" and attack.line_search == "strong_wolfe"
    rows = run_single(SingleUpdateJob(cifar_test, "lenet_zhu", [6, 12], 1, attack, TrainConfig(lr=0.1)), tmp_path)
    psnr = [row.psnr_mean for row in rows]
    assert all(r.status == "ok" and r.label_method == "joint" and r.label_accuracy == 1.0 for r in rows)
    assert min(psnr) > 20.0, psnr
    assert all(r.reported["label_acc_idlg"] == 1.0 and r.reported["label_acc_count"] == 1.0 for r in rows)


def observed_images(data, indices, threat=None):
    """Real FedSGD updates of single images as the server observes them (client id = image index)."""
    from dataclasses import replace

    from fedsim.client import client_round
    from fedsim.contract import ModelSpec, ServerView, ThreatModel
    from fedsim.protocol import read_reply, reply_content

    threat = threat or ThreatModel()
    model = build_model("lenet_zhu", 10, image_size=32, seed=0)
    state = float_state(model)
    view = ServerView(ModelSpec("lenet_zhu", 10, data.shape), (data.mean, data.std), threat)
    cfg = replace(TrainConfig(lr=0.1), num_samples=1, batch_size=1)
    out = []
    for i in indices:
        reply = client_round(model, state, data, np.asarray([i]), cfg, [], threat, seed=0, server_round=1,
                             client_id=i)
        out.append(view.observe(1, {k: v.numpy() for k, v in state.items()}, cfg.to_record(),
                                read_reply(reply_content(reply, i, state))))
    return out


@pytest.mark.parametrize("attack", [{"name": "inverting_gradients", "iterations": 25, "restarts": 2},
                                    {"name": "dlg", "iterations": 3, "max_iter": 5, "restarts": 2}])
@pytest.mark.parametrize("batching", ["stacked", "vmap", "loop"])
def test_an_updates_result_does_not_depend_on_the_updates_attacked_with_it(cifar_test, batching, attack):
    """Each update's draws follow its own identity (fedsim.seeds.update_seed), not its position in the call or in
    a chunk of it: the same update alone, with others, in another order, or chunked, gives the same images."""
    from attacker.attacks import build_attack
    from fedsim.contract import ThreatModel

    obs = observed_images(cifar_test, [0, 1, 2])
    alone = build_attack({**attack, "batching": batching}).reconstruct_many([obs[1]], ThreatModel(), seed=7)[0]
    together = build_attack({**attack, "batching": batching}).reconstruct_many(obs[::-1], ThreatModel(), seed=7)[1]
    chunked = build_attack({**attack, "batching": batching, "max_parallel": 2}).reconstruct_many(
        obs, ThreatModel(), seed=7)[1]  # one update per chunk: image 1 runs first in the second chunk
    for other in (together, chunked):
        assert np.abs(other.images - alone.images).max() < 1e-4
    if batching == "loop":  # the call's seed still matters
        other_seed = build_attack({**attack, "batching": batching}).reconstruct_many([obs[1]], ThreatModel(), seed=8)[0]
        assert np.abs(other_seed.images - alone.images).max() > 1e-2
