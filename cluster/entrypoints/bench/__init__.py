"""`folio bench NAME`: each benchmark prints its figures beside a baseline run in
the same process or on the same machine (a ratio), never a bare absolute.

Every module named in BENCHMARKS has HELP, add_cli_args(parser) and main(args);
the CLI registers those and nothing else.
"""

from __future__ import annotations

import argparse

from folio.cluster.entrypoints import optional_module

BENCHMARKS = ("throughput", "serve", "spec", "structured", "replicas", "kernels", "llamacpp")


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    for name in BENCHMARKS:
        module = optional_module(f"{__name__}.{name}")
        if module is None:
            continue
        p = sub.add_parser(name, help=module.HELP)
        module.add_cli_args(p)
        p.set_defaults(func=module.main)
