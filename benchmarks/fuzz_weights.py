"""Fuzzing lmflax's readers of untrusted weight files (`lmflax.hf.files.WeightSource`).

Real small files written by torch.save (pytorch_model.bin: a zip holding a pickle) and by
safetensors are mutated at random (bit flips, overwritten bytes, truncation, inserted bytes;
edits of the pickle's integers, strings, globals and bytes, re-zipped so the zip's CRCs still
hold; edits of the safetensors header's dtypes, shapes, offsets and length), and pickles that
try to run code are planted. Each case is read as `from_pretrained` reads it: open, then every
tensor. A case passes if it reads cleanly (arrays of the shape the file states, of a known dtype)
or raises CheckpointError naming the file. Anything else fails the run: another exception, a
crash (the worker runs in a subprocess, so a segfault is seen as its signal), a hang (a case over
--case_timeout seconds, or the whole run over --timeout), or code run by the file (an audit hook
watches for process, exec, import and network events while a case is read; planted pickles
would also create a marker file).

  python -m benchmarks.fuzz_weights --cases=200000            # the long run (RESULTS.md)
  python -m benchmarks.fuzz_weights --cases=1 --start=12345 --verbose   # replay one case

The seed files need torch and safetensors (both in the test extra); the worker that reads the
cases does not import torch. tests/test_weights_fuzz.py runs a few thousand cases.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import pickletools
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

BIN_KINDS = ("flip", "bytes", "truncate", "insert", "pkl_ints", "pkl_bytes", "pkl_strings", "evil")
ST_KINDS = ("flip", "bytes", "truncate", "insert", "st_header", "st_json_bytes", "st_length")
INTERESTING = (0, 1, -1, 2, -2, 3, 7, 8, 255, 256, 2**15, 2**16, 2**31 - 1, 2**31, -(2**31))
INTERESTING += (2**32, 2**62, 2**63 - 1, 2**63, 2**64, -(2**63), 10**30)

# ---------------------------------------------------------------------------------------------
# Seed files (torch and safetensors write them)


def write_seeds(directory: Path) -> list[Path]:
    """Small real checkpoints, as torch.save and safetensors write them, under `directory`."""
    import torch
    from safetensors.numpy import save_file as save_np
    from safetensors.torch import save_file as save_pt

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g)
    seeds = {
        "plain.bin": {
            "w": torch.randn(3, 4, generator=g),
            "b": torch.arange(5),
            "h": torch.randn(2, 3, generator=g).half(),
            "bf": torch.randn(3, generator=g).bfloat16(),
            "m": torch.tensor([True, False, True]),
            "i": torch.arange(6, dtype=torch.int32).reshape(2, 3),
            "d": torch.randn(2, generator=g).double(),
            "s": torch.tensor(3.5),
            "e": torch.zeros(0, 3),
        },
        "views.bin": {
            "t": x.t(),  # strides (1, 6)
            "slice": x[1:, 2:],  # a storage offset and strides
            "row": x[2],
            "col": x[:, 3],
            "tied_a": x,
            "tied_b": x,  # the same tensor twice (memoised in the pickle)
        },
        "params.bin": {
            "weight": torch.nn.Parameter(torch.randn(2, 2, generator=g)),
            "bias": torch.nn.Parameter(torch.zeros(2)),
        },
        "nested.bin": {"state_dict": {"a.weight": torch.randn(3, 2, generator=g)}},
    }
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, state in seeds.items():
        torch.save(state, directory / name)
        paths.append(directory / name)
    save_pt(
        {
            "w": torch.randn(3, 4, generator=g),
            "bf": torch.randn(2, 3, generator=g).bfloat16(),
            "h": torch.randn(4, generator=g).half(),
            "ids": torch.arange(7),
            "mask": torch.tensor([True, False]),
        },
        str(directory / "pt.safetensors"),
        {"format": "pt"},
    )
    rng = np.random.default_rng(0)
    save_np(
        {
            "d": rng.standard_normal((2, 3)),
            "u": np.arange(5, dtype=np.uint8),
            "i": np.arange(4, dtype=np.int32).reshape(2, 2),
            "s": np.array(2.0, dtype=np.float32),
            "e": np.zeros((0, 4), dtype=np.float32),
        },
        str(directory / "np.safetensors"),
    )
    paths += [directory / "pt.safetensors", directory / "np.safetensors"]
    return paths


# ---------------------------------------------------------------------------------------------
# Mutations


def _int_op(value: int) -> bytes:
    """A pickle opcode pushing `value` (BININT if it fits 32 bits, else LONG1)."""
    if -(2**31) <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def _str_op(value: str) -> bytes:
    data = value.encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data


def pickle_ops(pkl: bytes) -> list[tuple[str, Any, int, int]]:
    """(opcode name, argument, start, end) of each opcode of a pickle."""
    ops = list(pickletools.genops(pkl))
    out = []
    for i, (op, arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(pkl)
        out.append((op.name, arg, pos, end))
    return out


def replace_ops(pkl: bytes, edits: dict[int, bytes]) -> bytes:
    """The pickle with opcode i (in `pickle_ops` order) replaced by the bytes edits[i]."""
    out, last = [], 0
    for i, (_, _, start, end) in enumerate(pickle_ops(pkl)):
        if i in edits:
            out += [pkl[last:start], edits[i]]
            last = end
    return b"".join([*out, pkl[last:]])


def tensor_fields(pkl: bytes) -> list[dict[str, Any]]:
    """For each tensor a torch.save pickle rebuilds (in order): the opcode indices of its
    storage numel, storage offset, shape and stride integers."""
    ints = ("BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG")
    ops = pickle_ops(pkl)
    found = []
    for i, (name, _arg, _, _) in enumerate(ops):
        if name == "BINPERSID":
            numel = max(j for j in range(i) if ops[j][0] in ints)
            fields: dict[str, Any] = {"numel": numel, "shape": [], "stride": []}
            j = i + 1
            fields["offset"] = j
            j += 1
            for part in ("shape", "stride"):
                while ops[j][0] in ("BINPUT", "LONG_BINPUT", "MARK"):
                    j += 1
                while ops[j][0] in ints:
                    fields[part].append(j)
                    j += 1
                j += 1  # TUPLE, TUPLE1..3, EMPTY_TUPLE (or a BINGET of an equal tuple)
            found.append(fields)
    return found


def zip_members(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return [(info.filename, zf.read(info)) for info in zf.infolist()]


def rezip(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def edit_pickle(data: bytes, edit: Any) -> bytes:
    """A .bin archive with its data.pkl replaced by edit(data.pkl), re-zipped (valid CRCs)."""
    members = zip_members(data)
    return rezip([(n, edit(b) if n.endswith("data.pkl") else b) for n, b in members])


def _value(rng: np.random.Generator, old: int | None = None) -> int:
    r = rng.random()
    if r < 0.5:
        return int(INTERESTING[rng.integers(len(INTERESTING))])
    if r < 0.75 and old is not None:
        return old + int(rng.integers(-3, 4))
    return int(rng.integers(-(2**40), 2**40))


def _evil_pickle(marker: Path, rng: np.random.Generator) -> bytes:
    """A pickle that would create `marker` (or run something) if its globals resolved."""
    cmd = f"touch {marker}"
    code = f"open({str(marker)!r}, 'w').close()"
    variants = [
        b"cos\nsystem\n" + b"(" + _str_op(cmd) + b"tR.",
        b"cposix\nsystem\n" + b"(" + _str_op(cmd) + b"tR.",
        b"cbuiltins\nexec\n" + b"(" + _str_op(code) + b"tR.",
        b"cbuiltins\neval\n" + b"(" + _str_op(code) + b"tR.",
        b"csubprocess\ncheck_call\n((" + _str_op("touch") + _str_op(str(marker)) + b"ltR.",
        b"\x80\x04" + _str_op("os") + _str_op("system") + b"\x93(" + _str_op(cmd) + b"tR.",
        b"(" + _str_op(cmd) + b"ios\nsystem\n.",  # INST
        b"\x80\x02cbuiltins\ngetattr\n(cbuiltins\n__import__\n("
        + _str_op("os")
        + b"tR"
        + _str_op("system")
        + b"tR("
        + _str_op(cmd)
        + b"tR.",
        # allowed globals used to reach others: BUILD on them, calls with odd arguments
        b"\x80\x02ctorch._utils\n_rebuild_parameter\n}" + _str_op("__code__") + b"Nsb.",
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(}" + _str_op("check") + b"N\x86tb.",
        b"\x80\x02ccollections\nOrderedDict\n)R}" + _str_op("x") + b"cos\nsystem\nsb.",
        b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\n(cos\nsystem\nN("
        + _str_op(cmd)
        + b"tNtR.",
    ]
    variants.append(pickle.dumps(_Reduce(cmd), protocol=2))
    return variants[int(rng.integers(len(variants)))]


class _Reduce:
    """Pickles as a call of os.system, the classic malicious pickle."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self) -> tuple:
        return (os.system, (self.cmd,))


def mutate(data: bytes, kind: str, rng: np.random.Generator, marker: Path) -> bytes:
    """One random mutation of a seed file's bytes."""
    buf = bytearray(data)
    if kind == "flip":
        for _ in range(int(rng.integers(1, 9))):
            i = int(rng.integers(len(buf)))
            buf[i] ^= 1 << int(rng.integers(8))
        return bytes(buf)
    if kind == "bytes":
        for _ in range(int(rng.integers(1, 5))):
            i = int(rng.integers(len(buf)))
            buf[i] = int(rng.choice([0, 0xFF, 0x7F, 0x80, int(rng.integers(256))]))
        return bytes(buf)
    if kind == "truncate":
        return bytes(buf[: int(rng.integers(len(buf)))])
    if kind == "insert":
        i = int(rng.integers(len(buf) + 1))
        return bytes(buf[:i] + rng.bytes(int(rng.integers(1, 17))) + buf[i:])
    if kind == "evil":
        return edit_pickle(data, lambda _pkl: _evil_pickle(marker, rng))
    if kind == "pkl_ints":

        def edit(pkl: bytes) -> bytes:
            ops = pickle_ops(pkl)
            ints = [i for i, op in enumerate(ops) if op[0] in ("BININT", "BININT1", "BININT2")]
            picks = rng.choice(ints, size=min(len(ints), int(rng.integers(1, 4))), replace=False)
            return replace_ops(pkl, {int(i): _int_op(_value(rng, ops[i][1])) for i in picks})

        return edit_pickle(data, edit)
    if kind == "pkl_strings":
        strings = ["storage", "cpu", "0", "1", "99", "", "../data.pkl", "x" * 300]
        strings += ["FloatStorage", "os", "system", "torch._utils", "_rebuild_tensor_v2"]
        globals_ = [b"torch\nDoubleStorage\n", b"torch\nLongStorage\n", b"torch\nBoolStorage\n"]
        globals_ += [b"torch\nUntypedStorage\n", b"os\nsystem\n", b"builtins\nexec\n"]
        globals_ += [b"collections\nOrderedDict\n", b"torch._utils\n_rebuild_parameter\n"]
        globals_ += [b"torch._utils\n_rebuild_tensor_v2\n", b"torch.nn.parameter\nParameter\n"]

        def edit(pkl: bytes) -> bytes:
            ops = pickle_ops(pkl)
            edits = {}
            for i, (name, _, _, _) in enumerate(ops):
                if rng.random() < 0.15 and name in ("BINUNICODE", "SHORT_BINUNICODE"):
                    edits[i] = _str_op(strings[int(rng.integers(len(strings)))])
                elif rng.random() < 0.15 and name == "GLOBAL":
                    edits[i] = b"c" + globals_[int(rng.integers(len(globals_)))]
            return replace_ops(pkl, edits)

        return edit_pickle(data, edit)
    if kind == "pkl_bytes":

        def edit(pkl: bytes) -> bytes:
            return mutate(
                pkl, str(rng.choice(["flip", "bytes", "truncate", "insert"])), rng, marker
            )

        return edit_pickle(data, edit)
    n = struct.unpack("<Q", data[:8])[0]
    header_bytes, rest = data[8 : 8 + n], data[8 + n :]
    if kind == "st_length":
        new_n = max(0, _value(rng, n)) % 2**64
        return struct.pack("<Q", new_n) + header_bytes + rest
    if kind == "st_json_bytes":
        text = mutate(header_bytes, str(rng.choice(["flip", "bytes", "insert"])), rng, marker)
        return struct.pack("<Q", len(text)) + text + rest
    header = json.loads(header_bytes)
    names = [k for k in header if k != "__metadata__"]
    for _ in range(int(rng.integers(1, 3))):
        info = header[names[int(rng.integers(len(names)))]]
        field = str(rng.choice(["dtype", "shape", "data_offsets", "drop", "junk"]))
        if field == "dtype":
            info["dtype"] = str(
                rng.choice(["F32", "F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3"])
                if rng.random() < 0.8
                else rng.choice(["f32", "", "OBJECT", "C64"])
            )
        elif field == "shape" and rng.random() < 0.8:
            shape = list(info["shape"]) if isinstance(info.get("shape"), list) else []
            if shape and rng.random() < 0.6:
                shape[int(rng.integers(len(shape)))] = _value(rng, shape[0])
            elif rng.random() < 0.5:
                shape.insert(int(rng.integers(len(shape) + 1)), _value(rng, 1))
            elif shape:
                shape.pop()
            info["shape"] = shape
        elif field == "shape":
            info["shape"] = [[1, 2], "3", 1.5, None, True, -0.0][int(rng.integers(6))]
        elif field == "data_offsets":
            offs = info.get("data_offsets")
            offs = list(offs) if isinstance(offs, list) and len(offs) == 2 else [0, 0]
            offs[int(rng.integers(2))] = _value(rng, offs[0])
            if rng.random() < 0.2:
                offs = offs[::-1] if rng.random() < 0.5 else offs[:1]
            info["data_offsets"] = offs
        elif field == "drop":
            info.pop(str(rng.choice(["dtype", "shape", "data_offsets"])), None)
        else:
            info[str(rng.choice(["dtype", "shape", "data_offsets"]))] = {"a": 1}
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + rest


# ---------------------------------------------------------------------------------------------
# The worker: reads the cases in this process


# Audit events that mean a file ran code, started a process or reached the network.
_FORBIDDEN_PREFIXES = ("os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork")
_FORBIDDEN_PREFIXES += ("subprocess.", "exec", "compile", "import", "ctypes.", "socket.")
_FORBIDDEN_PREFIXES += ("pickle.find_class", "os.remove", "os.rename", "os.rmdir", "shutil.")
_FORBIDDEN_PREFIXES += ("builtins.input", "os.kill", "signal.")


def _stdlib_codec(args: tuple) -> bool:
    """Whether an import/exec audit event is the standard library loading a text codec."""
    import encodings

    what = args[0] if args else None
    if isinstance(what, str):
        return what.startswith("encodings.")
    filename = getattr(what, "co_filename", "")
    return str(Path(filename).parent) == str(Path(encodings.__file__).parent)


class _CaseTimeoutError(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _CaseTimeoutError


def read_case(path: Path) -> str:
    """Reads a weight file as from_pretrained does (eagerly, and lazily as a sharded load
    does); 'clean', 'refused', or raises."""
    from lmflax.data.hub import CheckpointError
    from lmflax.hf.files import WeightSource

    try:
        with WeightSource(path) as src:
            for name in src:
                array = src[name]
                if not isinstance(array, np.ndarray) or array.shape != src.shape(name):
                    raise AssertionError(
                        f"tensor {name!r}: read {type(array).__name__} of shape "
                        f"{getattr(array, 'shape', None)}, but the file states {src.shape(name)}"
                    )
                if array.dtype.name not in _DTYPES:
                    raise AssertionError(f"tensor {name!r} read as dtype {array.dtype}")
                # The lazy reader (sharded loading) reads the same bytes from the same header.
                view = src.lazy(name)
                if not isinstance(view, np.ndarray):
                    half = tuple(slice(0, (n + 1) // 2) for n in array.shape)
                    for index in ((), half):
                        got = view.read(index or None)
                        if got.tobytes() != array[index].tobytes():
                            raise AssertionError(
                                f"tensor {name!r}: the lazy read of {index} differs"
                            )
    except CheckpointError as e:
        if path.name not in str(e):
            raise AssertionError(f"CheckpointError does not name the file: {e}") from None
        return "refused"
    return "clean"


_DTYPES = {"float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8"}
_DTYPES |= {"uint64", "uint32", "uint16", "uint8", "bool"}


_SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None  # the cases are written in memory


def run_worker(seeds: list[Path], cases: int, start: int, seed: int, **opts: Any) -> dict:
    """Reads `cases` mutated files (case i: seed file i % len(seeds), rng (seed, i))."""
    import resource

    import lmflax.hf.files  # noqa: F401

    case_timeout, verbose = opts.get("case_timeout", 10), opts.get("verbose", False)
    limit = 4 * 2**30  # a runaway allocation becomes a MemoryError, not a swapping machine
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    scratch = Path(opts.get("scratch") or tempfile.mkdtemp(dir=_SHM))
    scratch.mkdir(parents=True, exist_ok=True)
    marker = scratch / "code-ran"
    originals = [p.read_bytes() for p in seeds]
    for path in seeds:  # warm up: every reading path once before the hook watches imports
        read_case(path)
    events: list[str] = []
    watching = [False]

    def hook(event: str, args: tuple) -> None:
        if watching[0] and event.startswith(_FORBIDDEN_PREFIXES):
            if event in ("import", "exec") and _stdlib_codec(args):
                return  # zipfile and pickle load text codecs by name on first use
            events.append(f"{event} {str(args)[:200]}")

    sys.addaudithook(hook)
    # The detector's own check: the standard unpickler runs a planted pickle; both signs show.
    watching[0] = True
    pickle.loads(pickle.dumps(_Reduce(f"touch {marker}"), protocol=2))  # the one allowed run
    watching[0] = False
    detector_ok = bool(events) and marker.exists()
    events.clear()
    marker.unlink(missing_ok=True)
    signal.signal(signal.SIGALRM, _alarm)
    counts: dict[str, dict[str, int]] = {}
    failures: list[dict] = []
    slowest = (0.0, -1)
    t0 = time.perf_counter()
    for i in range(start, start + cases):
        which = i % len(seeds)
        rng = np.random.default_rng([seed, i])
        ext = seeds[which].suffix
        kinds = BIN_KINDS if ext == ".bin" else ST_KINDS
        kind = kinds[int(rng.integers(len(kinds)))]
        data = mutate(originals[which], kind, rng, marker)
        path = scratch / ("pytorch_model.bin" if ext == ".bin" else "model.safetensors")
        path.write_bytes(data)
        if verbose:
            print(f"case {i}: {seeds[which].name} {kind}", file=sys.stderr, flush=True)
        before = len(events)
        c0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, case_timeout)
        watching[0] = True
        try:
            result = read_case(path)
        except _CaseTimeoutError:
            result = "hang"
        except BaseException as e:
            result = "unexpected"
            error = f"{type(e).__name__}: {str(e)[:500]}"
        finally:
            watching[0] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
        slowest = max(slowest, (time.perf_counter() - c0, i))
        if len(events) > before or marker.exists():
            result = "code_ran"
            error = "; ".join(events[before:]) or f"{marker} was created"
            marker.unlink(missing_ok=True)
        counts.setdefault(f"{seeds[which].suffix[1:]}:{kind}", {}).setdefault(result, 0)
        counts[f"{seeds[which].suffix[1:]}:{kind}"][result] += 1
        if result not in ("clean", "refused"):
            failures.append({"case": i, "seed_file": seeds[which].name, "kind": kind,
                             "result": result, "error": error if result != "hang" else ""})  # fmt: skip
    shutil.rmtree(scratch, ignore_errors=True)
    return {
        "cases": cases,
        "start": start,
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 2),
        "slowest_case_s": round(slowest[0], 4),
        "slowest_case": slowest[1],
        "counts": counts,
        "failures": failures[:50],
        "failed": len(failures) + (not detector_ok),
        "detector_ok": detector_ok,
    }


# ---------------------------------------------------------------------------------------------
# The parent: seeds, then the worker in a subprocess


def run_subprocess(
    seeds: list[Path], cases: int, *, start: int = 0, seed: int = 0, timeout: float = 600,
    verbose: bool = False,
) -> tuple[int, dict | None, str]:  # fmt: skip
    """Runs the worker in a child process: (its return code, its summary or None, stderr)."""
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "benchmarks.fuzz_weights", "--worker", f"--cases={cases}"]
    cmd += [f"--start={start}", f"--seed={seed}", "--seeds", *map(str, seeds)]
    cmd += ["--verbose"] * verbose
    scratch = tempfile.TemporaryDirectory(dir=_SHM)  # removed here even if the worker crashes
    cmd += [f"--scratch={scratch.name}"]
    env = {
        **os.environ,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    try:
        proc = subprocess.run(
            cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        return -1, None, f"timed out after {timeout} s (a hang)\n{err[-3000:]}"
    finally:
        scratch.cleanup()
    summary = None
    if proc.returncode in (0, 1) and proc.stdout.strip():
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return proc.returncode, summary, proc.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=200_000)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=20_000, help="cases per worker process")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per worker process")
    parser.add_argument("--case_timeout", type=float, default=10)
    parser.add_argument("--verbose", action="store_true", help="print each case as it starts")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seeds", nargs="*", default=None, help="seed files (default: written)")
    parser.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        summary = run_worker(
            [Path(p) for p in args.seeds], args.cases, args.start, args.seed,
            case_timeout=args.case_timeout, verbose=args.verbose, scratch=args.scratch,
        )  # fmt: skip
        print(json.dumps(summary))
        return 1 if summary["failed"] else 0
    with tempfile.TemporaryDirectory() as tmp:
        seeds = [Path(p) for p in args.seeds] if args.seeds else write_seeds(Path(tmp))
        total: dict[str, dict[str, int]] = {}
        failed, seconds = 0, 0.0
        for start in range(args.start, args.start + args.cases, args.chunk):
            n = min(args.chunk, args.start + args.cases - start)
            rc, summary, err = run_subprocess(
                seeds, n, start=start, seed=args.seed, timeout=args.timeout, verbose=args.verbose
            )
            if summary is None:
                what = f"killed by signal {-rc}" if rc < 0 else f"exit {rc}"
                print(
                    f"cases {start}..{start + n - 1}: the worker {what} (a crash):\n{err[-3000:]}"
                )
                print("replay with --verbose --start/--cases to find the case")
                return 1
            for key, c in summary["counts"].items():
                for result, k in c.items():
                    total.setdefault(key, {}).setdefault(result, 0)
                    total[key][result] += k
            failed += summary["failed"]
            seconds += summary["seconds"]
            for f in summary["failures"][:5]:
                print("FAILED", json.dumps(f))
            print(f"cases {start}..{start + n - 1}: {summary['failed']} failed, "
                  f"{summary['seconds']} s, slowest case {summary['slowest_case_s']} s "
                  f"(case {summary['slowest_case']})", flush=True)  # fmt: skip
        print("\n| seed format: mutation | cases | clean | CheckpointError | other |")
        print("|---|---|---|---|---|")
        for key in sorted(total):
            c = total[key]
            other = sum(v for r, v in c.items() if r not in ("clean", "refused"))
            print(f"| {key} | {sum(c.values())} | {c.get('clean', 0)} | {c.get('refused', 0)} | {other} |")  # fmt: skip
        print(f"\n{args.cases} cases in {seconds:.1f} s of reading: {failed} failed")
        return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
