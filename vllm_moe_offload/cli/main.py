"""Entry point of ``vllm-moe-offload``.

Each subcommand lives in its own module, which exposes ``COMMAND``, a
:class:`Subcommand`; adding one (``trace``, ``bench``) means appending its
module to ``SUBCOMMAND_MODULES``. Every listed module is imported to build the
parser, so it must keep heavy imports (torch, vLLM, matplotlib) inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Subcommand:
    """One subcommand: its name, one line of help, its arguments and what it runs."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: modules defining a ``COMMAND``, in the order ``--help`` lists them
SUBCOMMAND_MODULES = [
    "vllm_moe_offload.cli.simulate",
    "vllm_moe_offload.cli.pad_model",
    "vllm_moe_offload.cli.quantize_model",
    "vllm_moe_offload.cli.trace",
    "vllm_moe_offload.cli.bench",
]


def subcommands() -> list[Subcommand]:
    return [importlib.import_module(name).COMMAND for name in SUBCOMMAND_MODULES]


def build_parser(subcommands: Sequence[Subcommand]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-moe-offload",
        description="Tools of the vllm-moe-offload plugin (the plugin itself runs inside vLLM).",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in subcommands:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return its exit status."""
    args = build_parser(subcommands()).parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
