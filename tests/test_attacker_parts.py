"""Engine parts: the simulated client update, batched gradients, objectives, labels, metrics."""

import numpy as np
import pytest
import torch
from torch import nn

from attacker.engine import (AttackEngine, EngineSpec, InversionProblem, OBJECTIVES, VictimSimulator,
                             total_variation)
from attacker.labels import recover_labels
from fedsim.metrics import label_accuracy, match, psnr, score
from fedsim.models import build_model
from fedsim.training import TrainConfig, float_state, local_train, step_schedule


def client_update(model, x, y, cfg):
    start = float_state(model)
    result = local_train(model, x, y, cfg, step_schedule(cfg))
    return {k: result.state[k] - start[k] for k, _ in model.named_parameters()}


@pytest.mark.parametrize("name,cfg", [
    ("lenet_zhu", TrainConfig(mode="fedsgd", lr=0.1, batch_size=2, num_samples=2)),
    ("lenet_zhu", TrainConfig(mode="fedavg", lr=0.05, epochs=3, batch_size=2, num_samples=4)),
    ("convnet", TrainConfig(mode="fedavg", lr=0.05, epochs=2, batch_size=2, num_samples=4)),
    ("convnet", TrainConfig(mode="fedavg", lr=0.05, epochs=2, batch_size=2, num_samples=4, bn_mode="eval")),
])
def test_simulator_replays_the_client_update_exactly(name, cfg):
    torch.manual_seed(0)
    model = build_model(name, 10, width=4)
    if cfg.bn_mode == "eval":  # non-trivial running statistics, as a public model after some rounds has
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2.0)
    x, y = torch.randn(cfg.num_samples, 3, 32, 32), torch.tensor([1, 7, 3, 3][: cfg.num_samples])
    sim = VictimSimulator(model, step_schedule(cfg), cfg.lr, bn_mode=cfg.bn_mode)
    expected = client_update(model, x, y, cfg)
    got = sim.update(x, y)
    for key in expected:
        assert torch.allclose(got[key], expected[key], atol=1e-6, rtol=1e-4), key


def test_vmap_and_loop_paths_give_the_gradients_of_hand_written_autograd():
    torch.manual_seed(0)
    model = build_model("lenet_zhu", 10)
    cfg = TrainConfig(lr=1.0)
    sim = VictimSimulator(model, step_schedule(cfg), cfg.lr)
    targets = {k: torch.randn(2, *v.shape) for k, v in sim.params.items()}
    labels = torch.tensor([[2], [5]])
    x = torch.randn(2, 3, 1, 3, 32, 32)
    vmap_step, _ = AttackEngine(EngineSpec(batching="vmap", restarts=3))._executors(
        InversionProblem(sim, targets, labels, (3, 32, 32), (0.5,) * 3, (0.5,) * 3), 6)
    loop_step, _ = AttackEngine(EngineSpec(batching="loop", restarts=3))._executors(
        InversionProblem(sim, targets, labels, (3, 32, 32), (0.5,) * 3, (0.5,) * 3), 6)
    aux, anchors = {"_": torch.zeros(2)}, torch.zeros_like(x)
    _, matching, grads = vmap_step({"x": x}, labels, targets, aux, anchors)
    _, loop_matching, loop_grads = loop_step({"x": x}, labels, targets, aux, anchors)
    grads, loop_grads = grads["x"], loop_grads["x"]
    assert torch.allclose(grads, loop_grads, atol=1e-5, rtol=1e-4)
    assert torch.allclose(matching, loop_matching, atol=1e-6)
    for p in range(2):
        for r in range(3):
            xi = x[p, r].clone().requires_grad_(True)
            params = [v.clone().requires_grad_(True) for v in sim.params.values()]
            names = list(sim.params)
            out = torch.func.functional_call(sim.model, dict(zip(names, params)), (xi,))
            g = torch.autograd.grad(nn.functional.cross_entropy(out, labels[p]), params, create_graph=True)
            t = [targets[k][p] for k in names]
            cos = 1 - sum((a * -b).sum() for a, b in zip(g, t)) / (
                sum(a.pow(2).sum() for a in g).sqrt() * sum(b.pow(2).sum() for b in t).sqrt())
            loss = cos + 1e-2 * total_variation(xi)
            (expected,) = torch.autograd.grad(loss, xi)
            assert torch.allclose(grads[p, r], expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_name,cfg,space,regs", [
    # BatchNorm ConvNet, two FedAvg steps, GradInversion's regularisers (BN statistics come from the update's forward)
    ("convnet", TrainConfig(mode="fedavg", lr=0.1, epochs=1, batch_size=2, num_samples=4), "pixels",
     (("tv", 1e-2), ("bn", 0.1), ("l2", 1e-3), ("group", 0.01))),
    # ResNet (residual adds, downsample BN) with feature matching on the classifier input
    ("resnet18", TrainConfig(lr=0.1, batch_size=2, num_samples=2), "pixels", (("features", 0.1), ("bn", 0.1))),
    # BatchNorm with the public model's fixed running statistics (Geiping's reference clients), two steps
    ("convnet", TrainConfig(mode="fedavg", lr=0.1, epochs=1, batch_size=2, num_samples=4, bn_mode="eval"), "pixels",
     (("tv", 1e-2), ("bn", 0.1))),
    # LeNet with DLG's soft labels searched jointly
    ("lenet_zhu", TrainConfig(lr=1.0), "pixels_and_labels", (("tv", 1e-2),)),
])
def test_batching_paths_give_the_same_losses_and_gradients(model_name, cfg, space, regs, float64):
    """vmap, and candidates side by side in the channel dimension (grouped convolutions, per-candidate BatchNorm),
    compute exactly what one-candidate-at-a-time autograd computes, for every part that reads the network. In float64:
    through two BatchNorm steps on batches of 2, float32 rounding alone moves single gradients by ~2%."""
    torch.manual_seed(0)
    model = build_model(model_name, 10, width=4)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5), module.running_var.uniform_(0.5, 2.0)
    sim = VictimSimulator(model, step_schedule(cfg), cfg.lr, bn_mode=cfg.bn_mode)
    batch, (P, R) = cfg.num_samples, (2, 3)
    true_x = torch.randn(batch, 3, 32, 32)
    aux = {f"bn.{m}.{i}": torch.stack([s[j], s[j] * 1.1]).detach()
           for i, s in enumerate(sim.bn_statistics(true_x)) for j, m in enumerate(("mean", "var"))}
    aux["features"] = torch.stack([sim.features(true_x)] * 2).detach()
    targets = {k: torch.randn(P, *v.shape) for k, v in sim.params.items()}
    labels = torch.tensor([[1, 7, 3, 3][:batch], [0, 2, 2, 9][:batch]])
    problem = InversionProblem(sim, targets, labels, (3, 32, 32), (0.5,) * 3, (0.5,) * 3, aux=aux)
    variables = {"x": torch.randn(P, R, batch, 3, 32, 32)}
    if space == "pixels_and_labels":
        variables["label_logits"] = torch.randn(P, R, batch, 10)
    anchors = torch.randn_like(variables["x"])
    out = {}
    for batching in ("loop", "stacked", "vmap"):
        spec = EngineSpec(objective="l2", regularizers=regs, search_space=space, batching=batching, restarts=R)
        step, _ = AttackEngine(spec)._executors(problem, P * R)
        out[batching] = step(variables, labels, targets, aux, anchors)
    loop_total, loop_matching, loop_grads = out["loop"]
    for batching in ("stacked", "vmap"):
        total, matching, grads = out[batching]
        assert torch.allclose(total, loop_total, rtol=1e-10, atol=1e-12), batching
        assert torch.allclose(matching, loop_matching, rtol=1e-10, atol=1e-12), batching
        for key in loop_grads:
            scale = loop_grads[key].abs().max()
            assert (grads[key] - loop_grads[key]).abs().max() <= 1e-9 * scale, (batching, key)
    assert AttackEngine.auto_batching(sim, 1) == "loop"
    assert AttackEngine.auto_batching(sim, P * R) == "stacked"
    many = AttackEngine.STACKED_MAX_CANDIDATES + 1  # grouped convolutions lose to vmap without BatchNorm
    assert AttackEngine.auto_batching(sim, many) == ("vmap" if model_name == "lenet_zhu" else "stacked")


def test_update_captures_the_first_steps_bn_statistics_and_classifier_input(float64):
    """What the regularisers read is taken from the simulated update's own first forward pass; check it against the
    network's layers applied by hand (first BatchNorm input, classifier input) and the stacked path's capture."""
    torch.manual_seed(0)
    model = build_model("convnet", 10, width=4)
    cfg = TrainConfig(mode="fedavg", lr=0.1, epochs=1, batch_size=2, num_samples=4)
    sim = VictimSimulator(model, step_schedule(cfg), cfg.lr)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 7, 3, 3])
    _, captured = sim.update_capturing(x, y, functional=False, capture=("bn", "features"))
    first = x[sim.schedule[0]]
    conv0 = model.features[0](first)
    var, mean = torch.var_mean(conv0, (0, 2, 3), unbiased=False)
    assert len(captured["bn"]) == 8
    assert torch.allclose(captured["bn"][0][0], mean, atol=1e-12) and torch.allclose(captured["bn"][0][1], var)
    model.train()
    assert torch.allclose(captured["features"], model.features(first).flatten(1), atol=1e-12)
    _, stacked = sim.stacked_update(torch.stack([x, x.flip(0)]), torch.stack([y, y.flip(0)]), ("bn", "features"))
    assert torch.allclose(stacked["bn"][3][1][0], captured["bn"][3][1], atol=1e-12)
    assert torch.allclose(stacked["features"][0], captured["features"], atol=1e-12)


def test_stacked_path_refuses_a_victim_it_cannot_stack():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 16), nn.LayerNorm(16), nn.Linear(16, 10))
    sim = VictimSimulator(model, step_schedule(TrainConfig(lr=1.0)), 1.0)
    problem = InversionProblem(sim, {k: torch.zeros(1, *v.shape) for k, v in sim.params.items()},
                               torch.tensor([[1]]), (3, 32, 32), (0.5,) * 3, (0.5,) * 3)
    assert not sim.stackable
    with pytest.raises(ValueError, match="stacked"):
        AttackEngine(EngineSpec(batching="stacked", restarts=2))._executors(problem, 2)


@pytest.mark.parametrize("batching", ["stacked", "loop"])
def test_compile_is_refused_off_the_vmap_step(batching):
    with pytest.raises(ValueError, match=f"batching '{batching}' cannot be compiled"):
        EngineSpec(batching=batching, compile=True)
    assert EngineSpec(batching="auto", compile=True).compile  # auto then runs vmap
    # The attack config refuses it at load time, naming the key.
    from pydantic import ValidationError
    from attacker.attacks import InvertingGradients
    with pytest.raises(ValidationError, match="compile"):
        InvertingGradients(batching=batching, compile=True)
    assert InvertingGradients(batching="vmap", compile=True).engine_spec().compile


def test_objectives_on_known_pairs():
    a = {"w": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0])}
    assert OBJECTIVES["cosine"](a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert OBJECTIVES["cosine"](a, {"w": torch.tensor([0.0, 1.0]), "b": torch.tensor([0.0])}).item() == pytest.approx(1.0)
    assert OBJECTIVES["cosine"](a, {"w": torch.tensor([-2.0, 0.0]), "b": torch.tensor([0.0])}).item() == pytest.approx(2.0)
    assert OBJECTIVES["l2"](a, {"w": torch.tensor([0.0, 2.0]), "b": torch.tensor([1.0])}).item() == pytest.approx(6.0)


def test_idlg_and_yin_recover_labels_from_updates():
    torch.manual_seed(0)
    model = build_model("lenet_zhu", 10)
    for label in range(10):
        upd = client_update(model, torch.randn(1, 3, 32, 32), torch.tensor([label]), TrainConfig(lr=0.1))
        assert recover_labels({k: v.numpy() for k, v in upd.items()}, 10, 1, "idlg").tolist() == [label]
    hits = 0
    for trial in range(5):
        labels = torch.randperm(10)[:4]
        model = build_model("lenet_zhu", 10, seed=trial)
        cfg = TrainConfig(lr=0.1, batch_size=4, num_samples=4)
        upd = client_update(model, torch.randn(4, 3, 32, 32), labels, cfg)
        got = recover_labels({k: v.numpy() for k, v in upd.items()}, 10, 4, "yin")
        hits += label_accuracy(got, labels.numpy())
    assert hits / 5 >= 0.9


def test_psnr_matching_and_label_accuracy():
    gt = torch.rand(4, 3, 8, 8)
    assert psnr(gt, gt.clone()).min() > 100  # identical images: MSE clamped at 1e-20 -> 200 dB
    noisy = (gt + 0.1 * torch.randn_like(gt)).clamp(0, 1)
    perm = torch.tensor([2, 0, 3, 1])
    assert match(noisy[perm], gt).tolist() == [1, 3, 0, 2]
    scores = score(noisy[perm], gt, np.array([1, 1, 2, 3]), np.array([1, 2, 2, 3]))
    assert scores.label_accuracy == pytest.approx(0.75)
    assert np.allclose(scores.psnr, psnr(noisy, gt).numpy(), atol=1e-4)


def test_lpips_without_backbone_weights_is_nan_with_one_warning(tmp_path, monkeypatch, caplog):
    """No download is attempted: without AlexNet's weights in the torch cache every LPIPS is NaN, said once."""
    from fedsim.metrics import LPIPSMetric

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty torch cache
    monkeypatch.setattr(LPIPSMetric, "_instance", None)
    a = torch.rand(3, 3, 32, 32)
    with caplog.at_level("WARNING", logger="fedsim"):
        values = [LPIPSMetric.shared()(a, a.flip(0)) for _ in range(3)]
    assert all(torch.isnan(v).all() and v.shape == (3,) for v in values)
    warnings = [r for r in caplog.records if "LPIPS reported as NaN" in r.getMessage()]
    assert len(warnings) == 1 and str(tmp_path) in warnings[0].getMessage()


def test_lpips_with_backbone_weights_measures_distance():
    """Where AlexNet's ImageNet weights are in the torch cache (they cannot be downloaded here): 0 for identical
    images, growing with the distortion, and lower for the nearer image."""
    from pathlib import Path

    from fedsim.metrics import ALEXNET_WEIGHTS, LPIPSMetric

    cached = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_WEIGHTS
    if not cached.is_file():
        pytest.skip(f"AlexNet weights are not at {cached} (no download here); LPIPS is NaN without them")
    metric = LPIPSMetric()
    torch.manual_seed(0)
    gt = torch.rand(4, 3, 32, 32)
    near, far = (gt + 0.05 * torch.randn_like(gt)).clamp(0, 1), (gt + 0.3 * torch.randn_like(gt)).clamp(0, 1)
    same, small, large = metric(gt, gt), metric(near, gt), metric(far, gt)
    assert same.abs().max() < 1e-5
    assert (small > 0).all() and (large > small).all() and torch.isfinite(large).all()


def test_inverting_gradients_reconstructs_a_real_image(cifar_test):
    from attacker.attacks import build_attack
    from fedsim.single import SingleUpdateJob, run_single

    job = SingleUpdateJob(cifar_test, "lenet_zhu", [0, 8], 1,
                          build_attack({"name": "inverting_gradients", "iterations": 300, "restarts": 2}),
                          TrainConfig(lr=0.1))
    import tempfile, pathlib
    rows = run_single(job, pathlib.Path(tempfile.mkdtemp()))
    assert all(r.status == "ok" and r.label_accuracy == 1.0 for r in rows)
    # 300 iterations of IG on untrained LeNet(Zhu) recover both images far above noise (~8-10 dB)
    assert min(r.psnr_mean for r in rows) > 17.0, [r.psnr_mean for r in rows]
    assert min(r.ssim_mean for r in rows) > 0.5
