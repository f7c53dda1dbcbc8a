"""Sharded checkpoints straight into sharded parameters, and back.

Tiny random transformers models (Llama, GPT-2) saved as HF shards (`model.safetensors.index.json`
+ `model-0000k-of-0000n.safetensors`) load on an fsdp=8 mesh of fake CPU devices, in one process
and in two processes x 4 devices under jax.distributed: every fsdp-sharded parameter's shards
are 1/8 of it, each process reads only the bytes its devices hold (never a whole sharded tensor),
and the values equal an unsharded load. The sharded parameters export tensor by tensor into
shards that transformers loads back unchanged. The lazy views under it are checked against
numpy here, in-process.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
from safetensors.numpy import save_file

from lmflax.hf import CheckpointError, files, lazy

from .conftest import ROOT

WORKER = ROOT / "tests" / "hf_sharded_worker.py"
V = 256
SHARD = "60KB"  # transformers' max_shard_size: the tiny models below take 4-9 files


# ---------------------------------------------------------------------------------------------
# Lazy views against numpy (in-process)


@pytest.fixture
def stored(tmp_path):
    w = np.random.default_rng(0).standard_normal((24, 16)).astype(np.float32)
    path = tmp_path / "model.safetensors"
    save_file({"b": np.arange(5, dtype=np.float32), "w": w}, str(path))
    with files.WeightSource(path) as src:
        yield w, src


# The transforms the converters apply (torch Linear transposes and head splits, GPT-2's fused
# q/k/v, T5's scaled query, BART's position offset, a scanned stack) and some blocks of each.
TRANSFORMS = {
    "linear": lambda w: w.T.reshape(16, 4, 6),
    "linear_out": lambda w: w.T.reshape(2, 8, 24),
    "fused_qkv": lambda w: tuple(np.moveaxis(w.T.reshape(16, 3, 2, 4), 1, 0))[1],
    "scaled": lambda w: (w.T * 0.5).reshape(16, 2, 12)[3:9:2],
    "offset": lambda w: w[2:],
    "split_merge": lambda w: w.reshape(2, 3, 4, 16).transpose(3, 0, 2, 1),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_lazy_blocks_equal_numpy_and_read_only_their_bytes(stored, name):
    w, src = stored
    want, view = TRANSFORMS[name](w), TRANSFORMS[name](src.lazy("w"))
    assert isinstance(view, lazy.Lazy) and view.shape == want.shape
    rng = np.random.default_rng(1)
    for _ in range(20):
        index = []
        for n in want.shape:
            a, b = sorted(rng.integers(0, n + 1, 2))
            index.append(slice(int(a), int(b)))
        index = tuple(index)
        files.read_counter.reset()
        np.testing.assert_array_equal(view.read(index), want[index])
        assert files.read_counter.bytes == want[index].nbytes
    assert files.read_counter.whole == 0


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_blocks_of_many_runs_read_their_span_once(stored, name, monkeypatch):
    """Past _MAX_RUNS separate runs, a block reads the bytes from its first to its last
    element in one read (never more than the tensor)."""
    monkeypatch.setattr(lazy, "_MAX_RUNS", 0)
    w, src = stored
    want, view = TRANSFORMS[name](w), TRANSFORMS[name](src.lazy("w"))
    index = tuple(slice(1, max(2, n - 1)) for n in want.shape)
    files.read_counter.reset()
    np.testing.assert_array_equal(view.read(index), want[index])
    assert files.read_counter.reads <= 1 and files.read_counter.bytes <= w.nbytes


def test_lazy_stack_cast_and_fallback(stored):
    w, src = stored
    v = src.lazy("w")
    stacked = lazy.stack([v.T, (v * 2).T])
    index = (slice(0, 2), slice(3, 9), slice(5, 6))
    np.testing.assert_array_equal(stacked.read(index), np.stack([w.T, w.T * 2])[index])
    np.testing.assert_array_equal(v.astype(np.float16).read(), w.astype(np.float16))
    # Merging axes that are not adjacent in memory has no strided form: this tensor is read
    # whole (counted), and the values are still right.
    files.read_counter.reset()
    flat = v.T.reshape(-1)
    assert isinstance(flat, np.ndarray) and files.read_counter.whole == 1
    np.testing.assert_array_equal(flat, w.T.reshape(-1))
    assert lazy.array_equal(v, src["w"]) and not lazy.array_equal(v, v * 2)


def test_a_truncated_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": np.ones((64, 64), np.float32)}, str(path))
    with files.WeightSource(path) as src:
        view = src.lazy("w")
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 100)
        with pytest.raises(CheckpointError, match=r"tensor 'w'.*truncated"):
            view.read((slice(60, 64), slice(None)))


def test_shard_planning_follows_transformers():
    assert files.parse_size("5GB") == 5 * 10**9 and files.parse_size("2MiB") == 2 * 2**20
    with pytest.raises(ValueError, match="max_shard_size is '5 parsecs'"):
        files.parse_size("5 parsecs")
    sizes = {"a": 40, "b": 30, "c": 100, "d": 10, "e": 20}
    assert files.plan_shards(sizes, 60) == [["a"], ["b"], ["c"], ["d", "e"]]


def test_streamed_shards_read_back_with_the_safetensors_library(tmp_path):
    import ml_dtypes
    from safetensors import safe_open

    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal((30, 7)).astype(np.float32),
        "b": rng.standard_normal((5,)).astype(ml_dtypes.bfloat16),
        "c": rng.integers(0, 9, (3, 3)).astype(np.int64),
        "d": rng.standard_normal((100,)).astype(np.float16),
    }
    specs = {n: (t.dtype, t.shape) for n, t in tensors.items()}
    (tmp_path / "model.safetensors").write_bytes(b"stale")  # an older single-file export
    written = files.write_safetensors_stream(tmp_path, specs, iter(tensors.items()), 900)
    assert [p.name for p in written] == [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    assert not (tmp_path / "model.safetensors").exists()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {
        "a": written[0].name,  # 840 bytes, + b's 10 <= 900; + c's 72 would not fit
        "b": written[0].name,
        "c": written[1].name,
        "d": written[1].name,
    }
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    for path in written:
        with safe_open(str(path), framework="np") as f:
            for name in f.keys():  # noqa: SIM118  (a safe_open handle, not a dict)
                np.testing.assert_array_equal(f.get_tensor(name), tensors[name])
    with files.WeightSource(tmp_path / "model.safetensors.index.json") as src:
        for name, t in tensors.items():
            np.testing.assert_array_equal(src.lazy(name).read(), t)


# ---------------------------------------------------------------------------------------------
# Real checkpoints on fake devices (subprocesses)


@pytest.fixture(scope="module")
def transformers():
    torch = pytest.importorskip("torch")
    import transformers

    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    return transformers


def _tokenizer(transformers, path):
    """A word-level tokenizer.json of V tokens (the trainer's data section names one)."""
    import tokenizers

    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t0", eos_token="t1"
    )
    fast.save_pretrained(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, transformers):
    root = tmp_path_factory.mktemp("sharded")
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=V,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
        )
    )
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    )
    dirs = {}
    for name, model in (("llama", llama), ("gpt2", gpt2)):
        dirs[name] = root / name
        model.save_pretrained(dirs[name], max_shard_size=SHARD)
        index = json.loads((dirs[name] / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 4  # really sharded
        assert not (dirs[name] / "model.safetensors").exists()
    _tokenizer(transformers, dirs["llama"])
    return root, dirs, {"llama": llama.state_dict(), "gpt2": gpt2.state_dict()}


def _stored_bytes(directory) -> int:
    """The checkpoint's tensor data, from its shards' headers (what one full read costs)."""
    total = 0
    for f in directory.glob("model-*.safetensors"):
        for e in files._safetensors_entries(f).values():
            total += e.dtype.itemsize * math.prod(e.shape)
    return total


def _env(devices: int) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu"}
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_NUM_CPU_DEVICES"] = str(devices)
    return env


def _run(procs: list[subprocess.Popen]) -> list[dict]:
    out = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        assert proc.returncode == 0, f"worker exited {proc.returncode}\n{stderr[-6000:]}"
        (line,) = [x for x in stdout.splitlines() if x.startswith("RESULT ")]
        out.append(json.loads(line.removeprefix("RESULT ")))
    return out


def _start(args: list[str], devices: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(WORKER), *map(str, args)],
        cwd=ROOT,
        env=_env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def one_process(checkpoints, tmp_path_factory):
    _, dirs, _ = checkpoints
    out = tmp_path_factory.mktemp("exported")
    (report,) = _run([_start(["one", dirs["llama"], dirs["gpt2"], out], 8)])
    return report, out


def _check_shards(report: dict, processes: int = 1) -> tuple[int, int]:
    """Asserts every parameter's shard shapes and values; returns (the bytes this process
    should read, the largest single tensor's bytes)."""
    expected, largest = 0, 0
    for name, leaf in report["leaves"].items():
        shape, spec = leaf["shape"], leaf["spec"]
        nbytes = 4 * math.prod(shape)  # float32 in the checkpoint and in lmflax
        largest = max(largest, nbytes)
        assert leaf["equal"], f"{name}: a shard differs from the unsharded load"
        assert leaf["devices"] == 8 // processes
        if "fsdp" in spec:
            axis = spec.index("fsdp")
            want = [n // 8 if d == axis else n for d, n in enumerate(shape)]
            assert leaf["shard_shapes"] == [want], name
            expected += nbytes // processes
        else:  # replicated: each process reads it once
            assert leaf["shard_shapes"] == [shape], name
            expected += nbytes
    return expected, largest


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "llama_scanned", "gpt2"])
def test_fsdp8_loads_each_block_once_with_unsharded_values(one_process, checkpoints, name):
    report, _ = one_process
    _, dirs, _ = checkpoints
    r = report[name]
    expected, largest = _check_shards(r)
    # Every matrix is split over fsdp (only norms and biases are replicated).
    matrices = [leaf for n, leaf in r["leaves"].items() if not n.endswith(("scale", "bias"))]
    assert matrices and all("fsdp" in leaf["spec"] for leaf in matrices)
    # 8 devices of one process read the checkpoint once between them: each its own block.
    stored = _stored_bytes(dirs[name.removesuffix("_scanned")])
    assert r["bytes"] == expected == stored
    assert r["whole"] == 0
    # No read brought in a whole matrix: the largest is one device's block of one.
    assert r["largest"] <= largest // 8


@pytest.mark.slow
def test_trainer_starts_from_a_sharded_checkpoint_on_fsdp8(one_process, checkpoints):
    report, _ = one_process
    _, dirs, _ = checkpoints
    t = report["trainer"]
    assert t["init_from"] == f"hf:{dirs['llama'].resolve()}"
    assert t["equal"] == t["params"]  # every parameter has the checkpoint's value
    assert t["shard_shapes"]["token_embed/embedding"] == [[V, 8]]
    assert t["bytes"] == _stored_bytes(dirs["llama"])
    assert t["largest"] <= V * 64 * 4 // 8  # an eighth of the largest matrix, the embedding


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "llama_scanned", "gpt2"])
def test_sharded_export_is_streamed_into_shards_transformers_loads(
    one_process, checkpoints, transformers, name
):
    _, out = one_process
    _, _, states = checkpoints
    directory = out / name
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 4 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == _stored_bytes(directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    want = states[name.removesuffix("_scanned")]
    got = model.state_dict()
    for key, value in want.items():
        if key.endswith(".attn.bias") or key.endswith("masked_bias"):
            continue  # GPT-2's causal-mask buffers, not weights
        np.testing.assert_array_equal(got[key].numpy(), value.numpy(), err_msg=key)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_read_half_of_each_sharded_tensor(checkpoints, tmp_path, transformers):
    _, dirs, states = checkpoints
    address = f"localhost:{_free_port()}"
    out = tmp_path / "exported"
    reports = _run([_start(["two", dirs["llama"], out, address, i], 4) for i in range(2)])
    stored = _stored_bytes(dirs["llama"])
    for i, r in enumerate(reports):
        assert r["process"] == i and r["local_devices"] == 4
        assert r["coordinator_value"] == {"from": 0, "files": {"a": [1, "x"]}}
        assert r["computed"] == (1 if i == 0 else 0)
        for report in (r, r["scanned"]):
            expected, largest = _check_shards(report, processes=2)
            assert report["bytes"] == expected < 0.6 * stored
            assert report["largest"] <= largest // 8
    # Process 0 wrote the export of the scanned parameters (gathered layer by layer, tensor by
    # tensor, from both processes' devices).
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    got = model.state_dict()
    for key, value in states["llama"].items():
        np.testing.assert_array_equal(got[key].numpy(), value.numpy(), err_msg=key)


# Every family's conversion rules stay lazy views (no tensor read whole), in-process on one
# device: tiny random transformers models of each supported family, saved sharded.
FAMILIES = {
    "BertForMaskedLM": ("BertConfig", {}),
    "RobertaForSequenceClassification": (
        "RobertaConfig",
        {"pad_token_id": 1, "type_vocab_size": 1, "max_position_embeddings": 43},
    ),
    "XLMRobertaForMaskedLM": (
        "XLMRobertaConfig",
        {"pad_token_id": 1, "type_vocab_size": 1, "max_position_embeddings": 43},
    ),
    "DistilBertForMaskedLM": (
        "DistilBertConfig",
        {"dim": 32, "n_layers": 2, "n_heads": 4, "hidden_dim": 48},
    ),
    "MistralForCausalLM": ("MistralConfig", {"num_key_value_heads": 2}),
    "Qwen2ForCausalLM": ("Qwen2Config", {"num_key_value_heads": 2}),
    "T5ForConditionalGeneration": (
        "T5Config",
        {"d_model": 32, "d_kv": 8, "d_ff": 48, "num_layers": 2, "num_heads": 4},
    ),
    "BartForConditionalGeneration": (
        "BartConfig",
        {
            "d_model": 32,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 48,
            "decoder_ffn_dim": 48,
        },
    ),
    "MarianMTModel": (
        "MarianConfig",
        {
            "d_model": 32,
            "encoder_layers": 2,
            "decoder_layers": 2,
            "encoder_attention_heads": 4,
            "decoder_attention_heads": 4,
            "encoder_ffn_dim": 48,
            "decoder_ffn_dim": 48,
            "pad_token_id": 63,
            "decoder_start_token_id": 63,
        },
    ),
}
COMMON = {
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 48,
    "max_position_embeddings": 40,
}


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_every_family_loads_lazily_into_a_mesh(arch, transformers, tmp_path):
    import jax

    import lmflax
    from lmflax.config import MeshConfig
    from lmflax.parallel import make_mesh

    config_cls, kwargs = FAMILIES[arch]
    common = COMMON if config_cls not in ("T5Config", "BartConfig", "MarianConfig") else {}
    config = getattr(transformers, config_cls)(**{**common, "vocab_size": 64, **kwargs})
    getattr(transformers, arch)(config).save_pretrained(tmp_path, max_shard_size="8KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _, want = lmflax.from_pretrained(tmp_path, scan_layers=True)
    files.read_counter.reset()
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    _, got = lmflax.from_pretrained(tmp_path, mesh=mesh, scan_layers=True)
    assert files.read_counter.whole == 0  # every transform had a strided view
    # Each stored byte at most once (BART's learned positions skip their 2 offset rows).
    stored = _stored_bytes(tmp_path)
    assert 0.99 * stored <= files.read_counter.bytes <= stored
    jax.tree.map(np.testing.assert_array_equal, got, want)
    assert all(isinstance(x.sharding, jax.sharding.NamedSharding) for x in jax.tree.leaves(got))
