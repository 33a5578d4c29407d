"""Synthetic recall data (MQAR) for zoo_jax."""

from zoo_jax.data.mqar import (
    IGNORE_INDEX,
    MQARDataset,
    build_dataset,
    epoch_batches,
    generate_mqar,
    steps_per_epoch,
    validate_mqar,
)

__all__ = [
    "IGNORE_INDEX",
    "MQARDataset",
    "build_dataset",
    "epoch_batches",
    "generate_mqar",
    "steps_per_epoch",
    "validate_mqar",
]
