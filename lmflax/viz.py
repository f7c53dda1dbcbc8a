"""Pictures of what a model learned: attention heatmaps and 2-D projections of word vectors.

  lmflax viz attention --workdir=runs/gpt_tiny --sentence="def add(a, b): return a + b"
  lmflax viz attention --workdir=runs/word2vec --words=list,tuple,dict,str,int,float,bytes

The functions here draw from arrays (`plot_attention`, `plot_pca`, `run_with_attention`);
`lmflax.cli.viz` opens a run and picks what to draw: for a Transformer run it writes one heatmap PNG per chosen layer and head (queries down, keys
across, tokens on both axes) and a PCA projection of the sentence's token embeddings; for a
word2vec run, the PCA projection of the chosen words' vectors. Drawing uses matplotlib's Agg
backend (no display). Attention weights come from the modules' 'intermediates' (see
`lmflax.nn.MultiHeadAttention`), so they are exactly the weights that produced the output.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Collecting attention weights


def attention_maps(intermediates: Any) -> list[tuple[str, np.ndarray]]:
    """Every sown attention_weights in an 'intermediates' tree as (layer name, [B, N, T, S]),
    in layer order. A scanned stack's [L, B, N, T, S] entry becomes L entries, 'layers_0'..."""
    found: list[tuple[tuple[str, ...], np.ndarray]] = []

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, dict) or hasattr(node, "items"):
            for key, value in node.items():
                if key == "attention_weights":
                    arr = np.asarray(jax.device_get(value[0]))
                    if "layers" in path and arr.ndim == 5:
                        i = path.index("layers")
                        for l in range(arr.shape[0]):
                            found.append(((*path[:i], f"layers_{l}", *path[i + 1 :]), arr[l]))
                    else:
                        found.append((path, arr))
                else:
                    walk(value, (*path, str(key)))

    walk(intermediates, ())

    def order(item: tuple[tuple[str, ...], np.ndarray]) -> tuple:
        return tuple((int(p[7:]), "") if p.startswith("layers_") else (-1, p) for p in item[0])

    found.sort(key=order)
    return [("/".join(p), a) for p, a in found]


def run_with_attention(model: Any, params: Any, *args: jax.Array) -> tuple[Any, list]:
    """model.apply(params, *args, deterministic=True) with the attention weights sown, compiled:
    (output, attention_maps(...))."""

    def apply(params: Any, *args: jax.Array) -> Any:
        return model.apply({"params": params}, *args, deterministic=True, mutable=["intermediates"])

    out, state = jax.jit(apply)(params, *args)
    return out, attention_maps(state.get("intermediates", {}))


# ---------------------------------------------------------------------------------------------
# Drawing


def _figure(size: tuple[int, int], dpi: int) -> Figure:
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_attention(
    weights: np.ndarray,
    query_tokens: Sequence[str],
    key_tokens: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    size: tuple[int, int] = (640, 640),
    dpi: int = 100,
) -> Path:
    """A heatmap of one head's weights [T, S] (row t: how query token t spreads its attention
    over the keys), labelled with the tokens; written as a PNG of exactly `size` pixels."""
    weights = np.asarray(weights, np.float32)
    if weights.shape != (len(query_tokens), len(key_tokens)):
        raise ValueError(
            f"weights of shape {weights.shape} need {weights.shape[0]} query and "
            f"{weights.shape[1]} key tokens; got {len(query_tokens)} and {len(key_tokens)}"
        )
    fig = _figure(size, dpi)
    ax = fig.add_subplot()
    im = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=max(float(weights.max()), 1e-6))
    fontsize = max(4, min(9, int(220 / max(len(key_tokens), len(query_tokens), 1))))
    ax.set_xticks(range(len(key_tokens)), [_label(t) for t in key_tokens], rotation=90)
    ax.set_yticks(range(len(query_tokens)), [_label(t) for t in query_tokens])
    ax.tick_params(labelsize=fontsize)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    if title:
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path


def _label(token: str) -> str:
    text = token.replace("\n", "\\n").replace("\t", "\\t")
    return text if text.strip() else repr(text)


def pca_2d(vectors: np.ndarray) -> np.ndarray:
    """The rows' coordinates on the top two principal components, [n, D] -> [n, 2]."""
    x = np.asarray(vectors, np.float64)
    x = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    comps = vt[:2]
    if comps.shape[0] < 2:  # fewer than two directions of variation (e.g. one word)
        comps = np.vstack([comps, np.zeros((2 - comps.shape[0], x.shape[1]))])
    return x @ comps.T


def plot_pca(
    vectors: np.ndarray,
    words: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    size: tuple[int, int] = (640, 640),
    dpi: int = 100,
) -> Path:
    """A scatter of the words' vectors [n, D] on their top two principal components, each point
    labelled with its word; a PNG of exactly `size` pixels."""
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(words):
        raise ValueError(f"{len(words)} words need vectors [{len(words)}, D], got {vectors.shape}")
    if len(words) < 2:
        raise ValueError(f"a projection needs at least 2 words, got {list(words)}")
    xy = pca_2d(vectors)
    fig = _figure(size, dpi)
    ax = fig.add_subplot()
    ax.scatter(xy[:, 0], xy[:, 1], s=14, color="tab:blue")
    for (x, y), w in zip(xy, words):
        ax.annotate(_label(w), (x, y), xytext=(3, 3), textcoords="offset points", fontsize=8)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.margins(0.12)
    if title:
        ax.set_title(title, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path


# ---------------------------------------------------------------------------------------------
# The command
