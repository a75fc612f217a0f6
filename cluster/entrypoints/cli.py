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

from cluster.entrypoints import batch, bench, optional_module


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="folio", description="LLM serving on Ray")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("serve", "generate"):
        module = optional_module(f"cluster.entrypoints.{name}")
        if module is None:
            continue
        p = sub.add_parser(name, help=module.HELP)
        module.add_cli_args(p)
        p.set_defaults(func=module.main)
    batch.add_cli_args(sub.add_parser("batch", help=batch.HELP))
    b = sub.add_parser("bench", help="benchmarks that print figures beside a baseline")
    bench.add_subcommands(b.add_subparsers(dest="bench", required=True))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
