import numpy as np
import pytest
import torch

from fedsim.data import DataError, load_dataset, partition_indices
from fedsim.models import MODELS, build_model, count_parameters


def test_lenet_zhu_matches_dlg_parameter_count():
    assert count_parameters(build_model("lenet_zhu", 10)) == 15_826


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_victim_classifies_a_cifar_batch(name):
    model = build_model(name, 10, width=8)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_seeded_init_and_checkpoint_roundtrip(tmp_path):
    a, b = build_model("convnet", 10, width=8, seed=3), build_model("convnet", 10, width=8, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    path = tmp_path / "victim.pt"
    torch.save(a.state_dict(), path)
    c = build_model("convnet", 10, width=8, seed=4, checkpoint=path)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_npz_source_and_path_resolution(synthetic_npz):
    data = load_dataset(str(synthetic_npz))
    assert data.images.shape == (120, 32, 32, 3) and data.num_classes == 10
    x = data.model_input([0, 1])
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()


def test_missing_dataset_error_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSIM_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", "train", download_root=tmp_path / "dl")
    message = str(err.value)
    assert str(tmp_path) in message and "torchvision download" in message


def test_partitions_are_disjoint_complete_and_seeded():
    labels = np.arange(1000) % 10
    for scheme in ("iid", "dirichlet"):
        parts = partition_indices(labels, 8, scheme, alpha=0.3, seed=1)
        joined = np.concatenate(parts)
        assert len(joined) == len(np.unique(joined)) == 1000
        again = partition_indices(labels, 8, scheme, alpha=0.3, seed=1)
        assert all(np.array_equal(p, q) for p, q in zip(parts, again))
    iid = partition_indices(labels, 8, "iid", seed=1)
    assert {len(p) for p in iid} == {125}
    skewed = partition_indices(labels, 8, "dirichlet", alpha=0.1, seed=1)
    # label skew: with alpha 0.1 some client is dominated by few classes
    top_share = max(np.bincount(labels[p], minlength=10).max() / len(p) for p in skewed)
    assert top_share > 0.5


def test_shared_cifar_fixture_loads_in_official_order(cifar_test):
    assert cifar_test.images.shape == (200, 32, 32, 3)
    assert cifar_test.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


def test_ffhq_folder_with_feature_annotations(tmp_path, data_dir, caplog):
    """FFHQ images labelled by the ffhq-features-dataset json files; a face without an annotation is skipped."""
    from PIL import Image

    sample = np.load(data_dir / "ffhq64_sample_16.npz")
    folder = tmp_path / "ffhq" / "00000"  # FFHQ's own layout: thousands-folders of <id>.png
    folder.mkdir(parents=True)
    for image, fid in zip(sample["images"], sample["ffhq_ids"]):
        Image.fromarray(image).save(folder / f"{fid}.png")
    Image.fromarray(sample["images"][0]).save(folder / "99999.png")  # no annotation for this one
    with caplog.at_level("WARNING", logger="fedsim"):
        data = load_dataset("ffhq", path=tmp_path / "ffhq", annotations=data_dir / "ffhq_features_json", image_size=64)
    assert len(data) == 16 and data.shape == (3, 64, 64) and data.num_classes == 2
    assert list(data.extras["class_names"]) == ["female", "male"] and list(data.extras["skipped"]) == ["99999"]
    assert "1 faces without an annotation skipped: 99999" in caplog.text
    truth = dict(zip(sample["ffhq_ids"], sample["labels"]))
    assert [truth[i] for i in data.extras["ffhq_ids"]] == data.labels.tolist()
    assert np.array_equal(data.images[list(data.extras["ffhq_ids"]).index("00005")],
                          sample["images"][list(sample["ffhq_ids"]).index("00005")])  # PNG round trip, same size
    with pytest.raises(DataError, match="numeric"):
        load_dataset("ffhq", path=tmp_path / "ffhq", annotations=data_dir / "ffhq_features_json", attribute="age")
    with pytest.raises(DataError, match="needs data.path"):
        load_dataset("ffhq")
