"""What splitting the kernel across processes saves: one ENTKMonitor evaluation of the modular
transformer (p=29, eNTK of every parameter), in one process and under ``ddp_spawn`` with two,
each process on one CPU thread (so that two processes on a 2-core machine do not compete for
the same cores, as two GPUs would not). ``--mode trace`` (the default): all 841 pairs, each
rank computing its share of the output projections. ``--mode flatten``: a probe of 150 pairs
(4350 kernel rows), each rank computing the rows of its share of the points.

Each run trains 6 epochs with an evaluation at initialization and after every epoch, and logs
``entk/seconds`` (every rank's part of the kernel, the gather, and rank 0's spectrum, cliffs
and metrics) to a CSV logger read back here; the first evaluation is left out (warm-up). The
last columns time one rank's part of the kernel alone (1/world_size of the output
projections, or of the kernel rows), the work that the split divides.

``--d-model`` and ``--d-mlp`` widen the transformer (the paper's 64 and 256 by default), so
that the kernel, which the split divides, outweighs rank 0's spectrum, which it does not.

    python benchmarks/ddp_split.py
    python benchmarks/ddp_split.py --mode flatten
    python benchmarks/ddp_split.py --d-model 256 --d-mlp 1024
"""

from __future__ import annotations

import argparse
import csv
import functools
import multiprocessing
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported, here and in spawned workers

import lightning as L
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger

from example_modules.modular_transformer import ModularTransformer, ModularTransformerDataModule
from lightning_entk import ENTKMonitor, KernelOptions, empirical_ntk

EPOCHS = 6
PROBE_POINTS = {"trace": 841, "flatten": 150}
DATA = {"p": 29, "train_fraction": 0.5, "batch_size": 64}  # the paper's notebook setup


class ReleaseProcessGroupAtExit(Callback):
    """Spawned workers leave through ``os._exit``, which skips Lightning's teardown of the gloo
    group (then the worker can abort at exit); destroy it in the workers' multiprocessing
    finalizers instead."""

    def setup(self, trainer, pl_module, stage):
        if torch.distributed.is_initialized():
            multiprocessing.util.Finalize(
                None, torch.distributed.destroy_process_group, exitpriority=100
            )


def evaluation_seconds(devices: int, mode: str, widths: dict) -> list[float]:
    """``entk/seconds`` of every evaluation of a run on ``devices`` processes."""
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as log_dir:
        trainer = L.Trainer(
            max_epochs=EPOCHS,
            accelerator="cpu",
            devices=devices,
            strategy="ddp_spawn" if devices > 1 else "auto",
            callbacks=[
                ENTKMonitor(
                    every_n_epochs=1,
                    mode=mode,
                    max_probe_points=PROBE_POINTS[mode],
                    kernel=KernelOptions(),  # no groups: several processes log none
                    sentinel=False,  # the full evaluation is what is split
                    image_every_n_evaluations=0,
                ),
                ReleaseProcessGroupAtExit(),
            ],
            logger=CSVLogger(log_dir, name="run"),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = ModularTransformerDataModule(**DATA)
            trainer.fit(ModularTransformer(**widths), datamodule=data)
        rows = csv.DictReader((Path(log_dir) / "run" / "version_0" / "metrics.csv").open())
        return [float(r["entk/seconds"]) for r in rows if r.get("entk/seconds")]


def kernel_part_seconds(world: int, mode: str, widths: dict, repeats: int = 3) -> float:
    """Median time of one rank's part of the kernel on the transformer at initialization, in
    this process: its 1/world of the output projections (``trace``) or of the kernel rows
    (``flatten``)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ModularTransformer(**widths)
    x, _ = ModularTransformerDataModule(**DATA).grid()
    x = x[: PROBE_POINTS[mode]]
    if mode == "trace":
        columns = torch.eye(model.p).tensor_split(world, dim=1)[0]
        part = functools.partial(empirical_ntk, model, x, output_projections=columns)
    else:
        rows = x.tensor_split(world)[0]
        part = functools.partial(empirical_ntk, model, rows, x, mode="flatten")
    seconds = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        part()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["trace", "flatten"], default="trace")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--d-mlp", type=int, default=256)
    args = parser.parse_args()
    mode, widths = args.mode, {"p": DATA["p"], "d_model": args.d_model, "d_mlp": args.d_mlp}
    parameters = sum(p.numel() for p in ModularTransformer(**widths).parameters())
    print(f"mode {mode}, {PROBE_POINTS[mode]} probe points, {parameters} parameters")
    print(
        f"{'processes':>9}{'evaluations':>13}{'median s':>10}{'speed-up':>10}"
        f"{'kernel part s':>15}{'speed-up':>10}"
    )
    one = one_part = None
    for devices in (1, 2):
        seconds = evaluation_seconds(devices, mode, widths)[1:]
        median, part = statistics.median(seconds), kernel_part_seconds(devices, mode, widths)
        one, one_part = one or median, one_part or part
        print(
            f"{devices:>9}{len(seconds):>13}{median:>10.2f}{one / median:>10.2f}"
            f"{part:>15.2f}{one_part / part:>10.2f}"
        )


if __name__ == "__main__":
    main()
