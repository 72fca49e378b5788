"""The `zerokit` command: one sub-command a module, each exposing `register(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import sys

# Sub-command modules, in the order `zerokit --help` lists them.
_COMMANDS = ("estimate", "profile", "plan", "report", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zerokit", description="zerokit: memory-efficient distributed training")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in _COMMANDS:
        importlib.import_module(f"zerokit.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
