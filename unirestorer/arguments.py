"""Argument checks shared by the `unirestorer` subcommands: ranges are refused while parsing, before any
model loads, and every usage error is one line naming the argument (not argparse's usage block)."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (exit 2); subparsers inherit the class."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def int_at_least(low: int) -> Callable[[str], int]:
    """argparse `type` for an integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


COUNT = int_at_least(1)  # sizes, batches, limits
NON_NEGATIVE = int_at_least(0)  # overlaps, borders, tile 0 = whole image
