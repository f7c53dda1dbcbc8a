"""The training loop: the only place that touches disk, clocks and logs.

run(config, workdir): validate -> build task/model/data -> mesh and shardings -> init or restore
-> jit(train_step) with explicit shardings and donated state -> loop (log, evaluate, checkpoint)
-> final checkpoint, evaluation and a generated sample.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from lmflax import config as config_lib
from lmflax import storage, viz
from lmflax.config import Config, ConfigError
from lmflax.core.losses import finalize
from lmflax.core.state import TrainState
from lmflax.data import sources
from lmflax.hf import adapters
from lmflax.parallel import distributed, validate_devices
from lmflax.train import plan
from lmflax.train.checkpoint import TMP_SUFFIX, Checkpointer
from lmflax.train.checks import check_run, resolve
from lmflax.train.evaluation import evaluate
from lmflax.train.metrics import MetricWriter, Progress
from lmflax.train.trainer import Trainer
from lmflax.train.workdir_lock import WorkdirLock, WorkdirLockedError

log = logging.getLogger("lmflax")


def _prepare_workdir(workdir: epath.Path, cfg: Config, is_writer: bool) -> None:
    """Creates the workdir, proves it writable, and records the config. A workdir that holds a
    run of a different model or task is refused rather than silently mixed."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_probe_{jax.process_index()}_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"workdir {workdir} is not writable: {e}") from None
    saved = workdir / "config.json"
    if saved.exists():
        old = json.loads(saved.read_text())
        new = config_lib.to_dict(cfg)
        for section in ("model", "task"):
            if old.get(section) != new[section]:
                diff = sorted(
                    k
                    for k in set(old.get(section, {})) | set(new[section])
                    if old.get(section, {}).get(k) != new[section].get(k)
                )
                raise ConfigError(
                    f"workdir {workdir} holds a run with a different {section} config "
                    f"(differing keys: {', '.join(diff)}); use another --workdir or the same config"
                )
    if is_writer:
        storage.replace_atomically(saved, config_lib.to_json(cfg))


def run_name(cfg: Config, config_name: str) -> str:
    """What the logs call a run: its config's name, or for a model that starts from a Hugging
    Face checkpoint (model.init_from='hf:DIR') the checkpoint's folder and architecture, e.g.
    'all-MiniLM-L6-v2 (BertModel, via config bert_tiny)'."""
    spec = getattr(cfg.model, "init_from", None)
    if not spec or not str(spec).startswith("hf:"):
        return config_name
    directory = Path(str(spec)[3:]).expanduser()
    try:
        hf = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        hf = {}
    arch = (hf.get("architectures") or [hf.get("model_type") or "HF model"])[0]
    return f"{directory.resolve().name} ({arch}, via config {config_name})"


def _close(it: Any) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        close()


class TrainingError(RuntimeError):
    """A run that had to stop: non-finite values under nonfinite='stop', a failed checkpoint
    save, or checkpoints that fail verification. train.py exits 1 with the message."""


class _StopRequests:
    """SIGTERM (preemption) and a first Ctrl-C ask the loop to save and exit cleanly; a second
    Ctrl-C interrupts at once. Handlers are installed only in the main thread and restored after."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning(
            "received %s: saving a checkpoint after this step, then exiting", self.requested
        )

    def __enter__(self) -> _StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def stop_now(self, step: int) -> bool:
        if self.requested is not None:
            return True
        if jax.process_count() > 1:
            # Multi-host preemption notices arrive through the coordination service; all hosts
            # reach the same answer at the same step.
            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.requested = "preemption notice"
                    return True
            except RuntimeError:  # no preemption service in this cluster
                pass
        return False


def _state_bytes(abstract: Any) -> int:
    return sum(
        int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract)
    )


def _check_disk(workdir: epath.Path, abstract: Any, keep: int) -> None:
    """Refuses to start when the workdir's filesystem cannot hold the checkpoints the run keeps.

    Counts only new space: the finished checkpoints already on disk fill some of the `keep`
    places, and unfinished `*.orbax-checkpoint-tmp` directories are removed before saving.
    An object store (gs://) has no free-space figure: nothing to check there."""
    if not storage.is_local(workdir):
        return
    workdir = Path(os.fspath(workdir))  # local: os/shutil calls below
    each = _state_bytes(abstract)
    directory = workdir / "checkpoints"
    entries = list(directory.iterdir()) if directory.is_dir() else []
    finished = [p for p in entries if p.name.isdigit() and p.is_dir()]
    leftover = sum(_tree_bytes(p) for p in entries if TMP_SUFFIX in p.name)
    # At most `keep` finished ones plus the one being written (older ones go once it finishes).
    new = max(1, keep + 1 - len(finished))
    need = each * new
    free = shutil.disk_usage(workdir).free + leftover
    if need > free:
        raise OSError(
            f"workdir {workdir} has {_size(free)} free"
            + (f" (counting {_size(leftover)} of unfinished saves)" if leftover else "")
            + f" but checkpoints need about {_size(need)} more ({keep} kept + 1 in progress, "
            f"{len(finished)} already saved, {_size(each)} each); free space or lower "
            "train.keep_checkpoints"
        )


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class _Loop:
    """One run of the training loop over a restored or fresh state (see `run`)."""

    def __init__(
        self,
        trainer: Trainer,
        workdir: epath.Path,
        config_name: str,
        lock: WorkdirLock | None = None,
    ):
        self.trainer, self.cfg, self.workdir, self.name = trainer, trainer.cfg, workdir, config_name
        self.lock = lock
        t = self.cfg.train
        self.is_writer = jax.process_index() == 0
        self.ckpt = Checkpointer(
            workdir / "checkpoints",
            keep=t.keep_checkpoints,
            keep_every=t.keep_every,
            verify=t.verify_checkpoints,
        )
        self.writer = MetricWriter(workdir, enabled=self.is_writer, writers=t.writers)
        self.pending: list[tuple[int, Any]] = []  # (step, its 'skipped' flag) not yet checked
        self.skipped_total = 0
        self.last_saved: int | None = None
        self.num_shards = 0  # the data stream's shard count, set by `run`
        # A LoRA run's checkpoints reference their base (model.init_from) instead of holding it:
        # they record its files' sums, and a resumed run refuses a base that has changed.
        self.base_fingerprint = None
        if trainer.lora_plan is not None and not trainer.state.save_frozen:
            # Hashed on process 0 alone (every byte of the base), shared with the others.
            self.base_fingerprint = distributed.from_coordinator(
                lambda: adapters.base_fingerprint(self.cfg.model.init_from)
            )

    # -- checks ---------------------------------------------------------------------------------

    def check_finite(self) -> None:
        """Under nonfinite='stop', raise naming the first step whose update was dropped."""
        if not self.pending:
            return
        flags = jax.device_get([f for _, f in self.pending])
        steps = [s for s, _ in self.pending]
        self.pending = []
        bad = [s for s, f in zip(steps, flags) if f > 0]
        if bad and self.cfg.train.nonfinite == "stop":
            raise TrainingError(
                f"non-finite loss, gradient or updated parameters at step {bad[0]}"
                + (f" (and {len(bad) - 1} more steps up to {bad[-1]})" if len(bad) > 1 else "")
                + "; its update was not applied and nothing from it was saved. Last checkpoint: "
                + (f"step {self.last_saved}" if self.last_saved is not None else "none")
                + ". Lower the learning rate, or set train.nonfinite=skip to skip such steps."
            )

    def _save_failed(self, e: Exception) -> TrainingError:
        full = "No space left on device" in str(e) or getattr(e, "errno", None) == errno.ENOSPC
        return TrainingError(
            f"saving a checkpoint failed: {e}\nFinished checkpoints are intact: "
            f"{self.ckpt.finished_steps()} in {self.ckpt.directory}"
            + (
                "\nThe disk is full: free space, then run the same command to continue from the "
                "newest of them (the unfinished save is removed first)"
                if full
                else ""
            )
        )

    def check_saves(self) -> None:
        """Surfaces the error of a background save that failed since the last check (and, on an
        object store, a workdir lock another run has taken: see `lmflax.train.workdir_lock`)."""
        if self.lock is not None and self.lock.lost is not None:
            raise TrainingError(
                f"workdir {self.workdir}: {self.lock.lost}; this run stops rather than write "
                f"over it. Last checkpoint: step {self.last_saved}"
            )
        try:
            self.ckpt.check_errors()
        except Exception as e:
            raise self._save_failed(e) from None

    def save(
        self, step: int, state: TrainState, train_iter: Any, window: Any, window_steps: int
    ) -> None:
        self.check_finite()
        self.check_saves()
        meta = {
            "step": step,
            "config": self.name,
            "window": _window_to_json(window),
            "window_steps": window_steps,
            "skipped_total": self.skipped_total,
            "data_shards": self.num_shards,
            "process_count": jax.process_count(),
        }
        if self.base_fingerprint is not None:
            meta["lora_base"] = self.base_fingerprint
        try:  # orbax first waits for the previous save, so its error can surface here
            self.ckpt.save(step, state.arrays(), train_iter, meta, force=True)
        except Exception as e:
            raise self._save_failed(e) from None
        self.last_saved = step

    # -- the loop ---------------------------------------------------------------------------------

    def restore_or_init(self, train_iter: Any) -> tuple[TrainState, dict[str, Any] | None]:
        trainer = self.trainer
        with trainer.context():
            restored = self.ckpt.restore_latest(trainer.abstract_for_restore(), train_iter)
            if restored is not None:
                step, arrays, meta = restored
                self.check_base(step, meta)
                self.last_saved = step
                self.skipped_total = int(meta.get("skipped_total", 0))
                log.info("resumed from %s at step %d", self.ckpt.directory, step)
                return trainer.restored(arrays), meta
            log.info("initialised a new run in %s", self.workdir)
            return trainer.initialize(), None

    def check_base(self, step: int, meta: dict[str, Any]) -> None:
        """A LoRA checkpoint's adapters were trained on the base it recorded: refuse another."""
        saved = meta.get("lora_base")
        if saved is None or self.base_fingerprint is None or saved == self.base_fingerprint:
            return
        changed = sorted(
            name
            for name in set(saved.get("files", {})) | set(self.base_fingerprint["files"])
            if saved.get("files", {}).get(name) != self.base_fingerprint["files"].get(name)
        )
        raise ConfigError(
            f"the checkpoint at step {step} in {self.ckpt.directory} holds LoRA adapters trained "
            f"on the base in {saved.get('directory')}, but model.init_from's files differ from "
            f"it now ({', '.join(changed) or 'directory'}); restore that base, or start a new "
            "--workdir"
        )

    def wait(self) -> None:
        """Blocks until pending saves finish; a failed one becomes a TrainingError."""
        try:
            self.ckpt.wait()
        except Exception as e:
            raise self._save_failed(e) from None

    def close(self, *, failing: bool) -> None:
        """Closes the checkpointer and writer; while an error is already propagating, a second
        one from a pending save is logged instead of replacing it."""
        try:
            self.ckpt.close()
        except Exception as e:
            if not failing:
                raise self._save_failed(e) from None
            log.error("a pending checkpoint save also failed: %s", e)
        finally:
            self.writer.close()


def run(cfg: Config, workdir: str | os.PathLike, *, config_name: str = "config") -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir` (a path, file:// or gs:// URL: see
    `lmflax.storage`); returns a summary of what happened.

    Raises ConfigError (bad config or unsupported workdir URL), DataError (unreadable data),
    OSError (unusable workdir) or TrainingError (non-finite values, failed saves, corrupt
    checkpoints). SIGTERM saves a checkpoint and returns early with summary['preempted'] set.
    """
    workdir = storage.absolute(storage.to_path(workdir))
    cfg = resolve(cfg)
    check_run(cfg)
    validate_devices(cfg, jax.device_count())
    trainer = Trainer.create(cfg, init=False)
    # A missing or unprepared dataset (or split) stops here, before the workdir is touched (not
    # even its lock is taken).
    for split in dict.fromkeys(s for s in (cfg.data.train_split, cfg.data.eval_split) if s):
        sources.data_source(cfg.data.dataset, split, cfg.data.data_dir, download=cfg.data.download)
    with _workdir_lock(workdir) as lock:
        return _run(cfg, trainer, workdir, config_name, lock)


@contextlib.contextmanager
def _workdir_lock(workdir: epath.Path) -> Iterator[WorkdirLock]:
    """One writer per workdir: process 0 holds `workdir/lmflax.lock` for the whole run (see
    `lmflax.train.workdir_lock`); when it cannot, every process of the run stops."""
    lock = WorkdirLock(workdir)
    refused: WorkdirLockedError | None = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except WorkdirLockedError as e:
            refused = e
        except OSError as e:
            raise OSError(f"workdir {workdir} is not writable: {e}") from None
    if jax.process_count() > 1:
        ok = int(multihost_utils.broadcast_one_to_all(np.int32(refused is None)))
        if not ok and refused is None:
            refused = WorkdirLockedError(f"workdir {workdir} is in use by another run")
    if refused is not None:
        raise refused
    try:
        yield lock
    finally:
        lock.release()


def _run(
    cfg: Config, trainer: Trainer, workdir: epath.Path, config_name: str, lock: WorkdirLock
) -> dict[str, Any]:
    is_writer = jax.process_index() == 0
    t = cfg.train
    _prepare_workdir(workdir, cfg, is_writer)
    _check_disk(workdir, trainer.abstract_for_restore(), t.keep_checkpoints)  # what is saved
    if cfg.mesh.memory_budget_gib:
        # Compiled ahead of time from shapes alone: a config that cannot fit stops here, before
        # any parameter is allocated.
        plan.check_budget(plan.make_plan(trainer), cfg.mesh.memory_budget_gib)
    task = trainer.task
    log.info(
        "tokenizer: %d tokens; model: %s", task.tokenizer.vocab_size, type(task.model).__name__
    )
    loop = _Loop(trainer, workdir, config_name, lock)
    loop.num_shards = _num_data_shards(cfg, loop.ckpt, loop.ckpt.latest_step())
    train_iter = trainer.batches(cfg.data.train_split, loop.num_shards)
    failing = True
    try:
        state, meta = loop.restore_or_init(train_iter)
        summary = _train(loop, state, meta, train_iter)
        failing = False
    finally:
        _close(train_iter)
        loop.close(failing=failing)
    if is_writer:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        try:  # a picture of the run (lmflax viz curves); drawing must never fail the run
            _draw_curves(workdir)
        except Exception as e:
            log.warning("could not draw %s: %s", workdir / "curves.png", e)
    return summary


def _draw_curves(workdir: epath.Path) -> None:
    """workdir/curves.png from its metrics files (matplotlib reads and writes local files: a
    gs:// run's are copied to a local folder and the picture copied back)."""
    if storage.is_local(workdir):
        viz.plot_workdir_curves([os.fspath(workdir)], os.fspath(workdir / "curves.png"))
        return
    with tempfile.TemporaryDirectory(prefix="lmflax-curves-") as tmp:
        run_dir = Path(tmp) / workdir.name  # the plot's label is the folder's name
        run_dir.mkdir()
        for p in workdir.glob("*metrics.jsonl"):
            (run_dir / p.name).write_bytes(p.read_bytes())
        png = viz.plot_workdir_curves([run_dir], Path(tmp) / "curves.png")
        (workdir / "curves.png").write_bytes(Path(png).read_bytes())


def _train(
    loop: _Loop, state: TrainState, meta: dict[str, Any] | None, train_iter: Any
) -> dict[str, Any]:
    trainer, cfg = loop.trainer, loop.cfg
    t = cfg.train
    start = int(jax.device_get(state.step))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.frozen))
    log.info(
        "%s: %s parameters%s, mesh %s, %d devices, steps %d -> %d",
        run_name(cfg, loop.name),
        f"{n_params:,}",
        f" trained (LoRA adapters) + {n_frozen:,} frozen" if n_frozen else "",
        dict(trainer.mesh.shape),
        jax.device_count(),
        start,
        t.steps,
    )
    loop.writer.truncate_after(start)
    progress = Progress(t.steps, start, enabled=loop.is_writer and t.progress)
    step_fn = trainer.jit_train_step()
    eval_fn = trainer.jit_eval_step()
    dropout_key = jax.random.fold_in(jax.random.key(t.seed), 1)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    summary: dict[str, Any] = {
        "start_step": start,
        "workdir": str(loop.workdir),
        "params": n_params,
    }
    # Logged values average the steps since the last log. The partial window is saved with each
    # checkpoint, so a resumed run logs exactly what an uninterrupted one would.
    window, window_steps = _window_from_json(meta)
    add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))
    with trainer.context(), _StopRequests() as stops:
        t_last, timed_steps = time.perf_counter(), 0
        in_flight = None
        for step in range(start, t.steps):
            batch = trainer.global_batch(next(train_iter))
            state, metrics = step_fn(state, batch, jax.random.fold_in(dropout_key, step))
            if in_flight is not None:
                # Python stays one step ahead of the device (the next step is always queued),
                # never a whole log window ahead: a signal is seen after the step in flight.
                in_flight.block_until_ready()
            in_flight = metrics["skipped"]
            done = step + 1
            loop.pending.append((done, metrics["skipped"]))
            window = metrics if window is None else add(window, metrics)
            window_steps, timed_steps = window_steps + 1, timed_steps + 1
            if done % t.log_every == 0 or done == t.steps:
                loop.check_finite()
                loop.check_saves()
                values = finalize(jax.device_get(window))
                loop.skipped_total += int(values["skipped"])
                values["skipped_total"] = loop.skipped_total
                values["learning_rate"] = float(state.schedule(step))
                now = time.perf_counter()
                values["tokens_per_sec"] = timed_steps * tokens_per_step / (now - t_last)
                t_last, timed_steps = now, 0
                window, window_steps = None, 0
                loop.writer.write(done, values)
                progress.update(done, values["loss"], values["tokens_per_sec"])
                summary["final_loss"] = values["loss"]
                summary["skipped_total"] = loop.skipped_total
            if (
                t.eval_every
                and done % t.eval_every == 0
                and done != t.steps
                and cfg.data.eval_split
            ):
                loop.check_finite()
                ev = evaluate(
                    trainer, state, cfg.data.eval_split, t.eval_steps, eval_fn, loop.num_shards
                )
                loop.writer.write(done, ev, file="eval_metrics", prefix="eval/")
            if t.checkpoint_every and done % t.checkpoint_every == 0 and done != t.steps:
                loop.save(done, state, train_iter, window, window_steps)
            if stops.stop_now(done):
                if loop.last_saved != done:
                    loop.save(done, state, train_iter, window, window_steps)
                loop.wait()
                progress.close()
                log.warning(
                    "stopped by %s: checkpoint saved at step %d; run the same command to continue",
                    stops.requested,
                    done,
                )
                summary.update(preempted=stops.requested, final_step=done)
                return summary
        progress.close()
        if start < t.steps and loop.last_saved != t.steps:
            loop.save(t.steps, state, train_iter, None, 0)
        loop.wait()
        if start >= t.steps:
            log.info(
                "run already complete at step %d (train.steps=%d); nothing to do", start, t.steps
            )
        if cfg.data.eval_split:
            ev = evaluate(
                trainer, state, cfg.data.eval_split, t.eval_steps, eval_fn, loop.num_shards
            )
            summary["eval"] = ev
            if start < t.steps:
                loop.writer.write(t.steps, ev, file="eval_metrics", prefix="eval/")
            log.info("eval on %s: %s", cfg.data.eval_split, _fmt(ev))
        generated = trainer.task.evaluate_generation(
            trainer.model_params(state), jax.random.fold_in(jax.random.key(t.seed), 3)
        )
        if generated is not None:
            gen_metrics, predictions = generated
            summary["generation"] = gen_metrics
            if start < t.steps:
                loop.writer.write(t.steps, gen_metrics, file="eval_metrics", prefix="eval/")
            if loop.is_writer:
                _write_jsonl(loop.workdir / "predictions.jsonl", predictions)
            log.info("generated on %s: %s", cfg.data.eval_split, _fmt(gen_metrics))
        sample = _sample(loop, state)
        if sample is not None:
            summary["sample"] = sample
            loop.writer.write_text(t.steps, "sample", sample)
    summary["final_step"] = int(jax.device_get(state.step))
    return summary


def _sample(loop: _Loop, state: TrainState) -> str | None:
    return loop.trainer.task.sample(
        loop.trainer.model_params(state), jax.random.fold_in(jax.random.key(loop.cfg.train.seed), 2)
    )


def _write_jsonl(path: epath.Path, records: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    storage.replace_atomically(path, text)


def _num_data_shards(cfg: Config, ckpt: Checkpointer, latest: int | None) -> int:
    """The data stream's shard count: data.num_shards, else the checkpoint's, else one per
    process. A resumed run must read the stream its checkpoint positioned."""
    saved = ckpt.data_shards(latest) if latest is not None else None
    wanted = cfg.data.num_shards
    if saved is not None and wanted and wanted != saved:
        raise ConfigError(
            f"the checkpoint at step {latest} in {ckpt.directory} holds the data position of "
            f"{saved} data shards but data.num_shards={wanted}; use data.num_shards={saved} (or "
            "0 to follow the checkpoint) to resume, or start a new --workdir"
        )
    count = wanted or saved or jax.process_count()
    if cfg.data.batch_size % count:
        raise ConfigError(
            f"data.batch_size ({cfg.data.batch_size}) must be divisible by the {count} data "
            "shards (data.num_shards, or the process count when it is 0)"
        )
    return count


def _window_to_json(window: Any) -> dict[str, Any] | None:
    """The metric sums of the not-yet-logged steps, as JSON (float32 -> float is exact)."""
    if window is None:
        return None
    out = {}
    for k, v in jax.device_get(window).items():
        out[k] = [float(x) for x in v] if isinstance(v, tuple | list) else float(v)
    return out


def _window_from_json(meta: dict[str, Any] | None) -> tuple[Any, int]:
    if not meta or not meta.get("window"):
        return None, 0
    window = {
        k: tuple(jnp.asarray(x, jnp.float32) for x in v)
        if isinstance(v, list)
        else jnp.asarray(v, jnp.float32)
        for k, v in meta["window"].items()
    }
    return window, int(meta.get("window_steps", 0))


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in values.items())
