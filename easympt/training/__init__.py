"""Fine-tuning: packed data, an optax trainer with orbax checkpoints and exact resume."""

from easympt.training.data import DataError, pack, read_examples, tokenize
from easympt.training.trainer import TrainConfig, Trainer, make_optimizer

__all__ = ["DataError", "TrainConfig", "Trainer", "make_optimizer", "pack", "read_examples", "tokenize"]
