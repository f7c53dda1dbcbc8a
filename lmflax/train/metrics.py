"""Where metrics go: workdir/metrics.jsonl (one JSON object per logged step), TensorBoard event
files, and a progress line on the terminal. Only the writing process (process 0) writes."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO


class MetricWriter:
    """Appends JSON lines to `<workdir>/<name>.jsonl` and scalars to TensorBoard."""

    def __init__(self, workdir: Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.workdir = workdir
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter  # deferred: only when TensorBoard is on

            self._tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(
        self, step: int, values: dict[str, Any], *, file: str = "metrics", prefix: str = ""
    ) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _clean(v) for k, v in values.items()}}
        with open(self.workdir / f"{file}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(f"{prefix}{k}", v, step)
            self._tb.flush()

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
        if self._tb is not None:
            self._tb.close()


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
    printed as a plain line per update otherwise (logs, CI)."""

    def __init__(
        self, total: int, start: int, *, enabled: bool = True, stream: TextIO | None = None
    ):
        self.total, self.start = total, start
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, step: int, loss: float, tokens_per_sec: float) -> None:
        if not self.enabled:
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
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
