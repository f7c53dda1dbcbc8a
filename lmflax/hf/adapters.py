"""Exporting LoRA: merged into a Hugging Face checkpoint, or as a PEFT adapter folder.

    save_merged(model_config, plan, frozen, adapters, OUT)      # W + (alpha/r)·A·B, transformers loads it
    save_peft_adapter(model_config, plan, params, adapters, OUT, base_model_name_or_path=DIR)

The adapter folder holds adapter_config.json and adapter_model.safetensors with PEFT's names
(`base_model.model.<module>.lora_A.weight` [r, in], `.lora_B.weight` [out, r]), for the
architecture `save_pretrained` would export; `peft.PeftModel.from_pretrained(hf_model, OUT)`
loads it. Where one checkpoint tensor holds several lmflax kernels (GPT-2's fused c_attn holds
query, key and value), their adapters become one adapter of rank m·r on it (block-structured, so
its update is exactly theirs), declared through PEFT's rank_pattern / alpha_pattern.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lmflax.data.hub import CheckpointError
from lmflax.hf import convert
from lmflax.hf.files import WeightSource, find_weights, write_json, write_safetensors
from lmflax.hf.pretrained import _architecture_of, parse_init_from, save_pretrained
from lmflax.models import lora
from lmflax.models.config import LoraConfig, ModelConfig
from lmflax.nn import unstack_layers


def base_fingerprint(init_from: str) -> dict[str, Any]:
    """What a LoRA checkpoint records of the base it references (model.init_from='hf:DIR'):
    the directory and {file: [size, sha256]} of its config.json and weight files (every shard
    of a sharded checkpoint). Reads every byte of the weights once (the trainer asks process 0
    alone, `lmflax.parallel.distributed.from_coordinator`)."""
    directory = parse_init_from(init_from)
    weights = find_weights(directory)
    files = [directory / "config.json", weights]
    if weights.name.endswith(".index.json"):
        files += WeightSource._shards(weights)
    out = {}
    for f in sorted(set(files)):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 24), b""):
                h.update(block)
        out[f.name] = [f.stat().st_size, h.hexdigest()]
    return {"directory": str(directory.resolve()), "files": out}


def save_merged(
    model_config: ModelConfig,
    plan: lora.LoraPlan,
    frozen: Any,
    adapters: Any,
    path: str | Path,
    **kwargs: Any,
) -> Path:
    """Writes the base with the adapters merged in (W + (alpha/r)·A·B, in float32) as a
    Hugging Face model directory (`save_pretrained`; kwargs: tokenizer, architecture)."""
    merged = jax.device_get(jax.jit(lambda f, a: lora.merge(plan, f, a))(frozen, adapters))
    config = dataclasses.replace(model_config, lora=LoraConfig())
    return save_pretrained(config, merged, path, **kwargs)


def _unrolled(plan: lora.LoraPlan) -> dict[convert.Path_, lora.KernelSpec]:
    """The adapted kernels' specs with scanned stacks unrolled: {module path: spec}."""
    out = {}
    for spec in plan.adapted:
        if spec.lead == 0:
            out[spec.path] = spec
            continue
        if spec.lead != 1 or "layers" not in spec.path:
            raise CheckpointError(f"cannot unroll the stacked adapter of {spec.name}")
        at = spec.path.index("layers")
        for i in range(spec.shape[0]):
            path = (*spec.path[:at], f"layers_{i}", *spec.path[at + 1 :])
            out[path] = dataclasses.replace(
                spec, path=path, shape=spec.shape[1:], names=spec.names[1:], lead=0
            )
    return out


def _factors(
    rule: convert.Rule,
    members: list[tuple[int, convert.Path_]],
    specs: Mapping[convert.Path_, lora.KernelSpec],
    r: int,
    get: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's (lora_A [m·r, I], lora_B [sum O, m·r]) for the checkpoint tensor of `rule`, whose
    kernels `members` ((index in rule.paths, module path)) have adapters get(path) -> (A, B);
    the rule's kernels are concatenated along the output, in order."""
    module = rule.hf[0]
    sizes = []
    for j, p in enumerate(rule.paths):
        spec = specs.get(p[:-1])
        kshape = rule.shapes[j]
        n_in = spec.n_in if spec is not None else specs[members[0][1]].n_in
        sizes.append((math.prod(kshape[:n_in]), math.prod(kshape[n_in:])))
    inputs = {i for i, _ in sizes}
    if len(inputs) != 1:
        raise CheckpointError(f"{module}: fused kernels with different inputs {sizes}")
    (I,) = inputs
    total_out = sum(o for _, o in sizes)
    a_hf = np.zeros((len(members) * r, I), np.float64)
    b_hf = np.zeros((total_out, len(members) * r), np.float64)
    for k, (j, p) in enumerate(members):
        a, b = get(p)
        offset = sum(o for _, o in sizes[:j])
        a_hf[k * r : (k + 1) * r] = np.asarray(a, np.float64).reshape(I, r).T
        b_hf[offset : offset + sizes[j][1], k * r : (k + 1) * r] = (
            np.asarray(b, np.float64).reshape(r, sizes[j][1]).T
        )
    return a_hf, b_hf


def peft_tensors(
    model_config: ModelConfig,
    plan: lora.LoraPlan,
    params: Any,
    adapters: Any,
    *,
    architecture: str | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """PEFT's adapter tensors {name: array} and the adapter_config.json fields that depend on
    the model (target_modules, fan_in_fan_out, rank_pattern, alpha_pattern).

    params: the model's parameter tree (any values of the right shapes: it only tells which
    architecture is exported). Each tensor's placement is checked on random adapters against the
    export of the merged update, so a layout PEFT cannot express is an error, never wrong values.
    """
    r, alpha = plan.config.rank, plan.config.alpha
    flat_params = convert.flatten(unstack_layers(jax.device_get(params)))
    arch = (
        convert.ARCHITECTURES[architecture]
        if architecture is not None
        else _architecture_of(model_config, flat_params)
    )
    num_labels = None
    if arch.head == "classifier":
        num_labels = int(flat_params[("classifier", "kernel")].shape[-1])
    config = dataclasses.replace(model_config, scan_layers=False)
    if arch.family == "bert":
        config = dataclasses.replace(
            config, add_pooler=any(p[-2:] == ("pooler", "kernel") for p in flat_params)
        )
    prefix = arch.base_prefix if arch.head != "none" else ""
    lay = convert.layout(arch, config, prefix, num_labels)
    flat_adapters = convert.flatten(unstack_layers(jax.device_get(adapters)))
    specs = _unrolled(plan)
    by_kernel = {}
    for rule in lay.rules:
        for j, p in enumerate(rule.paths):
            if p[-1] == lora.KERNEL:
                by_kernel[p[:-1]] = (rule, j)
    tensors: dict[str, np.ndarray] = {}
    targets, rank_pattern, alpha_pattern, layouts = [], {}, {}, set()
    done: set[int] = set()
    probe = np.random.default_rng(0)
    for path in specs:
        if path not in by_kernel:
            raise CheckpointError(
                f"the adapter of {'/'.join(path)} has no tensor in a {arch.name} checkpoint"
            )
        rule, _ = by_kernel[path]
        if id(rule) in done:
            continue
        done.add(id(rule))
        if not rule.hf[0].endswith(".weight") or len(rule.hf) != 1:
            raise CheckpointError(f"cannot express an adapter on {rule.hf} for PEFT")
        module = rule.hf[0].removesuffix(".weight")
        members = [
            (j, p[:-1])
            for j, p in enumerate(rule.paths)
            if p[-1] == lora.KERNEL and p[:-1] in specs
        ]

        # The placement check: random adapters, merged update exported through the rule vs
        # PEFT's B·A (torch Linear, [out, in]) or its transpose (Conv1D, fan_in_fan_out).
        randoms = {
            p: (
                probe.standard_normal(lora.adapter_shapes(specs[p], r)[0]),
                probe.standard_normal(lora.adapter_shapes(specs[p], r)[1]),
            )
            for _, p in members
        }
        kernels = []
        for p in rule.paths:
            if p[:-1] in randoms:
                a, b = randoms[p[:-1]]
                spec = specs[p[:-1]]
                kernels.append(
                    (a.reshape(-1, r) @ b.reshape(r, -1)).reshape(spec.in_shape + spec.out_shape)
                )
            else:
                kernels.append(np.zeros(rule.shapes[rule.paths.index(p)]))
        (want,) = rule.to_hf(*kernels)
        a_hf, b_hf = _factors(rule, members, specs, r, randoms.__getitem__)
        got = b_hf @ a_hf
        if want.shape == got.shape and np.allclose(want, got):
            layouts.add(False)
        elif want.shape == got.T.shape and np.allclose(want, got.T):
            layouts.add(True)
        else:
            raise CheckpointError(
                f"cannot express the adapters of {module} ({arch.name}) as one PEFT LoRA module"
            )
        a_hf, b_hf = _factors(
            rule,
            members,
            specs,
            r,
            lambda p: (flat_adapters[(*p, lora.A)], flat_adapters[(*p, lora.B)]),
        )
        tensors[f"base_model.model.{module}.lora_A.weight"] = a_hf.astype(np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = b_hf.astype(np.float32)
        targets.append(module)
        if len(members) > 1:
            # Rank m·r with alpha m·alpha keeps PEFT's scale alpha_peft / r_peft = alpha / r.
            rank_pattern[module] = len(members) * r
            alpha_pattern[module] = len(members) * alpha
    if len(layouts) > 1:
        raise CheckpointError(
            f"{arch.name}: adapted modules mix torch Linear and Conv1D weights; PEFT's "
            "fan_in_fan_out is one setting per adapter"
        )
    fields = {
        "target_modules": sorted(targets),
        "fan_in_fan_out": bool(layouts and layouts.pop()),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }
    return tensors, fields


def save_peft_adapter(
    model_config: ModelConfig,
    plan: lora.LoraPlan,
    params: Any,
    adapters: Any,
    path: str | Path,
    *,
    base_model_name_or_path: str | None = None,
    architecture: str | None = None,
) -> Path:
    """Writes a PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors) for
    the Hugging Face export of this model (see `peft_tensors`). base_model_name_or_path: what
    adapter_config.json names as the base (the model.init_from directory, or the merged export's
    base)."""
    tensors, fields = peft_tensors(model_config, plan, params, adapters, architecture=architecture)
    c = plan.config
    config: Mapping[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": c.rank,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        **fields,
    }
    out = Path(path).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "adapter_config.json", dict(config))
    write_safetensors(out / "adapter_model.safetensors", tensors)
    return out
