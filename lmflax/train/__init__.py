"""lmflax.train: running training, with its side effects (disk, clocks, logs).

trainer.py     Trainer: task, mesh, shardings and state built from a config
loop.py        run(cfg, workdir): the training loop, resumable, preemption-safe
checkpoint.py  orbax checkpoints with checksums and retention
evaluation.py  evaluate / evaluate_split, metric tables
run.py         Run.open(workdir): a saved run read back
plan.py        parameters, FLOPs, compiled per-device memory, TPU/GPU targets
resolve.py     the one whole-config check before a run
metrics.py     metrics.jsonl, TensorBoard, the progress bar
"""

from lmflax.train.checkpoint import Checkpointer, CheckpointIntegrityError
from lmflax.train.checks import resolve
from lmflax.train.evaluation import evaluate, evaluate_split, format_table
from lmflax.train.loop import TrainingError, run
from lmflax.train.saved import NoRunError, Run
from lmflax.train.trainer import Trainer

__all__ = [
    "CheckpointIntegrityError",
    "Checkpointer",
    "NoRunError",
    "Run",
    "Trainer",
    "TrainingError",
    "evaluate",
    "evaluate_split",
    "format_table",
    "resolve",
    "run",
]
