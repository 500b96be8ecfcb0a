"""The paper-table runner: batches with distinct labels, markdown output, reuse of finished cases."""

import json

import numpy as np
import pandas as pd

from fedsim.experiment import distinct_label_order, run_experiment_file


def test_distinct_label_order_groups_without_repeats():
    labels = np.array([3, 3, 1, 1, 2, 5, 5, 7])
    order = distinct_label_order(list(range(8)), labels, 2)
    batches = [order[i:i + 2] for i in range(0, len(order), 2)]
    assert all(len({labels[i] for i in b}) == 2 for b in batches)
    assert len(set(order)) == len(order) == 8


def write_config(tmp_path, name, data, indices, cases):
    """An experiment on the synthetic dataset with one LeNet(Zhu) victim and the given [[cases]] TOML."""
    config = tmp_path / f"{name}.toml"
    config.write_text(f'''
name = "{name}"
title = "{name} table"
dataset = "{data}"
split = "train"
indices = "{indices}"
output_dir = "{tmp_path / 'runs'}"

[victims.lenet]
model = "lenet_zhu"
{cases}''')
    return config


def test_tiny_experiment_writes_a_table_and_reuses_finished_cases(tmp_path, synthetic_npz):
    config = write_config(tmp_path, "tiny", synthetic_npz, "0-3", '''
[[cases]]
name = "IG"
victim = "lenet"
attack = { name = "inverting_gradients", iterations = 5 }
paper = "18.00 ± 3.33"

[[cases]]
name = "DLG"
victim = "lenet"
batch_size = 2
distinct_labels = true
attack = { name = "dlg", iterations = 2, restarts = 2 }
''')
    logs: list[str] = []
    frame = run_experiment_file(config, log=logs.append)
    assert sorted(frame.case.unique()) == ["DLG", "IG"] and len(frame) == 4 + 2
    table = config.with_suffix(".md").read_text()
    assert "| IG | 4 |" in table and "18.00 ± 3.33" in table and "| DLG | 2 |" in table
    again = run_experiment_file(config, log=logs.append)
    assert sum("reused" in line for line in logs) == 2
    pd.testing.assert_frame_equal(frame.reset_index(drop=True), again.reset_index(drop=True))


def test_reuse_survives_a_new_default_field_but_not_a_changed_value(tmp_path, synthetic_npz):
    config = write_config(tmp_path, "grow", synthetic_npz, "0-1", '''
[[cases]]
name = "IG"
victim = "lenet"
attack = { name = "inverting_gradients", iterations = 3 }
''')
    logs: list[str] = []
    run_experiment_file(config, log=logs.append)
    stored = tmp_path / "runs" / "grow" / "ig" / "case.json"
    settings = json.loads(stored.read_text())
    # a case finished before ClientConfig had bn_mode: the field is missing from its stored settings
    del settings["case"]["client"]["bn_mode"]
    stored.write_text(json.dumps(settings))
    run_experiment_file(config, log=logs.append)
    assert logs[-1] == "IG: reused finished results"
    # a stored value that differs from the current one (here the default's value) forces a rerun
    settings["case"]["client"]["bn_mode"] = "eval"
    stored.write_text(json.dumps(settings))
    run_experiment_file(config, log=logs.append)
    assert "reused" not in logs[-1] and logs[-1].startswith("IG: PSNR")
    run_experiment_file(config, ["cases.0.attack.iterations=4"], log=logs.append)
    assert "reused" not in logs[-1]
    # a side study sent elsewhere with --set output_dir leaves the committed table alone
    committed = config.with_suffix(".md").read_text()
    run_experiment_file(config, [f"output_dir={tmp_path / 'side'}"], log=logs.append)
    assert config.with_suffix(".md").read_text() == committed
    assert "| IG | 2 |" in (tmp_path / "side" / "grow" / "grow.md").read_text()
