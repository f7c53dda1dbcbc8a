"""Fused attention: the dispatch (which kernel for which backend, dtype and shape, and why not),
SegmentIds masks, splash attention in Pallas interpret mode against a float64 reference, and
cuDNN against XLA (only where an NVIDIA GPU is present; reported as skipped otherwise)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmflax import nn as lnn
from lmflax.nn import kernels
from lmflax.nn.kernels import Backend, SegmentIds
from tests.test_attention import reference_attention

H100 = Backend("gpu", cuda=True, compute_capability=(9, 0))
A100 = Backend("gpu", cuda=True, compute_capability=(8, 0))
TPU = Backend("tpu")
BF16 = jnp.bfloat16


def _shapes(B=2, T=1024, S=None, N=12, K=None, H=64, dtype=BF16):
    S = T if S is None else S
    K = N if K is None else K
    q = jax.ShapeDtypeStruct((B, T, N, H), dtype)
    kv = jax.ShapeDtypeStruct((B, S, K, H), dtype)
    return q, kv, kv


def _choose(backend, *, specs=None, **kw):
    shape_kw = {k: kw.pop(k) for k in list(kw) if k in ("B", "T", "S", "N", "K", "H", "dtype")}
    return kernels.choose(*_shapes(**shape_kw), backend=backend, specs=specs, **kw)


def test_auto_picks_the_backends_kernel():
    assert _choose(H100).implementation == "cudnn"
    assert _choose(H100, is_causal=True, K=4).implementation == "cudnn"  # GQA
    assert _choose(H100, dtype=jnp.float16, H=256).implementation == "cudnn"
    seg = SegmentIds.packed(jnp.ones((2, 1024), jnp.int32))
    assert _choose(H100, mask=seg, is_causal=True).implementation == "cudnn"
    assert _choose(TPU, is_causal=True).implementation == "splash"
    assert _choose(TPU, mask=seg, dtype=jnp.float32, K=1).implementation == "splash"
    cpu = _choose(Backend("cpu"))
    assert cpu.implementation == "xla"
    assert "no fused kernel for backend 'cpu'" in cpu.explain()


@pytest.mark.parametrize(
    ("backend", "kw", "reason"),
    [
        (H100, {"dtype": jnp.float32}, "dtype float32"),
        (H100, {"H": 12}, "head_dim 12 (must be a multiple of 8 and at most 256)"),
        (H100, {"H": 264}, "head_dim 264"),
        (A100, {"H": 192}, "at most 128"),
        (Backend("gpu", cuda=True, compute_capability=(7, 5)), {}, "compute capability 7.5"),
        (Backend("gpu", cuda=False), {}, "ROCm"),
        (H100, {"dropout_rate": 0.1}, "dropout_rate=0.1"),
        (H100, {"is_causal": True, "T": 8, "S": 16}, "top-left"),
        (H100, {"T": 7, "mask": np.ones((1, 1, 7, 7), bool)}, "odd q_len 7"),
        (TPU, {"bias": np.zeros((1, 12, 1024, 1024))}, "bias"),
        (TPU, {"mask": np.ones((1, 1, 1024, 1024), bool)}, "boolean mask array"),
        (TPU, {"T": 200}, "multiples of 128"),
        (TPU, {"dtype": jnp.float16}, "dtype float16"),
        (TPU, {"dropout_rate": 0.1}, "dropout_rate=0.1"),
        (TPU, {"is_causal": True, "T": 256, "S": 128}, "q_len 256 > kv_len 128"),
    ],
)
def test_falls_back_to_xla_naming_the_constraint(backend, kw, reason):
    choice = _choose(backend, **kw)
    assert choice.implementation == "xla"
    assert reason in choice.explain()
    # Asked for explicitly, the same call is refused with the same reason.
    name = "cudnn" if backend.platform == "gpu" else "splash"
    with pytest.raises(ValueError, match="cannot run this call"):
        _choose(backend, implementation=name, **kw)


def test_sharding_constraints():
    mesh = (("data", 2), ("fsdp", 1), ("tensor", 4))
    ok = {"batch": "data", "length": None, "heads": "tensor", "kv_heads": "tensor", "kv": None}
    tpu = Backend("tpu", mesh_shape=mesh)
    assert _choose(tpu, specs=ok, N=8, K=4).implementation == "splash"
    seq = _choose(tpu, specs={**ok, "length": "tensor"})
    assert seq.implementation == "xla" and "'length' axis is sharded" in seq.explain()
    heads = _choose(tpu, specs=ok, N=8, K=2)
    assert heads.implementation == "xla" and "do not split evenly" in heads.explain()


def test_dispatch_logs_why_at_debug_level(caplog):
    q = jax.ShapeDtypeStruct((1, 8, 2, 8), BF16)
    with caplog.at_level(logging.DEBUG, logger="lmflax.attention"):
        jax.eval_shape(lambda q: lnn.dot_product_attention(q, q, q, is_causal=True), q)
    assert "no fused kernel for backend 'cpu'" in caplog.text
    for impl, why in [("cudnn", "needs an NVIDIA GPU"), ("splash", "TPU")]:
        with pytest.raises(ValueError, match=why):
            jax.eval_shape(
                lambda q, i=impl: lnn.dot_product_attention(q, q, q, implementation=i), q
            )


def _packed_ids(rng, B, T, pad):
    """Contiguous documents 1, 2, ... per row, then `pad` positions of padding (0)."""
    ids = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T - pad), size=2, replace=False))
        ids[b, : T - pad] = 1 + np.searchsorted(cuts, np.arange(T - pad), side="right")
    return ids


def test_segment_ids_mask_matches_materialised_masks():
    rng = np.random.default_rng(0)
    B, T, N, H = 2, 12, 4, 8
    q, k, v = (rng.standard_normal((B, T, N, H)).astype(np.float32) for _ in range(3))
    ids = _packed_ids(rng, B, T, pad=3)
    seg = SegmentIds.packed(ids)
    np.testing.assert_array_equal(np.asarray(seg.to_mask()), np.asarray(lnn.segment_mask(ids)))
    attend = jax.jit(lambda q, k, v, m: lnn.dot_product_attention(q, k, v, mask=m, is_causal=True))
    causal = np.tril(np.ones((T, T), bool))
    want = reference_attention(q, k, v, np.asarray(lnn.segment_mask(ids)) & causal)
    np.testing.assert_allclose(np.asarray(attend(q, k, v, seg)), want, atol=1e-5)
    valid = np.arange(T)[None] < np.array([[T], [5]])
    pad = SegmentIds.padding(valid)
    want = np.broadcast_to(np.asarray(lnn.padding_mask(valid)), (B, 1, T, T))
    np.testing.assert_array_equal(np.asarray(pad.to_mask()), want)
    want = reference_attention(q, k, v, np.asarray(lnn.padding_mask(valid)) & causal)
    np.testing.assert_allclose(np.asarray(attend(q, k, v, pad)), want, atol=1e-5)


def test_splash_interpret_matches_reference_and_xla_gradients():
    """Splash attention (the TPU kernel) run by the Pallas interpreter on CPU: causal, packed
    documents with padding, GQA; outputs against float64, gradients against the XLA path."""
    rng = np.random.default_rng(1)
    B, T, N, K, H = 2, 256, 4, 2, 64
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k, v = (rng.standard_normal((B, T, K, H)).astype(np.float32) for _ in range(2))
    ids = _packed_ids(rng, B, T, pad=40)
    seg = SegmentIds.packed(ids)
    cot = rng.standard_normal((B, T, N, H)).astype(np.float32)

    def loss(fn, q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out * cot), out

    splash = lambda q, k, v: kernels.splash_attention(  # noqa: E731
        q, k, v, mask=seg, is_causal=True, interpret=True
    )
    xla = lambda q, k, v: lnn.dot_product_attention(  # noqa: E731
        q, k, v, mask=seg, is_causal=True, implementation="xla"
    )
    grad = lambda fn: jax.jit(jax.grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2), has_aux=True))  # noqa: E731
    (g_splash, out), (g_xla, _) = grad(splash)(q, k, v), grad(xla)(q, k, v)
    mask = np.asarray(lnn.segment_mask(ids)) & np.tril(np.ones((T, T), bool))
    np.testing.assert_allclose(np.asarray(out), reference_attention(q, k, v, mask), atol=2e-5)
    assert np.all(np.asarray(out)[:, T - 40 :] == 0.0)  # padding queries attend nothing
    for a, b in zip(g_splash, g_xla):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=1e-4)


def test_splash_interpret_padding_with_longer_keys():
    rng = np.random.default_rng(2)
    B, T, S, N, H = 2, 128, 256, 2, 32
    q = rng.standard_normal((B, T, N, H)).astype(np.float32)
    k, v = (rng.standard_normal((B, S, N, H)).astype(np.float32) for _ in range(2))
    valid = np.arange(S)[None] < np.array([[S], [150]])
    seg = SegmentIds.padding(valid, q_len=T)
    got = jax.jit(lambda q, k, v: kernels.splash_attention(q, k, v, mask=seg, interpret=True))(
        q, k, v
    )
    want = reference_attention(q, k, v, np.asarray(lnn.padding_mask(valid)))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def _nvidia_gpu() -> str | None:
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:
        return None
    return gpus[0].device_kind if kernels._local_gpu()[0] else None


@pytest.mark.skipif(
    _nvidia_gpu() is None,
    reason="needs an NVIDIA GPU (cuDNN flash attention); run with JAX_PLATFORMS=cuda",
)
@pytest.mark.parametrize("case", ["causal", "full", "packed_causal", "padding"])
def test_cudnn_matches_xla_on_gpu(case):
    """cuDNN flash attention against the XLA path in bf16: outputs and q/k/v gradients."""
    rng = np.random.default_rng(3)
    B, T, N, K, H = 4, 512, 8, 4, 64
    q = jnp.asarray(rng.standard_normal((B, T, N, H)), BF16)
    k, v = (jnp.asarray(rng.standard_normal((B, T, K, H)), BF16) for _ in range(2))
    cot = jnp.asarray(rng.standard_normal((B, T, N, H)), BF16)
    causal = case in ("causal", "packed_causal")
    mask = None
    if case == "packed_causal":
        mask = SegmentIds.packed(_packed_ids(rng, B, T, pad=64))
    elif case == "padding":
        mask = SegmentIds.padding(np.arange(T)[None] < rng.integers(T // 2, T + 1, (B, 1)))

    def run(impl):
        def f(q, k, v):
            out = lnn.dot_product_attention(
                q, k, v, mask=mask, is_causal=causal, implementation=impl
            )
            return jnp.sum(out.astype(jnp.float32) * cot.astype(jnp.float32)), out

        fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
        return fn, fn(q, k, v)

    fused_fn, ((_, out), grads) = run("cudnn")
    assert "__cudnn$fmha" in fused_fn.lower(q, k, v).as_text()
    _, ((_, ref), ref_grads) = run("xla")

    def rel(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-6)

    assert rel(out, ref) < 1e-2
    for g, r in zip(grads, ref_grads):
        assert rel(g, r) < 2e-2
