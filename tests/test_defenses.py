import math

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
