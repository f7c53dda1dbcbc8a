"""Untrusted weight files cannot crash, hang or run code: crafted offsets, strides, shapes and
dtypes in pytorch_model.bin and safetensors files are refused with a CheckpointError naming the
tensor and the file, and a few thousand random mutations of real files (benchmarks/fuzz_weights.py,
run in a subprocess so that a segfault is seen) read cleanly or raise CheckpointError."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from benchmarks import fuzz_weights as fw
from lmflax.data.hub import CheckpointError
from lmflax.hf import files
from lmflax.hf.files import WeightSource


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("torch")
    paths = fw.write_seeds(tmp_path_factory.mktemp("seeds"))
    return {p.name: p for p in paths}


def _read_all(path: Path) -> dict[str, np.ndarray]:
    with WeightSource(path) as src:
        return {name: src[name] for name in src}


def _edited_bin(seeds: dict[str, Path], tmp_path: Path, seed: str, edit: dict) -> Path:
    """The seed .bin with fields of its tensors replaced: {(tensor index, field, i): value}."""

    def change(pkl: bytes) -> bytes:
        fields = fw.tensor_fields(pkl)
        ops = {}
        for (t, field, i), value in edit.items():
            where = fields[t][field] if field in ("shape", "stride") else [fields[t][field]]
            ops[where[i]] = fw._int_op(value)
        return fw.replace_ops(pkl, ops)

    out = tmp_path / "pytorch_model.bin"
    out.write_bytes(fw.edit_pickle(seeds[seed].read_bytes(), change))
    return out


def test_the_seed_files_read_as_torch_wrote_them(seeds):
    import torch

    for name in ("plain.bin", "views.bin", "params.bin", "pt.safetensors"):
        ours = _read_all(seeds[name])
        if name.endswith(".bin"):
            theirs = torch.load(seeds[name], weights_only=True)
        else:
            from safetensors.torch import load_file

            theirs = load_file(str(seeds[name]))
        assert sorted(ours) == sorted(theirs)
        for k, v in theirs.items():
            np.testing.assert_array_equal(ours[k].astype(np.float64), v.detach().double().numpy())


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({(0, "stride", 0): -1}, r"tensor 't' has stride \(-1, 6\)"),  # segfaulted
        ({(0, "stride", 1): -6}, r"tensor 't' has stride \(1, -6\)"),
        ({(1, "offset", 0): -1}, r"tensor 'slice' has storage offset -1"),  # read outside
        (
            {(1, "offset", 0): 24},
            r"tensor 'slice' of shape \(3, 4\), stride \(6, 1\) and storage offset 24 reads element 39, past the end of its storage of 24",
        ),
        ({(0, "shape", 0): -4}, r"tensor 't' has shape \(-4, 4\)"),
        (
            {(0, "shape", 0): 7},
            r"tensor 't' of shape \(7, 4\) has more elements \(28\) than its storage \(24\)",
        ),
        (
            {(2, "stride", 0): 0, (2, "shape", 0): 2**40},
            r"tensor 'row' of shape \(1099511627776,\) has more elements",
        ),
        ({(0, "shape", 0): 2**62}, r"tensor 't' has shape \(4611686018427387904, 4\), too large"),
        (
            {(0, "numel", 0): 25},
            r"tensor 't': its storage '0' holds 96 bytes, fewer than the 100 of 25 float32 elements",
        ),
        ({(0, "numel", 0): -1}, r"storage '0' of -1 elements is malformed"),
    ],
)
def test_crafted_bin_fields_are_refused_naming_tensor_and_file(seeds, tmp_path, edit, message):
    path = _edited_bin(seeds, tmp_path, "views.bin", edit)
    with pytest.raises(CheckpointError, match=message) as e:
        _read_all(path)
    assert str(path) in str(e.value)


def test_a_crafted_stride_through_from_pretrained_is_an_error_not_a_segfault(seeds, tmp_path):
    """The reported crash: a negative stride made from_pretrained segfault (rc 139). Read in a
    fresh process through what from_pretrained reads with (find_weights, WeightSource: a
    config.json is checked before any weight is read, so from_pretrained itself stops earlier
    on a file whose tensors are not a model's)."""
    import subprocess
    import sys

    path = _edited_bin(seeds, tmp_path, "views.bin", {(0, "stride", 0): -100})
    script = (
        "from lmflax.hf.files import WeightSource, find_weights\n"
        f"src = WeightSource(find_weights({str(tmp_path)!r}))\n"
        "[src[n] for n in src]"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"},
    )  # fmt: skip
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("lmflax.data.hub.CheckpointError: ") and str(path) in last, last
    assert "tensor 't' has stride (-100, 6)" in last


def test_pickle_memo_bombs_and_state_setting_are_refused(seeds, tmp_path):
    def swap(pkl: bytes) -> bytes:  # the first BINPUT now claims memo slot 2**31
        first = next(i for i, op in enumerate(fw.pickle_ops(pkl)) if op[0] == "BINPUT")
        return fw.replace_ops(pkl, {first: b"r" + struct.pack("<I", 2**31)})

    out = tmp_path / "pytorch_model.bin"
    out.write_bytes(fw.edit_pickle(seeds["plain.bin"].read_bytes(), swap))
    with pytest.raises(CheckpointError, match=r"memo index 2147483648 in a pickle of"):
        _read_all(out)
    check, rebuild = files._TensorRef.check, files._rebuild_parameter.__code__
    attacks = [  # BUILD (set attributes) on the objects the allowed globals give
        b"\x80\x02ctorch._utils\n_rebuild_parameter\n}X\x08\x00\x00\x00__code__Nsb.",
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(}X\x05\x00\x00\x00checkN\x86tb.",
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(NNNNtR}X\x05\x00\x00\x00shapeNsb.",
    ]
    for attack in attacks:
        out.write_bytes(fw.edit_pickle(seeds["plain.bin"].read_bytes(), lambda _, a=attack: a))
        with pytest.raises(CheckpointError, match=r"not a readable tensor pickle: .*sets the state"):  # fmt: skip
            _read_all(out)
    assert files._TensorRef.check is check and files._rebuild_parameter.__code__ is rebuild


def _edited_safetensors(seeds, tmp_path, edit) -> Path:
    data = seeds["pt.safetensors"].read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    out = tmp_path / "model.safetensors"
    out.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])
    return out


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda h: h["w"].update(data_offsets=[-4, 44]),
            r"tensor 'w' has data_offsets \[-4, 44\]",
        ),
        (
            lambda h: h["w"].update(data_offsets=[0, 10**6]),
            r"tensor 'w' has data_offsets \[0, 1000000\]; .* <= 1\d\d\b",
        ),
        (lambda h: h["w"].update(shape=[3, -4]), r"tensor 'w' has shape \[3, -4\]"),
        (
            lambda h: h["w"].update(shape=[3, 5]),
            r"tensor 'w' of dtype F32 and shape \[3, 5\] needs 60 bytes",
        ),
        (
            lambda h: h["w"].update(dtype="F8_E4M3"),
            r"tensor 'w' has dtype 'F8_E4M3'; readable: F64",
        ),
        (
            lambda h: h["w"].update(shape=[0, 2**62]),
            r"tensor 'w' has shape \[0, 4611686018427387904\], too large",
        ),
        (lambda h: h["w"].pop("shape"), r"tensor 'w' has shape None"),
    ],
)
def test_crafted_safetensors_headers_are_refused_naming_tensor_and_file(
    seeds, tmp_path, edit, message
):
    path = _edited_safetensors(seeds, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as e:
        _read_all(path)
    assert str(path) in str(e.value)


def test_a_safetensors_header_longer_than_the_file_is_refused(seeds, tmp_path):
    out = tmp_path / "model.safetensors"
    data = seeds["np.safetensors"].read_bytes()
    out.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    with pytest.raises(CheckpointError, match=r"its header claims 1099511627776 bytes, but"):
        _read_all(out)


def test_shard_names_stay_in_the_index_directory(seeds, tmp_path):
    shutil.copy(seeds["pt.safetensors"], tmp_path / "a.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "../a.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"names shard '\.\./a\.safetensors'; shards are"):
        WeightSource(index)


def test_fuzzed_weight_files_never_crash_hang_or_run_code(seeds):
    """3,000 random mutations (byte flips, truncations, inserted bytes; pickle integers, strings,
    globals and bytes; safetensors dtypes, shapes, offsets and header length; planted pickles
    that would run code), each read in full, in a child process."""
    order = ["plain.bin", "views.bin", "params.bin", "nested.bin"]
    order += ["pt.safetensors", "np.safetensors"]
    rc, summary, err = fw.run_subprocess([seeds[n] for n in order], 3000, seed=17, timeout=180)
    assert rc >= 0, f"the reader crashed (signal {-rc}):\n{err[-3000:]}"
    assert summary is not None, err[-3000:]
    assert summary["detector_ok"], "the audit hook did not see a planted pickle run"
    assert summary["failed"] == 0 and rc == 0, json.dumps(summary["failures"][:5], indent=1)
    counts = summary["counts"]
    assert sum(sum(c.values()) for c in counts.values()) == 3000
    assert {k.split(":")[1] for k in counts} == set(fw.BIN_KINDS) | set(fw.ST_KINDS)
    for fmt, clean in (("bin", 100), ("safetensors", 10)):  # both outcomes, both formats
        results = [c for k, c in counts.items() if k.startswith(fmt)]
        assert sum(c.get("clean", 0) for c in results) > clean
        assert sum(c.get("refused", 0) for c in results) > 800
    assert counts["bin:evil"] == {"refused": counts["bin:evil"]["refused"]}
    assert summary["slowest_case_s"] < 5
