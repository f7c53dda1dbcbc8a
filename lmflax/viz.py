"""Pictures of what a model learned: attention heatmaps, 2-D projections of word vectors, and
the training curves of one or several runs.

  lmflax viz attention --workdir=runs/gpt_tiny --sentence="def add(a, b): return a + b"
  lmflax viz curves runs/gpt_tiny runs/gpt_tiny_lr3e-3
  lmflax viz attention --workdir=runs/word2vec --words=list,tuple,dict,str,int,float,bytes

The functions here draw from arrays (`plot_attention`, `plot_pca`, `run_with_attention`);
`lmflax.cli.viz` opens a run and picks what to draw: for a Transformer run it writes one heatmap PNG per chosen layer and head (queries down, keys
across, tokens on both axes) and a PCA projection of the sentence's token embeddings; for a
word2vec run, the PCA projection of the chosen words' vectors. Drawing uses matplotlib's Agg
backend (no display). Attention weights come from the modules' 'intermediates' (see
`lmflax.nn.MultiHeadAttention`), so they are exactly the weights that produced the output.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
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


def plot_attention_grid(
    maps: Sequence[tuple[str, np.ndarray]],
    tokens: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    size: tuple[int, int] | None = None,
    dpi: int = 100,
) -> Path:
    """`attention_grid_figure(maps, tokens, ...)` written as a PNG (of exactly `size` pixels)."""
    path = Path(path)
    attention_grid_figure(maps, tokens, title=title, size=size, dpi=dpi).savefig(path, dpi=dpi)
    return path


def attention_grid_figure(
    maps: Sequence[tuple[str, np.ndarray]],
    tokens: Sequence[str],
    *,
    title: str = "",
    size: tuple[int, int] | None = None,
    dpi: int = 100,
) -> Figure:
    """Every head of every given layer in one picture: `maps` is [(layer name, weights [N, T, S])]
    (one row per layer, one column per head, queries down and keys across as in
    `plot_attention`), labelled with `tokens` along the left column and the bottom row.
    Default size: 180 pixels a cell (at least 640x640)."""
    if not maps:
        raise ValueError("plot_attention_grid needs at least one layer")
    rows, cols = len(maps), max(w.shape[0] for _, w in maps)
    size = size or (max(640, 180 * cols + 120), max(640, 180 * rows + 80))
    fig = _figure(size, dpi)
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    show_tokens = len(tokens) <= 24
    fontsize = max(3, min(7, int(160 / max(len(tokens), 1))))
    for r, (name, w) in enumerate(maps):
        w = np.asarray(w, np.float32)
        if w.shape[1:] != (len(tokens), len(tokens)):
            raise ValueError(f"{name}: weights {w.shape[1:]} do not match {len(tokens)} tokens")
        for c in range(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= w.shape[0]:
                ax.set_axis_off()
                continue
            ax.imshow(w[c], cmap="viridis", vmin=0.0, vmax=max(float(w[c].max()), 1e-6))
            if r == 0:
                ax.set_title(f"head {c}", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
                if show_tokens:
                    ax.set_yticks(range(len(tokens)), [_label(t) for t in tokens])
            if r == rows - 1 and show_tokens:
                ax.set_xticks(range(len(tokens)), [_label(t) for t in tokens], rotation=90)
            ax.tick_params(labelsize=fontsize, length=0)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


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
# Training curves

# A run's curves: {"train": {metric: (steps [n], values [n])}, "eval": {...}}.
Curves = dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]
# Eval metrics drawn in the third panel, the first one a run has (loss is in the first panel).
_EVAL_PANEL = ("accuracy", "exact_match", "f1", "bleu", "rougeL", "perplexity")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a killed run: skip it
                continue
    return records


def _series(records: list[dict[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        for k, v in r.items():
            if k != "step" and isinstance(v, int | float) and not isinstance(v, bool):
                steps, values = out.setdefault(k, ([], []))
                steps.append(int(r["step"]))
                values.append(float(v))
    return {k: (np.asarray(s), np.asarray(v, np.float64)) for k, (s, v) in out.items()}


def load_curves(workdir: str | Path) -> Curves:
    """The metrics a run logged (metrics.jsonl, eval_metrics.jsonl in `workdir`) as curves."""
    workdir = Path(workdir)
    train = _read_jsonl(workdir / "metrics.jsonl")
    if not train:
        raise FileNotFoundError(f"{workdir} has no metrics.jsonl with records (is it a run?)")
    return {
        "train": _series(train),
        "eval": _series(_read_jsonl(workdir / "eval_metrics.jsonl")),
    }


def curves_figure(
    runs: Mapping[str, Curves], *, size: tuple[int, int] = (1200, 420), dpi: int = 100
) -> Figure:
    """One figure comparing `runs` ({label: curves}), one colour per run: training loss (solid)
    with eval loss (dashed, dots), the learning rate, and an eval metric where the runs have one
    (accuracy, exact_match, ...). Axes in that order; each line is labelled with its run."""
    if not runs:
        raise ValueError("curves_figure needs at least one run")
    eval_metric = next((m for m in _EVAL_PANEL if any(m in c["eval"] for c in runs.values())), None)
    panels = ["loss", "learning_rate"] + ([eval_metric] if eval_metric else [])
    fig = _figure(size, dpi)
    axes = fig.subplots(1, len(panels))
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for (label, curves), color in zip(runs.items(), colors):
        train, ev = curves["train"], curves["eval"]
        if "loss" in train:
            single = "o" if len(train["loss"][0]) == 1 else None  # one point shows as a dot
            axes[0].plot(*train["loss"], color=color, marker=single, label=f"{label} train")
        if "loss" in ev:
            axes[0].plot(*ev["loss"], "--o", color=color, markersize=4, label=f"{label} eval")
        if "learning_rate" in train:
            single = "o" if len(train["learning_rate"][0]) == 1 else None
            axes[1].plot(*train["learning_rate"], color=color, marker=single, label=label)
        if eval_metric and eval_metric in ev:
            axes[2].plot(*ev[eval_metric], "--o", color=color, markersize=4, label=label)
    titles = {"loss": "loss", "learning_rate": "learning rate"}
    for ax, panel in zip(axes, panels):
        ax.set_title(titles.get(panel, f"eval {panel}"), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    return fig


def plot_curves(
    runs: Mapping[str, Curves],
    path: str | Path,
    *,
    size: tuple[int, int] = (1200, 420),
    dpi: int = 100,
) -> Path:
    """`curves_figure(runs)` written as a PNG of exactly `size` pixels."""
    path = Path(path)
    curves_figure(runs, size=size, dpi=dpi).savefig(path, dpi=dpi)
    return path


def run_labels(workdirs: Sequence[str | Path]) -> list[str]:
    """Short distinct labels for workdirs: their folder names, or whole paths where those clash."""
    names = [Path(w).resolve().name for w in workdirs]
    if len(set(names)) == len(names):
        return names
    return [str(w) for w in workdirs]


def plot_workdir_curves(
    workdirs: Sequence[str | Path], path: str | Path, *, size: tuple[int, int] = (1200, 420)
) -> Path:
    """The curves of the runs in `workdirs` on one plot (see `curves_figure`), as a PNG."""
    runs = {label: load_curves(w) for label, w in zip(run_labels(workdirs), workdirs)}
    return plot_curves(runs, path, size=size)
