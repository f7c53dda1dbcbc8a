"""lmflax.core: the pure middle of training, no disk, clocks or logs.

losses.py   cross entropy (plain and chunked), metric sums, `finalize`
state.py    TrainState (step, params, optimizer state)
step.py     train_step / eval_step: pure, jit-able, sharding-agnostic
optim.py    the optax chain from `OptimizerConfig`
"""

from lmflax.core.losses import Metric, chunked_cross_entropy, cross_entropy, finalize
from lmflax.core.optim import decay_mask, make_optimizer, make_schedule
from lmflax.core.state import TrainState
from lmflax.core.step import eval_step, train_step

__all__ = [
    "Metric",
    "TrainState",
    "chunked_cross_entropy",
    "cross_entropy",
    "decay_mask",
    "eval_step",
    "finalize",
    "make_optimizer",
    "make_schedule",
    "train_step",
]
