"""The train state: step, parameters, optimizer state, and (static) how to update them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import struct

from lmflax.core.losses import Metric

# (params, batch, rng, deterministic) -> (loss_sum, {name: (sum, count)})
LossFn = Callable[[Any, dict[str, jax.Array], jax.Array, bool], tuple[jax.Array, dict[str, Metric]]]


@struct.dataclass
class TrainState:
    """Arrays (step, params, opt_state) are pytree leaves; tx, loss_fn and schedule are static."""

    step: jax.Array
    params: Any
    opt_state: Any
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    loss_fn: LossFn = struct.field(pytree_node=False)
    schedule: optax.Schedule = struct.field(pytree_node=False)
    grad_accum_steps: int = struct.field(pytree_node=False, default=1)

    def arrays(self) -> dict[str, Any]:
        """What a checkpoint holds: {'step', 'params', 'opt_state'}."""
        return {"step": self.step, "params": self.params, "opt_state": self.opt_state}

    def with_arrays(self, arrays: dict[str, Any]) -> TrainState:
        return self.replace(
            step=arrays["step"], params=arrays["params"], opt_state=arrays["opt_state"]
        )
