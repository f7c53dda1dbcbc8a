"""Where metrics go: workdir/metrics.jsonl (one JSON object per logged step), TensorBoard event
files or any writer plugged in through `train.writers`, and a progress line on the terminal.
Only the writing process (process 0) writes."""

from __future__ import annotations

import html
import importlib
import json
import logging
import math
import os
import secrets
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TextIO

from etils import epath

from lmflax import storage
from lmflax.config import ConfigError

log = logging.getLogger("lmflax")


class Writer(Protocol):
    """Where logged values go besides metrics.jsonl. The method names are clu's MetricWriter
    interface, so a clu writer (or a W&B adapter) plugs in through `train.writers`."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _import_summary_writer() -> type:
    """tensorboardX's SummaryWriter, imported only when TensorBoard is on. tensorboardX's writer
    module imports torch whenever it is installed (only so that it can accept torch tensors,
    which lmflax never passes): that costs seconds per run, so unless torch is already loaded,
    the import is made to find no torch."""
    if "tensorboardX.writer" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter  # deferred: only when TensorBoard is on

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` -> ImportError
    try:
        from tensorboardX import SummaryWriter  # deferred: only when TensorBoard is on
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class TensorBoardWriter:
    """Scalars and texts as TensorBoard event files under `<workdir>/tensorboard`. tensorboardX
    writes gs:// itself (through google-cloud-storage, uploading the event file on each flush)."""

    def __init__(self, logdir: epath.Path):
        SummaryWriter = _import_summary_writer()
        self._tb = SummaryWriter(os.fspath(logdir))

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        for k, v in scalars.items():
            self._tb.add_scalar(k, v, step)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        for k, v in texts.items():
            self._tb.add_text(k, v, step)

    def flush(self) -> None:
        self._tb.flush()

    def close(self) -> None:
        self._tb.close()


WANDB_ID = "wandb_run_id"  # in the workdir: a resumed run logs into the same W&B run


class WandbWriter:
    """Scalars and texts to a Weights & Biases run. The run's id is kept in
    `<workdir>/wandb_run_id`, so a resumed run continues the same W&B run; its config is the
    workdir's config.json. W&B's own settings come from its environment variables
    (WANDB_PROJECT, default 'lmflax'; WANDB_ENTITY; WANDB_MODE=offline; WANDB_DIR, default the
    workdir when it is local)."""

    def __init__(self, workdir: epath.Path):
        import wandb  # deferred: only when train.writers names wandb

        id_file = workdir / WANDB_ID
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(8)
        if not id_file.exists():
            id_file.write_text(run_id)
        saved = workdir / "config.json"
        config = json.loads(saved.read_text()) if saved.exists() else None
        self._wandb = wandb
        self._run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "lmflax"),
            name=workdir.name,
            id=run_id,
            resume="allow",
            config=config,
            dir=os.environ.get("WANDB_DIR")
            or (os.fspath(workdir) if storage.is_local(workdir) else None),
        )

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._run.log(dict(scalars), step=step)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        self._run.log(
            {k: self._wandb.Html(f"<pre>{html.escape(v)}</pre>") for k, v in texts.items()},
            step=step,
        )

    def flush(self) -> None:
        pass  # wandb sends in the background; finish() (close) waits for it

    def close(self) -> None:
        self._run.finish()


class CluWriter:
    """clu's default writer (`clu.metric_writers.create_default_writer`: TensorBoard summaries
    through TensorFlow) under `<workdir>/clu`."""

    def __init__(self, workdir: epath.Path):
        from clu import metric_writers  # deferred: only when train.writers names clu

        self._w = metric_writers.create_default_writer(
            os.fspath(workdir / "clu"), asynchronous=False
        )

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self._w.write_scalars(step, scalars)

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        self._w.write_texts(step, texts)

    def flush(self) -> None:
        self._w.flush()

    def close(self) -> None:
        self._w.close()


# name -> (factory, the module it imports, what to pip install when that import fails)
_OPTIONAL: dict[str, tuple[Callable[[epath.Path], Writer], str, str]] = {
    "wandb": (WandbWriter, "wandb", "wandb"),
    "clu": (CluWriter, "clu.metric_writers", "clu tensorflow"),
}
BUILTIN_WRITERS = ("jsonl", "tensorboard", *_OPTIONAL)  # tensorboardX is a dependency
PLUGIN_PREFIX = "python:"


def writer_names(spec: str) -> list[str]:
    """'jsonl,tensorboard,python:pkg.mod:make' -> its entries, whitespace stripped."""
    return [w.strip() for w in spec.split(",") if w.strip()]


def _missing(name: str) -> str | None:
    """Why the optional writer `name` cannot be made here (None: it can). Imports its module:
    only for writers the config names."""
    _, module, package = _OPTIONAL[name]
    try:
        importlib.import_module(module)
    except ImportError as e:
        return (
            f"train.writers names {name!r}, but {module} cannot be imported ({e}): "
            f"pip install {package}"
        )
    return None


def plugin_problems(spec: str) -> list[str]:
    """The problems of `train.writers` that need imports: a 'python:MODULE:CALLABLE' entry that
    does not resolve, an optional writer (wandb, clu) whose package is missing.
    The names themselves are checked with the rest of the config."""
    errs = []
    for name in writer_names(spec):
        if name.startswith(PLUGIN_PREFIX):
            try:
                _plugin(name)
            except (ImportError, AttributeError, ValueError) as e:
                errs.append(f"train.writers entry {name!r}: {e}")
        elif name in _OPTIONAL and (why := _missing(name)) is not None:
            errs.append(why)
    return errs


def writer_problems(spec: str) -> list[str]:
    """Why `train.writers=spec` cannot be used (empty = it can). A plugin 'python:MODULE:NAME'
    names a callable taking the workdir (an etils.epath.Path) and returning a Writer; it is
    imported here, so a typo is found before training starts."""
    errs = plugin_problems(spec)
    names = writer_names(spec)
    for name in names:
        if not name.startswith(PLUGIN_PREFIX) and name not in BUILTIN_WRITERS:
            errs.append(
                f"train.writers entry {name!r} is not a writer; accepted: "
                f"{', '.join(BUILTIN_WRITERS)}, or {PLUGIN_PREFIX}MODULE:CALLABLE (a callable "
                "taking the workdir and returning an object with write_scalars, write_texts, "
                "flush and close, such as a clu MetricWriter)"
            )
    if len(set(names)) != len(names):
        errs.append(f"train.writers lists a writer twice: {spec!r}")
    return errs


def _plugin(name: str) -> Callable[[epath.Path], Writer]:
    module_name, sep, attr = name.removeprefix(PLUGIN_PREFIX).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected {PLUGIN_PREFIX}MODULE:CALLABLE, got {name!r}")
    factory = getattr(importlib.import_module(module_name), attr)
    if not callable(factory):
        raise ValueError(f"{module_name}.{attr} is not callable")
    return factory


class MetricWriter:
    """Appends JSON lines to `<workdir>/<name>.jsonl` and passes finite scalars (and texts) to
    the other writers `train.writers` names (TensorBoard by default).

    On an object store (gs://), which cannot append, each .jsonl file is kept in memory and
    uploaded whole after each write (one object per upload: a reader sees whole records)."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        writers: str | None = None,
    ):
        self.enabled = enabled
        self.workdir = storage.to_path(workdir)
        self.local = storage.is_local(self.workdir)
        self._texts: dict[str, str] = {}  # object stores: file name -> its whole content
        if writers is None:
            writers = "jsonl,tensorboard" if tensorboard else "jsonl"
        names = writer_names(writers)
        errs = writer_problems(writers)
        if "tensorboard" in names and enabled and not self.local:
            errs += _tensorboard_url_problems(self.workdir)
        if errs:
            raise ConfigError("; ".join(errs))
        self.jsonl = "jsonl" in names
        self.writers: list[Writer] = []
        if not enabled:
            return
        for name in names:
            if name == "tensorboard":
                self.writers.append(TensorBoardWriter(self.workdir / "tensorboard"))
            elif name in _OPTIONAL:
                self.writers.append(_OPTIONAL[name][0](self.workdir))
            elif name.startswith(PLUGIN_PREFIX):
                self.writers.append(_plugin(name)(self.workdir))

    def _append(self, name: str, text: str) -> None:
        path = self.workdir / name
        if self.local:
            with open(os.fspath(path), "a") as f:
                f.write(text)
            return
        if name not in self._texts:
            self._texts[name] = path.read_text() if path.exists() else ""
        self._texts[name] += text
        path.write_text(self._texts[name])

    def write(
        self, step: int, values: dict[str, Any], *, file: str = "metrics", prefix: str = ""
    ) -> None:
        if not self.enabled:
            return
        if self.jsonl:
            record = {"step": int(step), **{k: _clean(v) for k, v in values.items()}}
            self._append(f"{file}.jsonl", json.dumps(record) + "\n")
        scalars = {
            f"{prefix}{k}": float(v)
            for k, v in values.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }
        for w in self.writers:
            w.write_scalars(int(step), scalars)
            w.flush()

    def write_text(self, step: int, key: str, text: str) -> None:
        """A text (e.g. the end-of-run sample) to the writers that take texts."""
        if not self.enabled:
            return
        for w in self.writers:
            w.write_texts(int(step), {key: text})
            w.flush()

    def truncate_after(self, step: int) -> None:
        """Drops records logged after `step` (a run killed after its last checkpoint logged steps
        that the resumed run will log again), so every step appears once."""
        if not self.enabled:
            return
        for path in self.workdir.glob("*metrics.jsonl"):
            records, complete = _read_records(path)
            kept = [r for r in records if r.get("step", 0) <= step]
            # A partial last line is rewritten away too, or the next record would be appended
            # to it.
            if len(kept) != len(records) or not complete:
                storage.replace_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))
            self._texts.pop(path.name, None)

    def close(self) -> None:
        for w in self.writers:
            w.close()
        self.writers = []


def _tensorboard_url_problems(workdir: epath.Path) -> list[str]:
    """tensorboardX writes gs:// through google-cloud-storage (and nothing else but s3)."""
    try:
        importlib.import_module("google.cloud.storage")
        return []
    except ImportError:
        pass
    return [
        f"train.writers names 'tensorboard' and the workdir is {workdir}: tensorboardX writes "
        "gs:// event files through google-cloud-storage, which is not installed (pip install "
        "google-cloud-storage), or drop tensorboard from train.writers"
    ]


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep them visible as strings
    return v


class MetricsFileError(ValueError):
    """A metrics file damaged before its last line (which a crash while appending cannot do)."""


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (for tests and analysis).

    A last line that is not a whole JSON record (a run killed while appending it) is dropped
    with a warning; an unreadable line before it raises MetricsFileError naming the line.
    """
    return _read_records(path)[0]


def _read_records(path: str | os.PathLike) -> tuple[list[dict[str, Any]], bool]:
    """(records, whether the file is exactly those records, each on a whole line)."""
    data = storage.to_path(path).read_bytes()
    lines = data.split(b"\n")
    # After the last newline comes '' (a whole file) or the piece of a line being written.
    complete = lines[-1] == b""
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(numbered):
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError(f"a JSON {type(record).__name__}, not an object")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if i == len(numbered) - 1:
                log.warning(
                    "%s: dropping its last line %d, a partial record (%s); the run that wrote "
                    "it probably stopped while writing it",
                    path,
                    n,
                    e,
                )
                return records, False
            raise MetricsFileError(
                f"{path} line {n} is not a JSON record ({e}); lines after it are whole, so "
                "this is damage, not an interrupted write. Repair or remove that line (or move "
                "the file aside) to continue"
            ) from None
        records.append(record)
    return records, complete


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (where tqdm.auto draws a widget)."""
    ipython = sys.modules.get("IPython")  # never imported here: a notebook has it loaded
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _tqdm_class() -> Any | None:
    """tqdm.auto's bar class, or None when tqdm is not installed."""
    try:
        from tqdm.auto import tqdm  # deferred: optional, and only for a terminal or notebook
    except ImportError:
        return None
    return tqdm


class Progress:
    """Progress: step, loss, tokens/s, ETA. Through `tqdm.auto` (a widget in notebooks) when
    tqdm is installed and the stream is a terminal or this is a notebook; otherwise a
    hand-drawn line, redrawn in place on a terminal and printed as a plain line per update
    elsewhere (logs, CI). Either way the ETA is measured from the first update on, so the first
    steps' compilation does not inflate it ('?' until the second update): the tqdm bar is
    started at the first update, at that step."""

    def __init__(
        self,
        total: int,
        start: int,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        use_tqdm: bool | None = None,
    ):
        self.total, self.start = total, start
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._first: tuple[int, float] | None = None  # (step, time) of the first update
        if use_tqdm is None:
            use_tqdm = self.tty or _in_notebook()
        self._tqdm = _tqdm_class() if use_tqdm and enabled else None
        self._bar: Any = None

    def eta(self, step: int, now: float) -> float:
        """Seconds left at `step` (nan before there are two updates to measure between)."""
        if self._first is None or step <= self._first[0]:
            return float("nan")
        first_step, t_first = self._first
        return (now - t_first) / (step - first_step) * (self.total - step)

    def update(self, step: int, loss: float, tokens_per_sec: float) -> None:
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._update_tqdm(step, loss, tokens_per_sec)
            return
        now = time.perf_counter()
        eta = self.eta(step, now)
        if self._first is None:
            self._first = (step, now)
        width = 24
        filled = int(width * step / max(self.total, 1))
        bar = "█" * filled + "·" * (width - filled)
        line = (
            f"{bar} step {step}/{self.total} | loss {loss:.4f} | "
            f"{tokens_per_sec / 1e3:.1f}k tok/s | ETA {_fmt_time(eta)}"
        )
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _update_tqdm(self, step: int, loss: float, tokens_per_sec: float) -> None:
        postfix = {"loss": f"{loss:.4f}", "tok/s": f"{tokens_per_sec / 1e3:.1f}k"}
        if self._bar is None:
            # Started here, at the first logged step, so its rate (and ETA) never includes
            # the compilation before it.
            self._bar = self._tqdm(
                total=self.total,
                initial=step,
                file=self.stream,
                unit="step",
                dynamic_ncols=True,
                mininterval=0,
                postfix=postfix,
            )
            return
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.tty and self._tqdm is None:
            self.stream.write("\n")
            self.stream.flush()
