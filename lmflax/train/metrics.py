"""Where metrics go: workdir/metrics.jsonl (one JSON object per logged step), TensorBoard event
files or any writer plugged in through `train.writers`, and a progress line on the terminal.
Only the writing process (process 0) writes."""

from __future__ import annotations

import importlib
import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TextIO


class Writer(Protocol):
    """Where logged values go besides metrics.jsonl. The method names are clu's MetricWriter
    interface, so a clu writer (or a W&B adapter) plugs in through `train.writers`."""

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class TensorBoardWriter:
    """Scalars and texts as TensorBoard event files under `<workdir>/tensorboard`."""

    def __init__(self, logdir: Path):
        from tensorboardX import SummaryWriter  # deferred: only when TensorBoard is on

        self._tb = SummaryWriter(str(logdir))

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


BUILTIN_WRITERS = ("jsonl", "tensorboard")
PLUGIN_PREFIX = "python:"


def writer_names(spec: str) -> list[str]:
    """'jsonl,tensorboard,python:pkg.mod:make' -> its entries, whitespace stripped."""
    return [w.strip() for w in spec.split(",") if w.strip()]


def plugin_problems(spec: str) -> list[str]:
    """The problems of the 'python:MODULE:CALLABLE' entries of `train.writers` (the names of
    the built-in writers are checked with the rest of the config)."""
    errs = []
    for name in writer_names(spec):
        if name.startswith(PLUGIN_PREFIX):
            try:
                _plugin(name)
            except (ImportError, AttributeError, ValueError) as e:
                errs.append(f"train.writers entry {name!r}: {e}")
    return errs


def writer_problems(spec: str) -> list[str]:
    """Why `train.writers=spec` cannot be used (empty = it can). A plugin 'python:MODULE:NAME'
    names a callable taking the workdir (a Path) and returning a Writer; it is imported here,
    so a typo is found before training starts."""
    errs = []
    names = writer_names(spec)
    for name in names:
        if name.startswith(PLUGIN_PREFIX):
            try:
                _plugin(name)
            except (ImportError, AttributeError, ValueError) as e:
                errs.append(f"train.writers entry {name!r}: {e}")
        elif name not in BUILTIN_WRITERS:
            errs.append(
                f"train.writers entry {name!r} is not a writer; accepted: "
                f"{', '.join(BUILTIN_WRITERS)}, or {PLUGIN_PREFIX}MODULE:CALLABLE (a callable "
                "taking the workdir and returning an object with write_scalars, write_texts, "
                "flush and close, such as a clu MetricWriter or a W&B adapter)"
            )
    if len(set(names)) != len(names):
        errs.append(f"train.writers lists a writer twice: {spec!r}")
    return errs


def _plugin(name: str) -> Callable[[Path], Writer]:
    module_name, sep, attr = name.removeprefix(PLUGIN_PREFIX).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected {PLUGIN_PREFIX}MODULE:CALLABLE, got {name!r}")
    factory = getattr(importlib.import_module(module_name), attr)
    if not callable(factory):
        raise ValueError(f"{module_name}.{attr} is not callable")
    return factory


class MetricWriter:
    """Appends JSON lines to `<workdir>/<name>.jsonl` and passes finite scalars (and texts) to
    the other writers `train.writers` names (TensorBoard by default)."""

    def __init__(
        self,
        workdir: Path,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        writers: str | None = None,
    ):
        self.enabled = enabled
        self.workdir = workdir
        if writers is None:
            writers = "jsonl,tensorboard" if tensorboard else "jsonl"
        names = writer_names(writers)
        errs = writer_problems(writers)
        if errs:
            raise ValueError("; ".join(errs))
        self.jsonl = "jsonl" in names
        self.writers: list[Writer] = []
        if not enabled:
            return
        for name in names:
            if name == "tensorboard":
                self.writers.append(TensorBoardWriter(workdir / "tensorboard"))
            elif name.startswith(PLUGIN_PREFIX):
                self.writers.append(_plugin(name)(workdir))

    def write(
        self, step: int, values: dict[str, Any], *, file: str = "metrics", prefix: str = ""
    ) -> None:
        if not self.enabled:
            return
        if self.jsonl:
            record = {"step": int(step), **{k: _clean(v) for k, v in values.items()}}
            with open(self.workdir / f"{file}.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
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
            records = read_metrics(path)
            kept = [r for r in records if r.get("step", 0) <= step]
            if len(kept) != len(records):
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
                tmp.replace(path)

    def close(self) -> None:
        for w in self.writers:
            w.close()
        self.writers = []


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep them visible as strings
    return v


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (for tests and analysis)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """A one-line progress bar: step, loss, tokens/s, ETA. Redrawn in place on a terminal;
    printed as a plain line per update otherwise (logs, CI, notebooks). The ETA is measured
    from the first update on, so the first steps' compilation does not inflate it ('?' until
    the second update)."""

    def __init__(
        self, total: int, start: int, *, enabled: bool = True, stream: TextIO | None = None
    ):
        self.total, self.start = total, start
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._first: tuple[int, float] | None = None  # (step, time) of the first update

    def eta(self, step: int, now: float) -> float:
        """Seconds left at `step` (nan before there are two updates to measure between)."""
        if self._first is None or step <= self._first[0]:
            return float("nan")
        first_step, t_first = self._first
        return (now - t_first) / (step - first_step) * (self.total - step)

    def update(self, step: int, loss: float, tokens_per_sec: float) -> None:
        if not self.enabled:
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

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
