"""GPT-style decoder-only language model: token + position embeddings, causal stack, tied head."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from lmflax.models.config import ModelConfig, register_model_config
from lmflax.nn import (
    Decoder,
    Embed,
    LearnedPositions,
    Linear,
    SegmentIds,
    combine_masks,
    padding_mask,
    segment_mask,
    sinusoidal_positions,
)
from lmflax.nn.util import as_dtype, constrain


@register_model_config
@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTConfig(ModelConfig):
    """A decoder-only LM. Defaults are GPT-2's choices: pre-norm, gelu_tanh, learned positions,
    tied embeddings, residual projections initialised with std / sqrt(2 · layers)."""

    family = "gpt"
    activation: str = "gelu_tanh"
    norm_position: str = "pre"
    scale_residual_init: bool = True
    max_len: int = 1024


class GPT(nn.Module):
    """ids [B, T] -> logits [B, T, V] (or the final hidden states [B, T, D] with return_hidden).

    positions [B, T] default to 0..T-1; segment_ids [B, T] (packed rows, 0 = padding) keep
    attention inside each document. attention_mask [B, S] (1 = real token) hides padding keys:
    S = T in a full pass, or the whole cache with decode=True (left-padded prompts, see
    lmflax.decode). decode=True runs against the KV cache.
    """

    config: GPTConfig

    def setup(self) -> None:
        c = self.config
        self.token_embed = Embed(
            c.vocab_size, c.d_model, init_std=c.init_std, dtype=c.dtype, param_dtype=c.param_dtype
        )
        if c.position == "learned":
            self.position_embed = LearnedPositions(
                c.max_len, c.d_model, init_std=c.init_std, dtype=c.dtype, param_dtype=c.param_dtype
            )
        self.embed_dropout = nn.Dropout(c.dropout_rate)
        self.decoder = Decoder(c)
        if not c.tie_embeddings:
            self.lm_head = Linear(
                (c.vocab_size,),
                ("embed", "vocab"),
                use_bias=False,
                init_std=c.init_std,
                dtype=c.dtype,
                param_dtype=c.param_dtype,
            )

    def __call__(
        self,
        ids: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        deterministic: bool,
        decode: bool = False,
        return_hidden: bool = False,
    ) -> jax.Array:
        c = self.config
        # Default positions are the same in every row: look the table up once ([1, T, D]) so its
        # gradient is a sum over rows, not a scatter-add where B rows collide on each position.
        table_positions = jnp.arange(ids.shape[1]) if positions is None else positions
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        x = self.token_embed(ids)
        if c.position == "learned":
            x = x + self.position_embed(table_positions)
        elif c.position == "sinusoidal":
            x = x + jnp.take(sinusoidal_positions(c.max_len, c.d_model), positions, axis=0).astype(
                x.dtype
            )
        x = self.embed_dropout(x, deterministic=deterministic)
        x = constrain(x, ("batch", "length", "embed"))
        if attention_mask is None:
            # Segment ids stay ids (not a [B, T, T] mask) so fused attention kernels can read them.
            mask = SegmentIds.packed(segment_ids) if segment_ids is not None else None
        else:
            mask = combine_masks(
                segment_mask(segment_ids) if segment_ids is not None else None,
                padding_mask(attention_mask),
            )
        x = self.decoder(
            x, mask=mask, positions=positions, deterministic=deterministic, decode=decode
        )
        if return_hidden:
            return x
        return self.logits(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> logits [..., V] in the compute dtype."""
        if self.config.tie_embeddings:
            logits = self.token_embed.attend(hidden)
        else:
            logits = self.lm_head(hidden)
        return constrain(logits, ("batch", "length", "vocab")).astype(as_dtype(self.config.dtype))


PRESETS = {
    "gpt_tiny": GPTConfig(
        vocab_size=2048,
        num_layers=4,
        d_model=128,
        num_heads=4,
        d_ff=512,
        max_len=256,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
    ),
    # Llama 3's recipe at test size (what lmflax.hf loads LlamaForCausalLM as): rotary positions
    # with the 'llama3' rescaling, RMSNorm, SwiGLU without biases, grouped-query attention,
    # an untied output layer.
    "llama_tiny": GPTConfig(
        vocab_size=2048,
        num_layers=4,
        d_model=128,
        num_heads=4,
        num_kv_heads=2,
        d_ff=344,
        max_len=256,
        position="rope",
        rope_base=500000.0,
        rope_scaling="llama3",
        rope_scaling_factor=8.0,
        rope_original_max_len=64,
        norm="rmsnorm",
        activation="swiglu",
        use_bias=False,
        tie_embeddings=False,
        scale_residual_init=False,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
    ),
    "gpt2_small": GPTConfig(
        vocab_size=50304,
        num_layers=12,
        d_model=768,
        num_heads=12,
        d_ff=3072,
        max_len=1024,
        dropout_rate=0.1,
        attention_dropout_rate=0.1,
    ),
    "gpt2_medium": GPTConfig(
        vocab_size=50304,
        num_layers=24,
        d_model=1024,
        num_heads=16,
        d_ff=4096,
        max_len=1024,
    ),
    "gpt_1p3b": GPTConfig(
        vocab_size=50304,
        num_layers=24,
        d_model=2048,
        num_heads=16,
        d_ff=8192,
        max_len=2048,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
    ),
}
