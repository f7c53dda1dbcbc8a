"""lmflax.nn: Transformer building blocks as Flax Linen modules whose `apply` is a pure function.

Every parameter carries logical axis names (vocab, embed, heads, kv_heads, kv, mlp, positions,
norm, layers); activations are constrained with (batch, length, embed | heads | mlp). Map them to
mesh axes with `flax.linen.logical_axis_rules` (lmflax.parallel does it from the config).
`lmflax.nn.util` (dtypes, logically partitioned parameters, constraints) is public: models built
on these layers use it too.
"""

from lmflax.nn.attention import (
    IMPLEMENTATIONS,
    MultiHeadAttention,
    attention_weights,
    causal_mask,
    combine_masks,
    dot_product_attention,
    head_problems,
    padding_mask,
    segment_mask,
    weighted_values,
)
from lmflax.nn.blocks import (
    REMAT_POLICIES,
    Decoder,
    DecoderLayer,
    Encoder,
    EncoderLayer,
    StackConfig,
    decoder_mask,
    remat_policy,
    stack_layers,
    unstack_layers,
)
from lmflax.nn.embedding import Embed
from lmflax.nn.feedforward import ACTIVATIONS, FeedForward, activation_fn
from lmflax.nn.kernels import SegmentIds
from lmflax.nn.linear import Linear
from lmflax.nn.norms import NORMS, LayerNorm, RMSNorm, make_norm
from lmflax.nn.positional import (
    LearnedPositions,
    RopeScaling,
    apply_rope,
    rope_frequencies,
    sinusoidal_positions,
)
from lmflax.nn.util import DType, as_dtype, constrain, logical_param, unbox

__all__ = [
    "ACTIVATIONS",
    "IMPLEMENTATIONS",
    "NORMS",
    "REMAT_POLICIES",
    "DType",
    "Decoder",
    "DecoderLayer",
    "Embed",
    "Encoder",
    "EncoderLayer",
    "FeedForward",
    "LayerNorm",
    "LearnedPositions",
    "Linear",
    "MultiHeadAttention",
    "RMSNorm",
    "RopeScaling",
    "SegmentIds",
    "StackConfig",
    "activation_fn",
    "apply_rope",
    "as_dtype",
    "attention_weights",
    "causal_mask",
    "combine_masks",
    "constrain",
    "decoder_mask",
    "dot_product_attention",
    "head_problems",
    "logical_param",
    "make_norm",
    "padding_mask",
    "remat_policy",
    "rope_frequencies",
    "segment_mask",
    "sinusoidal_positions",
    "stack_layers",
    "unbox",
    "unstack_layers",
    "weighted_values",
]
