"""The `folio` command: serve, batch, generate, bench.

Each entry point module has HELP, add_cli_args(parser) and main(args) (batch's
subcommands each name their own function); benchmarks register themselves in
cluster/entrypoints/bench/__init__.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from folio.cluster.entrypoints import optional_module

COMMANDS = ("serve", "generate", "batch", "bench")


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of every command, or of `command` alone: only its modules are imported
    then, and serve's (Ray, torch through the workers) take seconds that `folio batch`,
    run from an operator's shell or a job, has no use for."""
    parser = argparse.ArgumentParser(prog="folio", description="LLM serving on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("serve", "generate"):
        if command not in (None, name):
            continue
        module = optional_module(f"folio.cluster.entrypoints.{name}")
        if module is None:
            continue
        p = sub.add_parser(name, help=module.HELP)
        module.add_cli_args(p)
        p.set_defaults(func=module.main)
    if command in (None, "batch"):
        from folio.cluster.entrypoints import batch

        batch.add_cli_args(sub.add_parser("batch", help=batch.HELP))
    if command in (None, "bench"):
        from folio.cluster.entrypoints import bench

        b = sub.add_parser("bench", help="benchmarks that print figures beside a baseline")
        bench.add_subcommands(b.add_subparsers(dest="bench", required=True))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    # The command comes first (folio has no options of its own); anything else, such as
    # --help or a mistyped command, gets the whole parser and so the list of commands.
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
