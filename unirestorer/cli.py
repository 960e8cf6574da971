"""The `unirestorer` command: one subcommand per stage of the pipeline.

Each component owns its subcommand through an `add_parser(subparsers)` function that sets
`func`; heavy imports happen inside the handlers so `unirestorer --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from unirestorer import __version__
from unirestorer.arguments import OneLineParser
from unirestorer import demo
from unirestorer import eval_presets
from unirestorer import restore
from unirestorer import serve
from unirestorer.data_shards import cli as shards_cli
from unirestorer.train import calibrate, export


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="unirestorer", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"unirestorer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    shards_cli.add_parser(sub)
    demo.add_parser(sub)
    restore.add_parser(sub)
    serve.add_parser(sub)
    eval_presets.add_parser(sub)
    export.add_parser(sub)
    calibrate.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
