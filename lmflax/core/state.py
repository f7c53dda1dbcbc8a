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
# (frozen, trainable, rng | None, deterministic) -> the model's parameters (LoRA's merge)
ParamsFn = Callable[[Any, Any, Any, bool], Any]


@struct.dataclass
class TrainState:
    """Arrays (step, params, opt_state, frozen) are pytree leaves; tx, loss_fn and schedule are
    static.

    `params` are what the optimizer trains. With LoRA (`model_params` set) they are the adapters
    and `frozen` the base model's weights, which no step changes; the model's parameters are
    `model_params(frozen, params, rng, deterministic)`, computed inside the loss. `save_frozen`:
    checkpoints hold `frozen` too (False when it is rebuilt from model.init_from instead).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    loss_fn: LossFn = struct.field(pytree_node=False)
    schedule: optax.Schedule = struct.field(pytree_node=False)
    grad_accum_steps: int = struct.field(pytree_node=False, default=1)
    frozen: Any = None
    model_params_fn: ParamsFn | None = struct.field(pytree_node=False, default=None)
    save_frozen: bool = struct.field(pytree_node=False, default=True)

    def arrays(self) -> dict[str, Any]:
        """What a checkpoint holds: {'step', 'params', 'opt_state'} (+ 'frozen' when the state
        has frozen weights that `save_frozen` says to keep)."""
        out = {"step": self.step, "params": self.params, "opt_state": self.opt_state}
        if self.frozen is not None and self.save_frozen:
            out["frozen"] = self.frozen
        return out

    def with_arrays(self, arrays: dict[str, Any]) -> TrainState:
        return self.replace(
            step=arrays["step"],
            params=arrays["params"],
            opt_state=arrays["opt_state"],
            frozen=arrays.get("frozen", self.frozen),
        )

    def model_params(
        self, params: Any = None, rng: jax.Array | None = None, deterministic: bool = True
    ) -> Any:
        """The model's parameter tree from the trainable `params` (default: this state's)."""
        params = self.params if params is None else params
        if self.model_params_fn is None:
            return params
        return self.model_params_fn(self.frozen, params, rng, deterministic)

    def loss(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array, deterministic: bool
    ) -> tuple[jax.Array, dict[str, Metric]]:
        """`loss_fn` of the trainable `params` (merged with the frozen weights first, if any)."""
        if self.model_params_fn is None:
            return self.loss_fn(params, batch, rng, deterministic)
        merged = self.model_params(params, jax.random.fold_in(rng, 0x10A), deterministic)
        return self.loss_fn(merged, batch, rng, deterministic)
