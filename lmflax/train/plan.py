"""The planner: what a config costs on a mesh, before anything is allocated or trained.

`python train.py --config=... --plan [--topology=v5e:4x4] [--peak_tflops=...]` builds the
trainer from shapes alone, lowers and compiles the real sharded train step ahead of time (for
this machine's devices, for a TPU slice described by libtpu, or for NVIDIA GPUs that this
machine need not have: `--topology=h100`, `h200:8`) and prints:

- parameter count and FLOPs per token, 6·N + 12·L·H·Q·T (PaLM's accounting: N the parameters
  that take part in matrix multiplies, i.e. all but lookup-only embedding tables; L layers, H
  heads, Q head size, T sequence length; the attention term counts QKᵀ and AV for all T keys,
  forward and backward, as fused kernels without causal block skipping compute them);
- per-device bytes: parameters and optimizer state (their shard shapes under the mesh rules),
  the batch, and the compiled step's temporaries (activations kept for the backward pass under
  the remat policy, gradients, workspace), from XLA's memory analysis of the compiled step;
- the step time a given peak FLOP/s (and memory bandwidth) would allow for XLA's own count of
  the step's FLOPs and bytes, and the MFU that step time means.

With `mesh.memory_budget_gib` set (or, for a TPU or GPU topology, the chip's HBM), a config whose
step needs more per device than that is refused with the numbers. Without a GPU, XLA:GPU
compiles with heuristics instead of autotuning and reports no FLOP count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import topologies
from jax.sharding import NamedSharding, PartitionSpec

from lmflax.config import Config, ConfigError
from lmflax.train.trainer import Trainer

log = logging.getLogger("lmflax")

# Seconds between the "still compiling" lines while a step compiles ahead of time.
HEARTBEAT_SECONDS = 15.0

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures (Cloud TPU system architecture pages, NVIDIA datasheets)."""

    name: str
    peak_flops: float  # bf16 FLOP/s
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s


# Keyed by `jax.Device.device_kind`.
CHIPS = {
    "TPU v4": Chip("v4", 275e12, 32 * GIB, 1200e9),
    "TPU v5 lite": Chip("v5e", 197e12, 16 * GIB, 819e9),
    "TPU v5": Chip("v5p", 459e12, 95 * GIB, 2765e9),
    "TPU v6 lite": Chip("v6e", 918e12, 32 * GIB, 1638e9),
    # SXM parts, dense bf16; the HBM is what the device reports as usable, not the marketed GB.
    "NVIDIA H100 80GB HBM3": Chip("h100", 989e12, 79.1 * GIB, 3350e9),
    "NVIDIA H200": Chip("h200", 989e12, 139.8 * GIB, 4800e9),
}


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """What XLA:GPU needs to compile for an NVIDIA GPU it cannot query (its
    GpuTargetConfigProto, the `--xla_gpu_target_config_filename` format); memory size and
    bandwidth come from the chip's entry in CHIPS, keyed by `device_kind`."""

    device_kind: str
    core_count: int
    l2_cache_bytes: int
    clock_ghz: float
    compute_capability: tuple[int, int]

    def proto_text(self) -> str:
        chip = CHIPS[self.device_kind]
        major, minor = self.compute_capability
        info = {
            "threads_per_block_limit": 1024,
            "threads_per_warp": 32,
            "shared_memory_per_block": 48 * 1024,
            "shared_memory_per_core": 228 * 1024,
            "threads_per_core_limit": 2048,
            "core_count": self.core_count,
            "fpus_per_core": 128,
            "block_dim_limit_x": 2**31 - 1,
            "block_dim_limit_y": 65535,
            "block_dim_limit_z": 65535,
            "memory_bandwidth": int(chip.hbm_bandwidth),
            "l2_cache_size": self.l2_cache_bytes,
            "clock_rate_ghz": self.clock_ghz,
            "device_memory_size": int(chip.hbm_bytes),
            "shared_memory_per_block_optin": 227 * 1024,
            "registers_per_core_limit": 65536,
            "registers_per_block_limit": 65536,
        }
        body = "".join(f"  {k}: {v}\n" for k, v in info.items())
        return (
            f"gpu_device_info {{\n{body}  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
            'platform_name: "CUDA"\n'
            "dnn_version_info { major: 9 minor: 8 }\n"
            "runtime_version { major: 12 minor: 8 }\n"
            f'device_description_str: "{self.device_kind}"\n'
        )


# --topology names for NVIDIA GPUs ('h200', or 'h200:8' for eight of them in one host).
GPU_TARGETS = {
    "h100": GpuTarget("NVIDIA H100 80GB HBM3", 132, 50 * 2**20, 1.98, (9, 0)),
    "h200": GpuTarget("NVIDIA H200", 132, 60 * 2**20, 1.98, (9, 0)),
}


@dataclasses.dataclass
class Plan:
    """Everything the planner reports; bytes are per device."""

    devices: int
    device_kind: str
    mesh: dict[str, int]
    params: int
    matmul_params: int
    flops_per_token: float
    attention_flops_per_token: float
    tokens_per_step: int
    param_bytes: int
    opt_state_bytes: int
    batch_bytes: int
    # XLA's memory analysis of the compiled step (per device).
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    compiler_peak_bytes: int
    # XLA's cost analysis of the compiled step (per device); None where the backend gives none.
    xla_flops: float | None
    xla_bytes_accessed: float | None
    remat: str
    chip: Chip | None = None
    frozen_bytes: int = 0  # LoRA's frozen base (not trained: no optimizer state)

    @property
    def model_flops_per_step(self) -> float:
        return self.flops_per_token * self.tokens_per_step

    @property
    def resident_bytes(self) -> int:
        """Inputs (the frozen base included), outputs not written over donated inputs, and the
        program."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.code_bytes

    @property
    def peak_bytes(self) -> int:
        """What the step needs per device: the resident buffers plus temporaries, or the
        compiler's own peak where that is larger."""
        return max(self.resident_bytes + self.temp_bytes, self.compiler_peak_bytes)

    @property
    def activation_bytes(self) -> int:
        """Activations kept for the backward pass (under the remat policy), gradients and
        workspace: XLA's temporaries, or the part of the compiler's peak beyond the resident
        buffers where that is larger (the TPU compiler counts some temporaries only there)."""
        return self.peak_bytes - self.resident_bytes

    def step_time(
        self, peak_flops: float, hbm_bandwidth: float | None = None
    ) -> tuple[float, float]:
        """(seconds, MFU): the step time the device's peak FLOP/s (and memory bandwidth) allow
        for the compiled step's FLOPs and bytes (or the model's FLOPs where XLA gives none), and
        the model-FLOPs utilisation that time means. Communication is not modelled."""
        # XLA's count covers one iteration of a loop (scanned layers): never below the model's.
        flops = max(self.xla_flops or 0.0, self.model_flops_per_step / self.devices)
        seconds = flops / peak_flops
        if hbm_bandwidth and self.xla_bytes_accessed:
            seconds = max(seconds, self.xla_bytes_accessed / hbm_bandwidth)
        mfu = self.model_flops_per_step / (self.devices * peak_flops * seconds)
        return seconds, mfu

    def report(self, peak_flops: float | None = None, hbm_bandwidth: float | None = None) -> str:
        mesh = " × ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [
            f"devices: {self.devices} × {self.device_kind}; mesh {mesh}; remat {self.remat!r}",
            f"parameters: {self.params:,} ({self.matmul_params:,} in matrix multiplies)",
            f"FLOPs per token: {self.flops_per_token:.4g} = 6N {6 * self.matmul_params:.4g} + "
            f"attention {self.attention_flops_per_token:.4g}; "
            f"{self.model_flops_per_step:.4g} per step of {self.tokens_per_step:,} tokens",
            "per-device memory of the compiled train step:",
            f"  parameters               {_fmt_bytes(self.param_bytes)}"
            + ("  (trained: the LoRA adapters)" if self.frozen_bytes else ""),
            *(
                [f"  frozen base              {_fmt_bytes(self.frozen_bytes)}"]
                if self.frozen_bytes
                else []
            ),
            f"  optimizer state          {_fmt_bytes(self.opt_state_bytes)}",
            f"  batch                    {_fmt_bytes(self.batch_bytes)}",
            f"  activations & workspace  {_fmt_bytes(self.activation_bytes)}"
            "  (saved activations, gradients, scratch)",
            f"  program                  {_fmt_bytes(self.code_bytes)}",
            f"  total                    {_fmt_bytes(self.peak_bytes)}",
        ]
        if self.xla_flops:
            ratio = self.xla_flops * self.devices / self.model_flops_per_step
            if ratio >= 1:
                why = ": rematerialisation, masking, optimizer"
            elif ratio < 0.5:
                why = (
                    ": XLA counts a loop body once, so scanned layers are undercounted; the "
                    "step time below uses the model's FLOPs"
                )
            else:
                why = ""
            lines.append(
                f"XLA counts {self.xla_flops:.4g} FLOPs per device per step "
                f"({ratio:.2f}× the model's FLOPs{why})"
            )
        if peak_flops:
            seconds, mfu = self.step_time(peak_flops, hbm_bandwidth)
            bound = f"{peak_flops / 1e12:.4g} TFLOP/s" + (
                f" and {hbm_bandwidth / 1e9:.4g} GB/s" if hbm_bandwidth else ""
            )
            lines.append(
                f"at {bound} per device: step ≥ {seconds * 1e3:.4g} ms, "
                f"{self.tokens_per_step / seconds:,.0f} tokens/s, MFU ≤ {mfu:.1%}"
            )
        else:
            lines.append("step time and MFU: give --peak_tflops (per device)")
        return "\n".join(lines)


def _fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:8.2f} {unit}"
    return f"{n:8.0f} B"


def _shard_bytes(tree: Any) -> int:
    """Per-device bytes of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def matmul_parameter_count(boxed_params: Any) -> int:
    """Parameters that take part in matrix multiplies: all but lookup-only embedding tables
    (positions, token types, and the token table when a separate output projection exists),
    recognised by their logical axis names."""
    specs = nn.get_partition_spec(boxed_params)
    names = [
        tuple(s) if isinstance(s, PartitionSpec) else ()
        for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    ]
    sizes = [math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(boxed_params))]
    has_output_kernel = ("embed", "vocab") in names
    total = 0
    for axes, size in zip(names, sizes, strict=True):
        lookup = "positions" in axes or "token_types" in axes
        if axes == ("vocab", "embed") and has_output_kernel:
            lookup = True
        total += 0 if lookup else size
    return total


def attention_flops_per_token(cfg: Config) -> float:
    """12·L·H·Q·T: QKᵀ and AV (2 FLOPs per multiply-add each, for T keys), times 3 for the
    forward and backward passes."""
    m = cfg.model
    return 12.0 * m.num_layers * m.num_heads * m.resolved_head_dim * cfg.data.seq_len


def model_costs(trainer: Any) -> dict[str, Any]:
    """Parameter counts and FLOPs per token of the trainer's model, from shapes alone:
    {params, matmul_params, flops_per_token, attention_flops_per_token}."""
    with trainer.context():
        if getattr(trainer, "lora_plan", None) is not None:
            # LoRA: the model computes with the whole (frozen + adapted) parameter tree. Traced
            # with the global batch: a fused attention kernel shards it over the mesh.
            dummy = trainer.task.dummy_batch(trainer.cfg.data.batch_size)
            boxed = jax.eval_shape(
                lambda r: trainer.task.init(r, dummy)["params"], trainer.init_rng
            )
        else:
            boxed = jax.eval_shape(trainer.init_fn, trainer.init_rng)["params"]
    matmul = matmul_parameter_count(boxed)
    attn = attention_flops_per_token(trainer.cfg)
    return {
        "params": sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(boxed))),
        "matmul_params": matmul,
        "flops_per_token": 6.0 * matmul + attn,
        "attention_flops_per_token": attn,
    }


def _abstract_inputs(trainer: Any, example: dict[str, Any] | None = None) -> tuple[Any, Any, Any]:
    cfg = trainer.cfg
    state = trainer.state.with_arrays(trainer.abstract_for_restore())
    B = cfg.data.batch_size
    example = trainer.task.dummy_batch(1) if example is None else example
    batch = {
        k: jax.ShapeDtypeStruct((B, *v.shape[1:]), v.dtype, sharding=trainer.batch_sharding)
        for k, v in example.items()
    }
    key = jax.eval_shape(lambda: jax.random.key(0))
    rng = jax.ShapeDtypeStruct(
        key.shape, key.dtype, sharding=NamedSharding(trainer.mesh, PartitionSpec())
    )
    return state, batch, rng


def compile_train_step(trainer: Any, example: dict[str, Any] | None = None) -> Any:
    """The trainer's sharded train step lowered from shapes and compiled ahead of time (for the
    trainer's devices, which may be a TPU or GPU topology's). Nothing is allocated.

    example: a batch whose keys, dtypes and trailing shapes the step is compiled for (rows are
    ignored; the config's batch size is used); default the task's dummy batch, which carries
    every optional key (segment ids, positions, ...)."""
    state, batch, rng = _abstract_inputs(trainer, example)
    with trainer.context():
        return trainer.jit_train_step().lower(state, batch, rng).compile()


@contextlib.contextmanager
def heartbeat(what: str, every: float | None = None) -> Any:
    """Logs 'WHAT ...' now, 'still WHAT (N s)' every `every` seconds while inside (a TPU slice's
    step can take minutes to compile, with no other output), and 'WHAT: done in N s' at the end."""
    every = HEARTBEAT_SECONDS if every is None else every
    start = time.perf_counter()
    done = threading.Event()

    def beat() -> None:
        while not done.wait(every):
            log.info("still %s (%.0f s)", what, time.perf_counter() - start)

    log.info("%s ...", what)
    thread = threading.Thread(target=beat, name="lmflax-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    log.info("%s: done in %.1f s", what, time.perf_counter() - start)


def make_plan(trainer: Any) -> Plan:
    """Plans `trainer` (a `Trainer.create(cfg, init=False, devices=...)`) from its compiled
    train step."""
    cfg = trainer.cfg
    devices = trainer.mesh.devices
    kind = devices.flat[0].device_kind
    with heartbeat(f"compiling the train step ahead of time for {devices.size} x {kind}"):
        compiled = compile_train_step(trainer)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    if isinstance(cost, Sequence):  # older jax returned one dict per program
        cost = cost[0] if cost else None
    abstract = trainer.abstract_for_restore()
    _, batch, _ = _abstract_inputs(trainer)
    costs = model_costs(trainer)
    device = trainer.mesh.devices.flat[0]
    return Plan(
        devices=trainer.mesh.devices.size,
        device_kind=device.device_kind,
        mesh=dict(trainer.mesh.shape),
        **costs,
        tokens_per_step=cfg.data.batch_size * cfg.data.seq_len,
        param_bytes=_shard_bytes(abstract["params"]),
        frozen_bytes=_frozen_bytes(trainer),
        opt_state_bytes=_shard_bytes(abstract["opt_state"]),
        batch_bytes=_shard_bytes(batch),
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        code_bytes=int(mem.generated_code_size_in_bytes) if device.platform == "tpu" else 0,
        # XLA:CPU's peak covers only the arguments; TPU's is the whole step.
        compiler_peak_bytes=int(getattr(mem, "peak_memory_in_bytes", 0) or 0),
        xla_flops=_positive(cost, "flops"),
        xla_bytes_accessed=_positive(cost, "bytes accessed"),
        remat=cfg.model.remat,
        chip=CHIPS.get(device.device_kind),
    )


def _frozen_bytes(trainer: Any) -> int:
    """Per-device bytes of LoRA's frozen base (0 without LoRA), held whether or not the
    checkpoint stores it."""
    frozen = trainer.abstract_state.get("frozen")
    if frozen is None:
        return 0
    shardings = trainer.all_shardings()["frozen"]
    sized = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), frozen, shardings
    )
    return _shard_bytes(sized)


def _positive(cost: dict[str, float] | None, key: str) -> float | None:
    value = (cost or {}).get(key)
    return float(value) if value is not None and value > 0 else None


def _human(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.3f} {unit}"
    return f"{n:.0f} B"


def check_budget(plan: Plan, budget_gib: float, what: str = "mesh.memory_budget_gib") -> None:
    """Raises ConfigError (exit code 2 in train.py) if the step needs more than the budget."""
    if plan.peak_bytes <= budget_gib * GIB:
        return
    raise ConfigError(
        f"the train step needs {plan.peak_bytes / GIB:.4g} GiB per device but {what} is "
        f"{budget_gib:g} GiB: parameters {_human(plan.param_bytes)} + optimizer state "
        f"{_human(plan.opt_state_bytes)} + batch {_human(plan.batch_bytes)} + activations, "
        f"gradients and workspace {_human(plan.activation_bytes)} + program "
        f"{_human(plan.code_bytes)} (XLA's memory analysis; mesh {dict(plan.mesh)}, remat "
        f"{plan.remat!r}). Shard more (mesh.fsdp, mesh.tensor), rematerialise "
        "(model.remat='full'), or lower data.batch_size / raise optimizer.grad_accum_steps"
    )


def topology_devices(name: str) -> list[jax.Device]:
    """Compile-only devices (nothing runs on them) of a TPU slice described by libtpu, e.g.
    'v5e:4x4', 'v5p:2x2x2', 'v4:2x2x1', 'v6e:2x2', or of NVIDIA GPUs in one host, 'h100' or
    'h200' with an optional ':N' GPU count ('h200:8')."""
    chip, _, count = name.partition(":")
    if chip.lower() in GPU_TARGETS:
        count = count or "1"
        if not count.isdigit() or int(count) < 1:
            raise ConfigError(
                f"--topology={name!r}: the GPU count after ':' must be a positive integer"
            )
        return gpu_topology_devices(chip.lower(), int(count))
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(
            f"--topology={name} needs libtpu to compile for TPUs: pip install 'libtpu==0.0.42.*' "
            "(the version jax[tpu]==0.10.2 pins)"
        )
    # We only compile: several planners (or a planner next to a TPU job) may load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # libtpu raises a JaxRuntimeError (INVALID_ARGUMENT) for bad names
        raise ConfigError(
            f"--topology={name!r} is not a TPU slice libtpu knows ({e}) nor a GPU "
            f"({', '.join(GPU_TARGETS)}); accepted look like v5e:2x2, v5e:4x4, v5p:2x2x1, "
            "v4:2x2x2, v6e:2x2, h100, h200:8"
        ) from None


def cuda_plugin_installed() -> bool:
    """Whether jax's CUDA plugin (CUDA 12 or 13) is installed, which compiling for NVIDIA GPUs
    needs; a GPU is not needed."""
    plugins = ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")
    try:
        return any(importlib.util.find_spec(p) is not None for p in plugins)
    except ModuleNotFoundError:  # find_spec imports the parent: no jax_plugins package at all
        return False


def gpu_topology_devices(chip: str, count: int = 1) -> list[jax.Device]:
    """`count` compile-only NVIDIA GPUs of kind `chip` (a key of GPU_TARGETS) in one host, for
    XLA:GPU to compile for without a GPU here (jax's CUDA plugin must be installed: the test
    extra has it; cuDNN attention also needs the cuDNN library, nvidia-cudnn-cu12)."""
    if not cuda_plugin_installed():
        raise ConfigError(
            f"--topology={chip}: compiling for NVIDIA GPUs needs jax's CUDA plugin: pip install "
            "jax-cuda12-plugin==0.10.2 jax-cuda12-pjrt==0.10.2 (and nvidia-cudnn-cu12 for cuDNN "
            "attention), as the test extra does; no GPU is needed"
        )
    desc = topologies.get_topology_desc(
        platform="cuda", target_config=GPU_TARGETS[chip].proto_text(), topology=f"1x1x{count}"
    )
    return list(desc.devices)


def main(
    cfg: Config,
    *,
    topology: str | None = None,
    peak_tflops: float | None = None,
    hbm_gbps: float | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> tuple[Plan, str]:
    """Plans cfg on `devices` (default: this machine's, or the TPU topology's); returns the plan
    and its report. Raises ConfigError when it does not fit the budget."""
    if topology is not None:
        devices = topology_devices(topology)
    trainer = Trainer.create(cfg, init=False, devices=devices, need_weights=False)
    plan = make_plan(trainer)
    chip = plan.chip
    peak = peak_tflops * 1e12 if peak_tflops else (chip.peak_flops if chip else None)
    bandwidth = hbm_gbps * 1e9 if hbm_gbps else (chip.hbm_bandwidth if chip else None)
    report = plan.report(peak, bandwidth)
    try:
        if cfg.mesh.memory_budget_gib:
            check_budget(plan, cfg.mesh.memory_budget_gib)
            report += f"\nfits mesh.memory_budget_gib={cfg.mesh.memory_budget_gib:g}"
        elif chip is not None:
            check_budget(plan, chip.hbm_bytes / GIB, f"the {chip.name} chip's HBM")
            report += f"\nfits the {chip.name} chip's {chip.hbm_bytes / GIB:g} GiB of HBM"
    except ConfigError as e:
        raise ConfigError(f"{e}\n{report}") from None
    return plan, report
