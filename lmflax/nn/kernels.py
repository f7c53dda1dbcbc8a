"""Fused attention kernels and the dispatch that picks one for `dot_product_attention`.

`implementation=None` takes the fastest kernel whose constraints hold, else XLA:

- 'cudnn': cuDNN flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`
  on NVIDIA GPUs of compute capability >= 8.0: bfloat16/float16, head_dim a multiple of 8 up to
  256 (128 before Hopper), no attention dropout. Causal attention uses the kernel's causal mode;
  other masks (segment ids, padding, boolean arrays) reach it as an additive bias.
- 'splash': the Pallas splash-attention kernel on TPUs, run inside `shard_map` over the current
  mesh (Mosaic kernels are not partitioned automatically): sequence lengths multiples of 128,
  masks given as causal and/or segment ids (`SegmentIds`), no bias, no attention dropout.
- 'xla': the reference path in attention.py (float32 logits and softmax, any mask, bias, dropout).

When the automatic choice cannot use a kernel, the reason is logged at DEBUG level on the
'lmflax.attention' logger; asking for a kernel explicitly and breaking one of its constraints
raises a ValueError naming the constraint. `choose()` exposes the decision for tests and tools.

Masks can be given structurally as `SegmentIds` (packed rows and padding) so that kernels read
the ids instead of a materialised [B, T, S] mask; every path computes the same function.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger("lmflax.attention")

KERNELS = ("cudnn", "splash")
_SPLASH_BLOCKS = (512, 256, 128)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegmentIds:
    """An attention mask given by segment ids: query t of row b may attend key s iff
    q[b, t] == kv[b, s] != 0. q [B, T], kv [B, S] integer; 0 marks padding.

    `SegmentIds.packed(ids)` is self-attention within packed documents; `SegmentIds.padding(valid)`
    masks padding keys only (every query sees every real key, as `padding_mask` does). Pass one as
    `mask=` to `dot_product_attention` (or down a model's stack) and fused kernels take the ids
    directly; the XLA path materialises `to_mask()`.
    """

    q: jax.Array
    kv: jax.Array

    @classmethod
    def packed(cls, segment_ids: jax.Array) -> SegmentIds:
        """Self-attention inside each packed document: segment_ids [B, T], 0 = padding."""
        ids = jnp.asarray(segment_ids).astype(jnp.int32)
        return cls(ids, ids)

    @classmethod
    def padding(cls, kv_valid: jax.Array, q_len: int | None = None) -> SegmentIds:
        """Padding keys masked: kv_valid [B, S] (nonzero = real token); q_len defaults to S."""
        kv = (jnp.asarray(kv_valid) != 0).astype(jnp.int32)
        T = kv.shape[1] if q_len is None else q_len
        return cls(jnp.ones((kv.shape[0], T), jnp.int32), kv)

    def to_mask(self) -> jax.Array:
        """The boolean mask [B, 1, T, S] (True = may attend)."""
        same = self.q[:, :, None] == self.kv[:, None, :]
        return (same & (self.kv[:, None, :] != 0))[:, None]


def as_mask(mask: jax.Array | SegmentIds | None) -> jax.Array | None:
    """A boolean mask array from an array or `SegmentIds` (None stays None)."""
    if mask is None:
        return None
    if isinstance(mask, SegmentIds):
        return mask.to_mask()
    return jnp.asarray(mask).astype(bool)


# ---------------------------------------------------------------------------------------------
# Where we are running


@dataclasses.dataclass(frozen=True)
class Backend:
    """What the dispatch needs to know about the devices the computation is compiled for.

    platform: 'cpu', 'gpu' or 'tpu'. cuda: an NVIDIA GPU (not ROCm). compute_capability: (major,
    minor) of an NVIDIA GPU. mesh_shape: the current mesh's {axis: size} ({} without a mesh).
    """

    platform: str
    cuda: bool = False
    compute_capability: tuple[int, int] | None = None
    mesh_shape: tuple[tuple[str, int], ...] = ()


@functools.cache
def _local_gpu() -> tuple[bool, tuple[int, int] | None]:
    try:
        device = jax.devices("gpu")[0]
    except RuntimeError:
        return False, None
    version = str(getattr(device.client, "platform_version", "")).lower()
    cuda = "cuda" in version or "nvidia" in device.device_kind.lower()
    cc = getattr(device, "compute_capability", None)
    if cc is None:
        return cuda, None
    major, _, minor = str(cc).partition(".")
    return cuda, (int(major), int(minor or 0))


def current_backend() -> Backend:
    """The backend of the current mesh (`jax.set_mesh`, also an ahead-of-time TPU or GPU
    topology's), else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    shape: tuple[tuple[str, int], ...] = ()
    platform, kind = None, ""
    if not mesh.empty:
        shape = tuple(mesh.shape.items())
        device = getattr(mesh, "abstract_device", None)
        platform = getattr(device, "platform", None)
        kind = str(getattr(device, "device_kind", "") or "")
    platform = platform or jax.default_backend()
    if platform in ("gpu", "cuda", "rocm"):
        cuda, cc = _local_gpu()
        # An ahead-of-time topology's mesh names its GPU (device_kind 'NVIDIA H200') while this
        # machine may have none; the compute capability is then unknown (None).
        cuda = cuda or platform == "cuda" or "nvidia" in kind.lower()
        return Backend("gpu", cuda=cuda, compute_capability=cc, mesh_shape=shape)
    return Backend(platform, mesh_shape=shape)


def _activation_specs() -> dict[str, Any] | None:
    """Mesh axes of the attention activations under the current logical-axis rules, or None
    outside a mesh. Keys: batch, length, heads, kv_heads, kv (each None, a name or a tuple)."""
    if jax.sharding.get_abstract_mesh().empty:
        return None

    def axes(names: tuple[str, ...]) -> tuple[Any, ...]:
        # Resolved per array: rules use each mesh axis once per array, and q and k/v differ.
        spec = nn.logical_to_mesh_axes(names)
        return (None,) * len(names) if spec is None else tuple(spec) + (None,) * 4

    batch, length, heads, kv = axes(("batch", "length", "heads", "kv"))[:4]
    kv_heads = axes(("batch", "length", "kv_heads", "kv"))[2]
    return {"batch": batch, "length": length, "heads": heads, "kv_heads": kv_heads, "kv": kv}


def _axes_size(axes: Any, mesh_shape: dict[str, int]) -> int:
    if axes is None:
        return 1
    names = axes if isinstance(axes, tuple) else (axes,)
    return int(np.prod([mesh_shape.get(n, 1) for n in names]))


# ---------------------------------------------------------------------------------------------
# Constraints


def _sharding_problems(
    specs: dict[str, Any] | None, mesh_shape: dict[str, int], N: int, K: int
) -> list[str]:
    if specs is None:
        return []
    problems = []
    for name in ("length", "kv"):
        if _axes_size(specs[name], mesh_shape) > 1:
            problems.append(
                f"the attention activations' {name!r} axis is sharded over {specs[name]!r} "
                "(fused kernels need whole sequences and head dims per device)"
            )
    heads = _axes_size(specs["heads"], mesh_shape)
    if heads > 1 and (N % heads or K % heads or specs["heads"] != specs["kv_heads"]):
        problems.append(
            f"{N} query / {K} key-value heads do not split evenly over the heads' mesh axes "
            f"{specs['heads']!r} (size {heads})"
        )
    return problems


def cudnn_problems(
    q: Any,
    k: Any,
    v: Any,
    *,
    has_mask: bool,
    has_bias: bool,
    dropout_rate: float,
    is_causal: bool,
    backend: Backend,
) -> list[str]:
    """Why cuDNN flash attention cannot run this call (empty = it can). q/k/v: arrays or
    ShapeDtypeStructs in the [B, T, N, H] / [B, S, K, H] layout."""
    problems = []
    if backend.platform != "gpu" or not backend.cuda:
        what = "a ROCm GPU" if backend.platform == "gpu" else f"backend {backend.platform!r}"
        problems.append(f"{what}: cuDNN flash attention needs an NVIDIA GPU")
    cc = backend.compute_capability
    if backend.cuda and cc is not None and cc < (8, 0):
        problems.append(f"compute capability {cc[0]}.{cc[1]} < 8.0 (Ampere)")
    dtypes = {jnp.dtype(a.dtype) for a in (q, k, v)}
    if len(dtypes) > 1:
        problems.append(f"q/k/v dtypes differ: {sorted(str(d) for d in dtypes)}")
    dtype = jnp.dtype(q.dtype)
    if dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        problems.append(f"dtype {dtype} (cuDNN flash attention takes bfloat16 or float16)")
    H = q.shape[-1]
    h_max = 256 if cc is None or cc >= (9, 0) else 128
    if H % 8 or h_max < H:
        problems.append(f"head_dim {H} (must be a multiple of 8 and at most {h_max})")
    if dropout_rate > 0.0:
        problems.append(f"attention dropout_rate={dropout_rate} (the fused path has no dropout)")
    T, S = q.shape[1], k.shape[1]
    if is_causal and T != S:
        problems.append(
            f"causal attention with q_len {T} != kv_len {S} (cuDNN aligns the causal mask "
            "top-left, lmflax bottom-right)"
        )
    if (has_mask or has_bias) and (T % 2 or S % 2):
        problems.append(f"a mask or bias with odd q_len {T} or kv_len {S}")
    return problems


def splash_problems(
    q: Any,
    k: Any,
    v: Any,
    *,
    mask: Any,
    has_bias: bool,
    dropout_rate: float,
    is_causal: bool,
    backend: Backend,
) -> list[str]:
    """Why the splash kernel cannot run this call (empty = it can)."""
    problems = []
    if backend.platform != "tpu":
        problems.append(f"backend {backend.platform!r}: splash attention is a TPU (Mosaic) kernel")
    if has_bias:
        problems.append("an additive bias (splash attention takes none)")
    if mask is not None and not isinstance(mask, SegmentIds):
        problems.append(
            "a boolean mask array (splash takes causal and SegmentIds masks; pass SegmentIds)"
        )
    if dropout_rate > 0.0:
        problems.append(f"attention dropout_rate={dropout_rate} (the fused path has no dropout)")
    dtypes = {jnp.dtype(a.dtype) for a in (q, k, v)}
    if len(dtypes) > 1:
        problems.append(f"q/k/v dtypes differ: {sorted(str(d) for d in dtypes)}")
    if jnp.dtype(q.dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)):
        problems.append(f"dtype {jnp.dtype(q.dtype)} (splash takes bfloat16 or float32)")
    T, S = q.shape[1], k.shape[1]
    if T % 128 or S % 128:
        problems.append(f"q_len {T} and kv_len {S} must be multiples of 128")
    if is_causal and T > S:
        problems.append(f"causal attention with q_len {T} > kv_len {S} (rows with no key)")
    return problems


@dataclasses.dataclass(frozen=True)
class Choice:
    """The dispatch's decision: `implementation` runs; `rejected` maps each kernel considered
    and not taken to the constraints it broke."""

    implementation: str
    rejected: dict[str, list[str]]

    def explain(self) -> str:
        if not self.rejected:
            return f"attention: {self.implementation}"
        why = "; ".join(f"not {k}: {', '.join(v)}" for k, v in self.rejected.items())
        return f"attention: {self.implementation} ({why})"


def choose(
    q: Any,
    k: Any,
    v: Any,
    *,
    mask: Any = None,
    bias: Any = None,
    dropout_rate: float = 0.0,
    is_causal: bool = False,
    implementation: str | None = None,
    backend: Backend | None = None,
    specs: dict[str, Any] | None = None,
) -> Choice:
    """Which implementation runs `dot_product_attention` with these arguments.

    backend / specs default to the current ones (`current_backend()`, the logical-axis rules of
    the current mesh); pass them to ask about another machine. Raises ValueError when a kernel
    is requested explicitly but cannot run, naming the constraints it breaks.
    """
    if implementation == "xla":
        return Choice("xla", {})
    backend = current_backend() if backend is None else backend
    if specs is None:
        specs = _activation_specs()
    if implementation is None:
        if backend.platform == "gpu" and backend.cuda:
            candidates = ["cudnn"]
        elif backend.platform == "tpu":
            candidates = ["splash"]
        else:
            where = "a ROCm GPU" if backend.platform == "gpu" else f"backend {backend.platform!r}"
            return Choice("xla", {"fused": [f"no fused kernel for {where}"]})
    else:
        candidates = [implementation]
    rejected = {}
    N, K = q.shape[2], k.shape[2]
    shard = _sharding_problems(specs, dict(backend.mesh_shape), N, K)
    for name in candidates:
        if name == "cudnn":
            problems = cudnn_problems(
                q,
                k,
                v,
                has_mask=mask is not None,
                has_bias=bias is not None,
                dropout_rate=dropout_rate,
                is_causal=is_causal,
                backend=backend,
            )
        else:
            problems = splash_problems(
                q,
                k,
                v,
                mask=mask,
                has_bias=bias is not None,
                dropout_rate=dropout_rate,
                is_causal=is_causal,
                backend=backend,
            )
        problems += shard
        if not problems:
            return Choice(name, rejected)
        rejected[name] = problems
    if implementation is not None:
        raise ValueError(
            f"attention implementation {implementation!r} cannot run this call: "
            + "; ".join(rejected[implementation])
            + ". Use implementation=None to fall back to XLA automatically."
        )
    return Choice("xla", rejected)


# ---------------------------------------------------------------------------------------------
# The kernels


def _rows_with_keys(mask: jax.Array | None, is_causal: bool, T: int, S: int) -> jax.Array | None:
    """[B|1, T, N|1, 1] True where a query row may attend at least one key (None = all rows)."""
    if mask is None:
        return None  # causal rows always see their own position (T == S on the fused paths)
    visible = mask
    if is_causal:
        q_pos = jnp.arange(T)[:, None] + (S - T)
        visible = visible & (jnp.arange(S)[None, :] <= q_pos)[None, None]
    return jnp.any(visible, axis=-1).transpose(0, 2, 1)[..., None]


def cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | SegmentIds | None = None,
    bias: jax.Array | None = None,
    is_causal: bool = False,
) -> jax.Array:
    """cuDNN flash attention; same contract as `dot_product_attention` (NVIDIA GPUs only).

    Rows whose keys are all masked return zeros, as on the XLA path.
    """
    T, S = q.shape[1], k.shape[1]
    m = as_mask(mask)
    if m is not None:
        # cuDNN folds the mask into a bias that must span the whole [T, S] plane.
        m = jnp.broadcast_to(m, (*m.shape[:2], T, S))
    if bias is not None:
        bias = jnp.broadcast_to(bias, (*jnp.shape(bias)[:-2], T, S)).astype(q.dtype)
        bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    out = jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=m, is_causal=is_causal, implementation="cudnn"
    )
    has_keys = _rows_with_keys(m, is_causal, T, S)
    return out if has_keys is None else jnp.where(has_keys, out, jnp.zeros((), out.dtype))


def _block(length: int) -> int:
    return next(b for b in _SPLASH_BLOCKS if length % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(T: int, S: int, heads: int, is_causal: bool, interpret: bool) -> Any:
    # Deferred: the TPU Pallas kernels load Mosaic; only the splash path needs them.
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as splash_mask,
    )

    if is_causal:
        # Query t sits at position t + S - T of the keys (the XLA path's convention).
        one = splash_mask.CausalMask((T, S), offset=S - T)
    else:
        one = splash_mask.FullMask((T, S))
    bq, bkv = _block(T), _block(S)
    blocks = splash.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    return splash.make_splash_mha(
        splash_mask.MultiHeadMask([one] * heads),
        block_sizes=blocks,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: SegmentIds | None = None,
    is_causal: bool = False,
    interpret: bool = False,
) -> jax.Array:
    """Pallas splash attention; same contract as `dot_product_attention` with `mask` None or a
    `SegmentIds`. Under a mesh it runs per shard inside `shard_map` (batch over the 'batch' axes,
    heads over the 'heads' axes of the logical rules). interpret=True runs the kernel in Pallas's
    interpreter (any backend; slow) for testing.
    """
    # Deferred: the TPU Pallas kernels load Mosaic; only the splash path needs them.
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )

    if mask is not None and not isinstance(mask, SegmentIds):
        raise ValueError(
            f"splash attention takes mask=None or a SegmentIds, got {type(mask).__name__}"
        )
    B, T, _, H = q.shape
    S = k.shape[1]
    if mask is not None and (mask.q.shape != (B, T) or mask.kv.shape != (B, S)):
        raise ValueError(
            f"SegmentIds shapes {mask.q.shape} / {mask.kv.shape} do not match q_len {T} and "
            f"kv_len {S} with batch {B}"
        )
    scale = 1.0 / math.sqrt(H)

    def local(q: jax.Array, k: jax.Array, v: jax.Array, *seg: jax.Array) -> jax.Array:
        kernel = _splash_kernel(T, S, q.shape[2], is_causal, interpret)
        qt = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)  # [b, n, T, H]
        kt, vt = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        if seg:
            ids = splash.SegmentIds(q=seg[0], kv=seg[1])
            out = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=s))(qt, kt, vt, ids)
        else:
            out = jax.vmap(kernel)(qt, kt, vt)
        out = jnp.swapaxes(out, 1, 2)
        if seg:
            # Splash lets padding queries (id 0) attend padding keys; the XLA path gives them
            # no keys (zero output). Rows with no key of their own segment are zeroed.
            q_ids, kv_ids = seg
            same = (q_ids[:, :, None] == kv_ids[:, None, :]) & (kv_ids[:, None, :] != 0)
            if is_causal:
                q_pos = jnp.arange(T)[:, None] + (S - T)
                same = same & (jnp.arange(S)[None, :] <= q_pos)[None]
            out = jnp.where(jnp.any(same, -1)[:, :, None, None], out, jnp.zeros((), out.dtype))
        return out

    args = [q, k, v]
    if mask is not None:
        args += [mask.q.astype(jnp.int32), mask.kv.astype(jnp.int32)]
    specs = _activation_specs()
    if specs is None:
        return local(*args)
    P = jax.sharding.PartitionSpec
    q_spec = P(specs["batch"], None, specs["heads"], None)
    kv_spec = P(specs["batch"], None, specs["kv_heads"], None)
    seg_spec = P(specs["batch"], None)
    in_specs = (q_spec, kv_spec, kv_spec) + ((seg_spec, seg_spec) if mask is not None else ())
    return jax.shard_map(
        local,
        mesh=jax.sharding.get_abstract_mesh(),
        in_specs=in_specs,
        out_specs=q_spec,
        check_vma=False,
    )(*args)


def fused_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | SegmentIds | None,
    bias: jax.Array | None,
    dropout_rate: float,
    is_causal: bool,
    implementation: str | None,
) -> jax.Array | None:
    """The fused kernel's output when the dispatch picks one, else None (run the XLA path)."""
    choice = choose(
        q,
        k,
        v,
        mask=mask,
        bias=bias,
        dropout_rate=dropout_rate,
        is_causal=is_causal,
        implementation=implementation,
    )
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s; q %s k %s %s", choice.explain(), q.shape, k.shape, q.dtype)
    if choice.implementation == "cudnn":
        return cudnn_attention(q, k, v, mask=mask, bias=bias, is_causal=is_causal)
    if choice.implementation == "splash":
        return splash_attention(q, k, v, mask=mask, is_causal=is_causal)
    return None
