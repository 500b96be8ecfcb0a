"""The attacker plugin's commands, added to ``fedsim`` through the ``fedsim.commands`` entry-point group:
``fedsim prior train`` trains a generative prior on public data and saves a checkpoint and a sample grid."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from fedsim.cli import THREADS_HELP, use_threads

prior_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Generative priors of the attacker (GIAS, GIML): train one on public data.")


@prior_app.command("train")
def train(
    dataset: str = typer.Option(..., "--dataset", help="cifar10, cifar100, or a path (.npz or image folder)."),
    output: Path = typer.Option(..., "--output", help="Checkpoint to write (.pt); the sample grid goes beside it."),
    split: str = typer.Option("train", "--split", help="Split of a named data set."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Resize every image to this side (power of "
                                             "two; default: as stored, 64 for image folders)."),
    epochs: int = typer.Option(20, "--epochs", min=1, help="Passes over the data set."),
    batch_size: int = typer.Option(64, "--batch-size", min=2, help="Mini-batch size."),
    lr: float = typer.Option(2e-4, "--lr", min=0.0, help="Adam learning rate of both networks (beta1 0.5)."),
    nz: int = typer.Option(100, "--nz", min=1, help="Latent size."),
    ngf: int = typer.Option(64, "--ngf", min=1, help="Generator width."),
    ndf: int = typer.Option(64, "--ndf", min=1, help="Discriminator width."),
    seed: int = typer.Option(0, "--seed", help="Initialisation, data-order and sample-grid seed."),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
) -> None:
    """Train a DCGAN prior (CPU is enough: minutes on a few thousand 32x32 images)."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fedsim.cli import _one_line, _user_errors, console, fail
    from fedsim.data import load_dataset
    from fedsim.results import save_grid

    from .generators import save_prior
    from .prior_training import steps_per_epoch, train_dcgan

    try:
        if output.suffix != ".pt":
            raise ValueError(f"--output {output}: expected a .pt file")
        use_threads(threads)
        data = load_dataset(dataset, split, image_size=image_size or 64)
        if image_size:
            data = data.resized(image_size)
        size = data.shape[1]
        if size < 8 or size & (size - 1):
            raise ValueError(f"--dataset {data.name}: images are {size}x{size}; the DCGAN prior needs a power of two")
        if len(data) < batch_size:
            raise ValueError(f"--batch-size {batch_size} exceeds the {len(data)} images of {data.name}")
    except _user_errors() as err:
        fail(_one_line(err))
    total = epochs * steps_per_epoch(len(data), batch_size)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[losses]}"), console=console) as bar:
        task = bar.add_task(f"DCGAN on {data.name}", total=total, losses="")

        def on_step(step: int, d_loss: float, g_loss: float) -> None:
            bar.update(task, completed=step, losses=f"D {d_loss:.3f}  G {g_loss:.3f}")

        generator, history = train_dcgan(data, epochs=epochs, batch_size=batch_size, lr=lr, nz=nz, ngf=ngf, ndf=ndf,
                                         seed=seed, on_step=on_step)
    save_prior(output, "dcgan", {"nz": nz, "ngf": ngf}, size, data.shape[0], generator, dataset=data.name,
               images=len(data), epochs=epochs, final_d_loss=history["d_loss"][-1],
               final_g_loss=history["g_loss"][-1])
    with torch.no_grad():
        samples = (generator(torch.randn(64, nz, generator=torch.Generator().manual_seed(seed))) + 1) / 2
    grid = output.with_name(output.stem + "_samples.png")
    save_grid(grid, None, [samples[i:i + 8] for i in range(0, 64, 8)])
    console.print(f"saved {output} and {grid} ({epochs} epochs on {len(data)} images of {data.name})")
