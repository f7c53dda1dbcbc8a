"""Attention you can see: sown weights are a distribution over the allowed keys, zero on masked
ones, and exactly the weights that produce the output (unrolled, scanned and rematerialised
stacks, GPT and BERT); the pictures are PNGs of the requested size; the command draws them for a
trained checkpoint."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from lmflax import cli, viz
from lmflax import nn as lnn
from lmflax.models import PRESETS, BertModel
from lmflax.train.metrics import MetricWriter

from .conftest import jitted


def _mha_case():
    rng = np.random.default_rng(0)
    B, T, D = 2, 6, 16
    x = jnp.asarray(rng.standard_normal((B, T, D)), jnp.float32)
    valid = np.arange(T)[None, :] < np.array([[6], [3]])
    mask = lnn.padding_mask(jnp.asarray(valid))
    mha = lnn.MultiHeadAttention(num_heads=4, num_kv_heads=2)
    params = jitted(mha, "init")(jax.random.key(0), x, deterministic=True)
    return mha, params, x, valid, mask


def test_weights_are_off_by_default():
    mha, params, x, _, mask = _mha_case()
    assert set(params) == {"params"}  # init sows nothing
    out = jitted(mha)(params, x, mask=mask, deterministic=True)
    assert isinstance(out, jax.Array)


def test_sown_weights_are_distributions_over_allowed_keys_and_produce_the_output():
    mha, params, x, valid, mask = _mha_case()
    apply = jitted(mha)
    y_off = apply(params, x, mask=mask, is_causal=True, deterministic=True)
    y_on, state = apply(
        params, x, mask=mask, is_causal=True, deterministic=True, mutable=("intermediates",)
    )
    (w,) = state["intermediates"]["attention_weights"]
    w = np.asarray(w, np.float64)
    B, N, T, S = w.shape
    assert (B, N, T, S) == (2, 4, 6, 6)
    allowed = valid[:, None, None, :] & np.tril(np.ones((T, S), bool))[None, None]
    assert np.all(w >= 0)
    assert np.all(w[~np.broadcast_to(allowed, w.shape)] == 0)  # exactly zero on masked keys
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    # Sowing does not change the output.
    np.testing.assert_array_equal(np.asarray(y_on), np.asarray(y_off))
    # The output is these weights times the values, projected (float64, from the parameters).
    p = lnn.unbox(params)["params"]
    xv = np.asarray(x, np.float64)
    v = np.einsum("btd,dkh->btkh", xv, p["value"]["kernel"]) + p["value"]["bias"]
    v = np.repeat(v, N // v.shape[2], axis=2)  # query head n reads kv head n // (N/K)
    o = np.einsum("bnts,bsnh->btnh", w, v)
    y_ref = np.einsum("btnh,nhd->btd", o, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(np.asarray(y_on), y_ref, atol=2e-5)


def test_scanned_stack_sows_every_layer_like_the_unrolled_one():
    cfg = lnn.StackConfig(
        num_layers=3, d_model=16, num_heads=2, d_ff=32, dropout_rate=0.0, remat="full"
    )
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 16)), jnp.float32)
    seg = jnp.array([[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]])
    mask = lnn.decoder_mask(seg)
    unrolled = lnn.Decoder(cfg)
    scanned = lnn.Decoder(dataclasses.replace(cfg, scan_layers=True))
    params = jitted(unrolled, "init")(jax.random.key(0), x, mask=mask, deterministic=True)
    stacked = {"params": lnn.stack_layers(lnn.unbox(params["params"]))}
    outs, maps = [], []
    for model, p in ((unrolled, params), (scanned, stacked)):
        y, state = jitted(model)(p, x, mask=mask, deterministic=True, mutable=("intermediates",))
        outs.append(np.asarray(y))
        maps.append(viz.attention_maps(state["intermediates"]))
        np.testing.assert_array_equal(
            np.asarray(jitted(model)(p, x, mask=mask, deterministic=True)), outs[-1]
        )
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
    assert [n for n, _ in maps[1]] == [f"layers_{i}/attention" for i in range(3)]
    assert [n for n, _ in maps[0]] == [n for n, _ in maps[1]]
    for (_, a), (_, b) in zip(*maps):
        assert a.shape == (2, 2, 5, 5)
        np.testing.assert_allclose(a, b, atol=1e-6)
        # Attention stays inside a segment, is causal, and ignores padding.
        assert np.all(a[0, :, 3:, :3] == 0) and np.all(a[0, :, :3, 3:] == 0)
        assert np.all(np.triu(a[1, 0], 1) == 0) and np.all(a[1, :, :, 4] == 0)


def test_bert_sows_one_map_per_layer_and_ignores_padding():
    """A whole model, scanned: one [B, N, T, S] map per layer (GPT's go through the command
    test below)."""
    ids = jnp.array([[5, 6, 7, 8, 0, 0]])
    cfg = dataclasses.replace(PRESETS["bert_tiny"], d_model=32, d_ff=64, scan_layers=True)
    bert = BertModel(cfg)
    am = jnp.array([[1, 1, 1, 1, 0, 0]])
    params = jitted(bert, "init")(jax.random.key(0), ids, am, deterministic=True)["params"]
    _, maps = viz.run_with_attention(bert, params, ids, am)
    assert [n for n, _ in maps] == ["encoder/layers_0/attention", "encoder/layers_1/attention"]
    for _, w in maps:
        assert w.shape == (1, cfg.num_heads, 6, 6)
        assert np.all(w[..., 4:] == 0)  # padded keys
        np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)


def test_pictures_are_pngs_of_the_requested_size(tmp_path):
    w = np.random.default_rng(0).dirichlet(np.ones(5), size=5)
    tokens = ["def", " f", "(", "x", "):\n"]
    path = viz.plot_attention(w, tokens, tokens, tmp_path / "a.png", title="t", size=(640, 480))
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (640, 480)
        assert np.asarray(im.convert("L")).std() > 5  # something was drawn
    vecs = np.random.default_rng(1).standard_normal((6, 10))
    path = viz.plot_pca(vecs, list("abcdef"), tmp_path / "p.png", size=(500, 400))
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (500, 400)
    with pytest.raises(ValueError, match=r"need 5 query and 5 key tokens; got 4 and 5"):
        viz.plot_attention(w, tokens[:4], tokens, tmp_path / "x.png")


def test_pca_recovers_the_main_directions():
    rng = np.random.default_rng(0)
    t = rng.standard_normal(50)
    x = np.outer(t * 10, [1, 0, 0]) + np.outer(rng.standard_normal(50), [0, 1, 0]) + 0.01
    xy = viz.pca_2d(x)
    assert abs(np.corrcoef(xy[:, 0], t)[0, 1]) > 0.999
    np.testing.assert_allclose(xy.mean(0), 0.0, atol=1e-9)


@pytest.mark.slow
def test_command_draws_a_trained_gpt_checkpoint(data_dir, tmp_path, capsys, monkeypatch):
    from lmflax.config import load_config_file, override
    from lmflax.train import run

    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
    cfg, _ = load_config_file("gpt_tiny")
    cfg = override(
        cfg,
        {
            "model.num_layers": 2,
            "model.d_model": 32,
            "model.d_ff": 64,
            "model.num_heads": 2,
            "data.data_dir": data_dir,
            "data.seq_len": 32,
            "data.batch_size": 2,
            "data.eval_split": "",
            "train.steps": 2,
            "train.checkpoint_every": 0,
            "train.sample_tokens": 0,
            "train.progress": False,
        },
    )
    workdir = tmp_path / "run"
    run(cfg, workdir)
    out = tmp_path / "pics"
    args = ["--workdir", str(workdir), "--sentence", "def f(x): return x", "--out", str(out)]
    assert (
        cli.main(["viz", "attention", *args, "--layer", "all", "--head", "1", "--size", "320x240"])
        == 0
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "attention_layer0_head1.png",
        "attention_layer1_head1.png",
        "token_embeddings_pca.png",
    ]
    for p in out.iterdir():
        with Image.open(p) as im:
            assert im.size == (320, 240)
    assert str(out / "attention_layer0_head1.png") in capsys.readouterr().out
    # --layer=all without --head: every head of every layer, one grid
    assert cli.main(["viz", "attention", *args, "--layer", "all"]) == 0
    with Image.open(out / "attention_grid.png") as im:
        assert im.size == (640, 640)  # 2 layers x 2 heads: the 640x640 minimum
    # The run drew its own curves when it ended.
    with Image.open(workdir / "curves.png") as im:
        assert im.format == "PNG" and im.size == (1200, 420)
    assert cli.main(["viz", "attention", *args, "--head", "2"]) == 1
    assert "--head 2 is out of range: the model has 2" in capsys.readouterr().err


def test_the_attention_grid_has_a_cell_per_head_and_layer(tmp_path):
    rng = np.random.default_rng(0)
    tokens = list("abcde")
    maps = [(f"layers_{i}/attention", rng.dirichlet(np.ones(5), size=(4, 5))) for i in range(3)]
    fig = viz.attention_grid_figure(maps, tokens)
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(drawn) == 12 and [ax.get_title() for ax in fig.axes[:4]] == [
        f"head {h}" for h in range(4)
    ]
    np.testing.assert_allclose(drawn[5].images[0].get_array(), maps[1][1][1])  # layer 1, head 1
    path = viz.plot_attention_grid(maps, tokens, tmp_path / "g.png")
    with Image.open(path) as im:
        assert im.size == (4 * 180 + 120, 640)


def _write_run(workdir, lr, steps=6, eval_every=3):
    workdir.mkdir(parents=True)
    writer = MetricWriter(workdir, tensorboard=False)
    for step in range(1, steps + 1):
        writer.write(step, {"loss": 5.0 / step, "learning_rate": lr * step / steps})
        if step % eval_every == 0:
            ev = {"loss": 6.0 / step, "accuracy": step / 10}
            writer.write(step, ev, file="eval_metrics", prefix="eval/")
    writer.close()


def test_curves_compare_runs_with_one_line_per_run_and_metric(tmp_path):
    a, b = tmp_path / "lr_1e-3", tmp_path / "lr_3e-3"
    _write_run(a, 1e-3)
    _write_run(b, 3e-3, steps=4, eval_every=4)
    runs = {"a": viz.load_curves(a), "b": viz.load_curves(b)}
    fig = viz.curves_figure(runs)
    loss, lr, acc = fig.axes
    assert [ax.get_title() for ax in fig.axes] == ["loss", "learning rate", "eval accuracy"]
    assert [line.get_label() for line in loss.lines] == ["a train", "a eval", "b train", "b eval"]
    assert len(lr.lines) == 2 and len(acc.lines) == 2
    np.testing.assert_allclose(loss.lines[0].get_ydata(), [5.0 / s for s in range(1, 7)])
    np.testing.assert_allclose(loss.lines[1].get_xdata(), [3, 6])
    np.testing.assert_allclose(lr.lines[1].get_ydata()[-1], 3e-3)


def test_viz_curves_command_writes_the_png(tmp_path, capsys, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    _write_run(a, 1e-3)
    _write_run(b, 2e-3)
    assert cli.main(["viz", "curves", str(a)]) == 0
    with Image.open(a / "curves.png") as im:
        assert im.size == (1200, 420)
    out = tmp_path / "both.png"
    assert cli.main(["viz", "curves", str(a), str(b), f"--out={out}", "--size=800x300"]) == 0
    with Image.open(out) as im:
        assert im.size == (800, 300)
    assert str(out) in capsys.readouterr().out
    assert cli.main(["viz", "curves", str(a), str(tmp_path / "typo")]) == 2
    assert "no run in" in capsys.readouterr().err
