"""Training language models: configs, presets, the loop, evaluation and checkpoints."""

from xmoe.training.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from xmoe.training.config import TrainConfig, apply_overrides
from xmoe.training.evaluate import EvalResult, evaluate
from xmoe.training.presets import PRESETS, preset
from xmoe.training.trainer import TrainResult, load_model, train

__all__ = [
    "PRESETS",
    "Checkpoint",
    "CheckpointError",
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "apply_overrides",
    "evaluate",
    "load_checkpoint",
    "load_model",
    "preset",
    "save_checkpoint",
    "train",
]
