"""Training: builders from a config, the epoch loop, run folders, checkpoints and exact resume,
studies, and the distributed strategies."""

from ..eval.evaluate import evaluate_model, evaluate_split  # re-exported for one release: import from otmdr.eval
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .loop import Preempted, TrainingError, train
from .run_dir import RunDirError, load_run, prepare_run_dir

__all__ = ["train", "prepare_run_dir", "evaluate_split", "evaluate_model", "load_run", "load_checkpoint",
           "save_checkpoint", "CheckpointError", "Preempted", "RunDirError", "TrainingError"]
