"""A Trainer for tests: no logger, checkpoints, progress bar or model summary."""

import lightning as L


def quick_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
