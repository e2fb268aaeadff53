"""Training: builders from a config, the epoch loop, checkpoints and exact resume."""

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .loop import Preempted, RunDirError, TrainingError, evaluate_model, evaluate_split, load_run, prepare_run_dir, train

__all__ = ["train", "prepare_run_dir", "evaluate_split", "evaluate_model", "load_run", "load_checkpoint", "save_checkpoint",
           "CheckpointError", "Preempted", "RunDirError", "TrainingError"]
