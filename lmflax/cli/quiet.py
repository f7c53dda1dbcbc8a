"""Start-up noise from native libraries, kept off the user's screen.

jaxlib's CUDA modules (loaded by `import jax` whenever jax's CUDA plugin is installed, GPU or
not) and libtpu (tried when JAX starts its backends) write C++ log lines straight to file
descriptor 2 before anything could configure their logging: `Could not find cuda drivers`,
`All log messages before absl::InitializeLog() ...`, `unexpected worker hostname ...`. No
environment variable turns them off (TF_CPP_MIN_LOG_LEVEL is not read by them). They say only
that this machine has no GPU / no TPU, which `jax.devices()` (and lmflax's own log line) says
too, so `native_stderr_filtered` captures fd 2 while jax is imported and its backends start,
drops exactly these known lines and passes everything else through unchanged.

This module must not import jax: it is imported before jax is.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# Each pattern matches one whole line that carries no information for a user of lmflax.
NOISE = tuple(
    re.compile(p)
    for p in (
        r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$",
        r"^WARNING: Logging before InitGoogle\(\) is written to STDERR$",
        r"^I\d{4} [\d:.]+\s+\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine",
        r"^Failed to find host bounds for accelerator type: WARNING: could not determine TPU",
        r"^E\d{4} [\d:.]+\s+\d+ common_lib\.cc:\d+\] INVALID_ARGUMENT: Error: unexpected worker "
        r"hostname 'WARNING: could not determine TPU worker hostnames",
    )
)
# libtpu follows its error with a trace of source locations ('path/file.cc:123' lines).
_TRACE_HEAD = re.compile(r"^=== Source Location Trace: ===\s*$")
_TRACE_LINE = re.compile(r"^[\w./-]+\.(cc|h|cpp):\d+\s*$")


def filter_noise(text: str) -> str:
    """`text` without the known start-up noise lines (see NOISE), other lines unchanged."""
    kept: list[str] = []
    in_trace = False
    for line in text.splitlines(keepends=True):
        bare = line.rstrip("\r\n")
        if in_trace and _TRACE_LINE.match(bare):
            continue
        in_trace = False
        if _TRACE_HEAD.match(bare):
            in_trace = True
            continue
        if any(p.search(bare) for p in NOISE):
            continue
        kept.append(line)
    return "".join(kept)


@contextlib.contextmanager
def native_stderr_filtered() -> Iterator[None]:
    """Captures file descriptor 2 (native and Python writes alike) for the duration, then
    writes back what it received minus the NOISE lines. Set LMFLAX_NATIVE_LOGS=1 to see all."""
    if os.environ.get("LMFLAX_NATIVE_LOGS") == "1":
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (a closed or replaced stream): leave it
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = filter_noise(tmp.read().decode("utf-8", errors="replace"))
            if kept:
                os.write(2, kept.encode("utf-8"))
