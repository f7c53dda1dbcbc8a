"""Runs the README's main job (`python train.py`: the default config, default XLA flags, a fresh
data dir) and checks that it ends with the summary line the README shows: the same steps and
workdir, the losses to the printed digits (within 2e-3, for floating-point differences between
CPUs). CI runs it after the test suite (about 4 minutes on 2 CPU cores); exit 1 on a mismatch.

  python tools/check_readme_run.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINE = r"^done: step (\d+), loss ([\d.]+), eval loss ([\d.]+); workdir (\S+)$"


def main() -> int:
    shown = re.search(LINE, (ROOT / "README.md").read_text(), re.M)
    if not shown:
        print("README.md shows no 'done: step N, loss X, eval loss Y; workdir DIR' line")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        # A fresh data dir and working directory: the run builds the embedded corpus and writes
        # runs/gpt_tiny exactly as on a new machine, without touching the checkout's runs/.
        env = {**os.environ, "TFDS_DATA_DIR": str(Path(tmp) / "tfds"), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(
            [sys.executable, str(ROOT / "train.py")],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
    printed = re.search(LINE, proc.stdout, re.M)
    if proc.returncode != 0 or not printed:
        print(
            f"python train.py exited {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        )
        return 1
    want, got = shown.groups(), printed.groups()
    ok = (
        got[0] == want[0]
        and got[3] == want[3]
        and abs(float(got[1]) - float(want[1])) < 2e-3
        and abs(float(got[2]) - float(want[2])) < 2e-3
    )
    print(f"README shows: {shown.group(0)}\nthe run printed: {printed.group(0)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
