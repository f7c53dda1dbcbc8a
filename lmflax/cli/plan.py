"""`lmflax plan`: parameters, FLOPs, per-device memory of the compiled train step and an MFU
estimate for a config, without training (compiled ahead of time, nothing allocated).

  lmflax plan --config=gpt2_small
  lmflax plan --config=gpt2_small --topology=v5e:4x4     # a TPU slice (needs libtpu)
  lmflax plan --config=gpt2_small --topology=h200:8      # NVIDIA GPUs (needs jax's CUDA plugin)

Exit code 2 when the config does not fit the memory budget or the chip.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lmflax.cli import common
from lmflax.cli.quiet import native_stderr_filtered
from lmflax.train import plan, resolve


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """--topology, --peak_tflops, --hbm_gbps."""
    parser.add_argument(
        "--topology",
        default=None,
        help="plan for a TPU slice (v5e:4x4; needs libtpu) or NVIDIA GPUs (h100, h200:8; "
        "needs jax-cuda12-plugin)",
    )
    parser.add_argument("--peak_tflops", type=float, default=None, help="per-device peak")
    parser.add_argument("--hbm_gbps", type=float, default=None, help="per-device bandwidth")


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of `lmflax plan`."""
    common.add_config_arguments(parser, workdir_help="unused (accepted for symmetry)")
    add_plan_arguments(parser)
    return parser


def main(args: argparse.Namespace, overrides: Sequence[str]) -> int:
    common.setup_logging(args.quiet)
    common.start_backends()
    cfg, name = common.load_config(args.config, overrides)
    devices = None
    if args.topology:
        # libtpu writes its "could not determine TPU accelerator type" lines when a topology is
        # described, after the start-up filter: keep them off the screen here too.
        with native_stderr_filtered():
            devices = plan.topology_devices(args.topology)
    _, report = plan.main(
        resolve(cfg, need_weights=False),
        devices=devices,
        peak_tflops=args.peak_tflops,
        hbm_gbps=args.hbm_gbps,
    )
    print(f"plan for {name}:\n{report}")
    return 0
