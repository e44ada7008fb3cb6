"""The monitor in a hand-written training loop, without Lightning: the way TransformerLens users
and most grokking papers train.

The modular-arithmetic MLP of :mod:`example_modules.modular_arithmetic` (p=29, hidden 512,
full-batch AdamW) trained by a plain PyTorch loop, watched by
:class:`~lightning_entk.Monitor`, writing TensorBoard logs through a
``torch.utils.tensorboard.SummaryWriter``. Five lines are the monitor's: make it, ``start``,
``step`` once an epoch, ``end``, print the summary.

One setting is not the default: this loop trains an epoch in about 3 ms, less than one reading
of the sentinel (about 5 ms: a forward pass and two Gram matrices). At its default share of the
training time (5%) the sentinel would read every 30 epochs or so, too seldom for a transition
that comes within 30 epochs of the first sign; ``Sentinel(share=1.0)`` lets it read every
epoch or two, which on this model costs well under a second. Under Lightning, where an epoch of
the same model takes about 30 ms, the default reads every few epochs.

    python -m example_modules.plain_loop                 # 200 epochs, logs in entk_runs/plain_loop
    python -m example_modules.plain_loop --epochs 120 --log-dir /tmp/entk
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.tensorboard import SummaryWriter

from example_modules.modular_arithmetic import ModularArithmeticDataModule, ModularArithmeticMLP
from lightning_entk import Monitor, Sentinel, draw_probe_set


def train(epochs: int = 200, log_dir: str = "entk_runs/plain_loop", seed: int = 0) -> Monitor:
    """Train the MLP for ``epochs`` full-batch epochs with the monitor on; return the monitor."""
    torch.manual_seed(seed)
    model = ModularArithmeticMLP()
    data = ModularArithmeticDataModule(seed=seed)
    (x, y), (x_val, y_val) = data.train_set.tensors, data.val_set.tensors
    optimizer = model.configure_optimizers()

    # The probe: training points and held-out validation points (what ENTKMonitor draws itself).
    probe = draw_probe_set(data.train_set, data.val_set, max_points=1024)
    monitor = Monitor(model, probe, sink=SummaryWriter(log_dir), sentinel=Sentinel(share=1.0))
    monitor.start()
    for epoch in range(1, epochs + 1):
        model.train()
        optimizer.zero_grad()
        model.loss(model(x), y).backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            val_acc = (model(x_val).argmax(1) == y_val).float().mean().item()
        monitor.step(step=epoch, epoch=epoch, metrics={"val_acc": val_acc})
    monitor.end(step=epochs, epoch=epochs)
    return monitor


def main(argv: list[str] | None = None) -> Monitor:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--log-dir", default="entk_runs/plain_loop")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    monitor = train(args.epochs, args.log_dir, args.seed)
    print(monitor.summary())
    return monitor


if __name__ == "__main__":
    main()
