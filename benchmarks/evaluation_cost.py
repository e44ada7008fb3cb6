"""Where one full evaluation's time goes, on both demos, against one training epoch.

Per model (the demo's model at initialization and its probe as ``ENTKMonitor()`` draws it:
up to 1,024 points of the training and validation data), in a fresh process, each part timed
alone (median of 3 after a warm-up):

the kernel (with the parameter groups' kernels in the same engine call, and the whole kernel
alone), the whole kernel's eigenpairs or eigenvalues alone with its cliffs, its label signals
(kernel regression, alignments) and velocity, the groups' spectra and signals, the overlaps of
the eigenvectors with the ground-truth features, one evaluation's images and the summary
figure (drawn and written to TensorBoard), the scalars written; and ``evaluate`` whole with
every part (what each full evaluation was before, and the one at the end still is) and with
the whole kernel only (the first evaluation and the transition window's).

and one training epoch of the demo under Lightning (validation and logging included: the
epochs the issue counts), from a plain 40-epoch run.

    python benchmarks/evaluation_cost.py                  # both models, ~2 min
    python benchmarks/evaluation_cost.py --model mlp
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import statistics
import time

import torch

MODELS = ("mlp", "transformer")
REPEATS = 3


def timed(call, repeats: int = REPEATS) -> float:
    call()
    seconds = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - began)
    return statistics.median(seconds)


def breakdown(model_name: str, threads: int | None) -> dict:
    import tempfile

    import lightning as L
    from torch.utils.tensorboard import SummaryWriter

    from lightning_entk.evaluation import (
        evaluate,
        label_metrics,
        segment_overlaps,
        spectrum_and_cliffs,
    )
    from lightning_entk.kernel import empirical_ntk
    from lightning_entk.kernel.options import compute_dtype
    from lightning_entk.monitor import Monitor
    from lightning_entk.probe import DEFAULT_MAX_PROBE_POINTS, draw_probe_set
    from lightning_entk.signals import ROUND_OFF_RTOL, kernel_velocity

    if threads is not None:
        torch.set_num_threads(threads)
    if model_name == "mlp":
        from example_modules.modular_arithmetic import ModularArithmeticDataModule as Data
        from example_modules.modular_arithmetic import ModularArithmeticMLP as Model
    else:
        from example_modules.modular_transformer import ModularTransformer as Model
        from example_modules.modular_transformer import ModularTransformerDataModule as Data

    L.seed_everything(0, verbose=False)
    data = Data(seed=0)
    # One training epoch under Lightning, as the demo runs it.
    with tempfile.TemporaryDirectory() as log_dir:
        trainer = L.Trainer(
            max_epochs=40,
            logger=L.pytorch.loggers.TensorBoardLogger(log_dir),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=1,
        )
        network = Model()
        trainer.fit(network, datamodule=data)
        began = time.perf_counter()
        trainer.fit_loop.max_epochs = 80
        trainer.fit(network, datamodule=data)
        epoch = (time.perf_counter() - began) / 40

    model = network
    probe = draw_probe_set(data.train_set, data.val_set, DEFAULT_MAX_PROBE_POINTS)
    with tempfile.TemporaryDirectory() as log_dir:
        writer = SummaryWriter(log_dir)
        monitor = Monitor(model, probe, sink=writer)
        monitor.start()
        probe, options, features = monitor.probe, monitor.engine, monitor._features
        dtype = compute_dtype(model)
        rtol = ROUND_OFF_RTOL[dtype]
        whole_only = options.replace(groups=None)
        parts = {}
        parts["kernel, with the groups' (one engine call)"] = timed(
            lambda: empirical_ntk(model, probe.x, options=options)
        )
        parts["kernel, whole only"] = timed(
            lambda: empirical_ntk(model, probe.x, options=whole_only)
        )
        groups = empirical_ntk(model, probe.x, options=options)
        whole = sum(groups.values()).to(dtype)
        parts["eigenpairs (eigh) and cliffs"] = timed(
            lambda: spectrum_and_cliffs(whole, None, True)
        )
        parts["eigenvalues (eigvalsh) and cliffs"] = timed(lambda: spectrum_and_cliffs(whole, None))
        previous = whole.clone()
        parts["label signals and velocity"] = timed(
            lambda: (label_metrics(whole, probe, "trace", rtol), kernel_velocity(previous, whole))
        )

        def group_signals():
            for part in groups.values():
                spectrum_and_cliffs(part.to(dtype), None)
                label_metrics(part.to(dtype), probe, "trace", rtol)

        parts[f"{len(groups)} groups' spectra and signals"] = timed(group_signals)
        if features:
            spectrum, cliffs, _ = spectrum_and_cliffs(whole, None, True)
            parts["feature overlaps"] = timed(
                lambda: segment_overlaps(spectrum.eigenvectors, cliffs, features)
            )
        result = evaluate(model, probe, options=options, features=features)  # every part
        step = [1]

        def images():
            step[0] += 1
            monitor._draw_images(result, step[0])

        parts["one evaluation's images, drawn and written"] = timed(images, 3)
        parts["summary figure, drawn and written"] = timed(
            lambda: (setattr(monitor, "_summary", None), monitor._write_summary_figure(1)), 3
        )
        scalars = {k: v for k, v in monitor.history[-1].metrics.items() if k.startswith("entk/")}

        def logging():
            step[0] += 1
            monitor.sink.scalars(scalars, step[0])

        parts["scalars written"] = timed(logging)
        for label, detail in (
            ("whole evaluation, every part (the end's)", True),
            ("whole evaluation, whole kernel only (the first and the window's)", False),
        ):
            parts[label] = timed(
                lambda detail=detail: evaluate(
                    model, probe, options=options, features=features, detail=detail,
                    previous_kernel=previous,
                )
            )  # fmt: skip
        writer.close()
    return {
        "parts": parts,
        "epoch": epoch,
        "points": len(probe),
        "groups": list(groups),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "both"], default="both")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    print(f"torch {torch.__version__}")
    context = multiprocessing.get_context("spawn")
    for name in MODELS if args.model == "both" else (args.model,):
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
            r = pool.submit(breakdown, name, args.threads).result()
        epoch = r["epoch"]
        print(
            f"\n{name}: {r['points']} probe points, groups {', '.join(r['groups'])}; "
            f"{r['threads']} threads; one training epoch {1000 * epoch:.1f} ms\n"
        )
        print("| part | ms | training epochs |")
        print("|---|---|---|")
        for part, seconds in r["parts"].items():
            print(f"| {part} | {1000 * seconds:.0f} | {seconds / epoch:.1f} |")


if __name__ == "__main__":
    main()
