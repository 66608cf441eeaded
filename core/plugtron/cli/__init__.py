"""The ``plugtron`` command line. Sub-commands live in sibling modules and
import torch only when they need it (``plugtron plugins`` never does)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from plugtron.errors import PlugtronError


def _parser() -> argparse.ArgumentParser:
    from plugtron.cli import build_cmd, plugins_cmd

    parser = argparse.ArgumentParser(prog="plugtron", description="model-family plugins for megatron-core")
    parser.add_argument(
        "-p", "--plugin", action="append", default=[], metavar="MODULE",
        help="also register this importable module as a plugin (repeatable)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    plugins_cmd.add_parser(commands)
    build_cmd.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except PlugtronError as exc:
        print(f"plugtron: error: {exc}", file=sys.stderr)
        return 2


def manager_for(args: argparse.Namespace):  # noqa: ANN201 - avoids importing the manager type eagerly
    from plugtron.manager import get_plugin_manager

    pm = get_plugin_manager()
    for module in args.plugin:
        if module not in pm.records:
            pm.register(module, name=module)
    return pm


if __name__ == "__main__":
    sys.exit(main())
