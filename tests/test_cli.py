"""The command line: one-line errors with exit code 2 and single-update mode (a killed run's results:
test_resume.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def fedsim(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "fedsim.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=timeout)


# Bad configs, flags, data files, checkpoints and devices: tests/test_bad_inputs.py (a corpus of 70 cases).


def test_missing_dataset_is_one_line(tmp_path):
    result = fedsim("run", "experiments/quickstart.toml", env={"FEDSIM_DATA_DIR": str(tmp_path),
                                                               "HOME": str(tmp_path)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not found; tried" in result.stderr


def test_single_update_mode_writes_metrics_and_grid(tmp_path, data_dir):
    out = tmp_path / "attack"
    result = fedsim("attack", "--model", "lenet_zhu", "--dataset", str(data_dir / "cifar10_test_0-199.npz"),
                    "--indices", "0-3", "--batch-size", "2", "--iterations", "40", "--output", str(out))
    assert result.returncode == 0, result.stderr
    frame = pd.read_parquet(out / "leakage.parquet")
    assert len(frame) == 2 and (frame.batch_size == 2).all() and (frame.status == "ok").all()
    assert (out / "grids" / "round_000.png").is_file()
    assert "PSNR" in result.stdout


@pytest.mark.ray
def test_train_victim_then_attack_the_trained_model(tmp_path, synthetic_npz):
    ckpt = tmp_path / "victim.pt"
    trained = fedsim("train-victim", "--model", "lenet_zhu", "--dataset", str(synthetic_npz), "--epochs", "1",
                     "--batch-size", "32", "--output", str(ckpt))
    assert trained.returncode == 0, trained.stderr
    assert ckpt.is_file() and "train accuracy" in trained.stdout
    out = tmp_path / "attack"
    result = fedsim("attack", "--dataset", str(synthetic_npz), "--indices", "0-1", "--iterations", "20",
                    "--trained", str(ckpt), "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert len(pd.read_parquet(out / "leakage.parquet")) == 2
    missing = fedsim("attack", "--dataset", str(synthetic_npz), "--trained", str(tmp_path / "nope.pt"))
    assert missing.returncode == 2 and "checkpoint not found" in missing.stderr and "Traceback" not in missing.stderr


def test_fedavg_updates_with_several_local_steps_are_attacked(tmp_path, data_dir):
    out = tmp_path / "fedavg"
    result = fedsim("attack", "--dataset", str(data_dir / "cifar10_test_0-199.npz"), "--indices", "0-3",
                    "--batch-size", "4", "--mode", "fedavg", "--epochs", "2", "--local-batch-size", "2",
                    "--lr", "0.01", "--labels", "known", "--iterations", "30", "--output", str(out))
    assert result.returncode == 0, result.stderr
    row = pd.read_parquet(out / "leakage.parquet").iloc[0]
    assert row.status == "ok" and row.batch_size == 4 and row.label_accuracy == 1.0 and row.label_method == "known"
    # the replayed 4-step client is fitted: measured 0.21 cosine distance at 1 iteration, 0.056 at 30
    assert row.update_cosine_distance < 0.1 and row.update_sign_agreement > 0.85


def test_every_option_of_every_command_says_what_it_does():
    """`fedsim COMMAND --help` explains each option; --attack lists the attacks a user can name."""
    import typer.main

    from fedsim.cli import add_plugin_commands, app

    add_plugin_commands()
    group = typer.main.get_command(app)
    commands = {name: cmd for name, cmd in group.commands.items()}
    for name, sub in list(commands.items()):
        if hasattr(sub, "commands"):  # a plugin's command group (fedsim prior train)
            commands.update({f"{name} {n}": c for n, c in sub.commands.items()})
            del commands[name]
    assert {"run", "attack", "train-victim", "experiment", "sweep", "report", "prior train"} <= set(commands)
    missing = [f"{name} {p.opts[0]}" for name, cmd in commands.items() for p in cmd.params
               if p.param_type_name == "option" and not p.help]
    assert not missing, missing
    from importlib.metadata import distribution

    own = [ep.name for ep in distribution("fedsim").entry_points if ep.group == "fedsim.attacks"]
    attack_help = next(p.help for p in commands["attack"].params if p.name == "attack_name")
    assert len(own) >= 10 and all(name in attack_help for name in own), attack_help
