"""The ``plugtron`` command line. Sub-commands live in sibling modules and
import torch only when they need it (``plugtron plugins`` never does)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from plugtron.errors import PlugtronError


def _extra_plugins(argv: Sequence[str]) -> list[str]:
    """``-p MODULE`` values, needed before parsing so their commands exist."""
    found, args = [], list(argv)
    for index, arg in enumerate(args):
        if arg in ("-p", "--plugin") and index + 1 < len(args):
            found.append(args[index + 1])
        elif arg.startswith("--plugin="):
            found.append(arg.split("=", 1)[1])
    return found


def _parser(pm) -> argparse.ArgumentParser:  # noqa: ANN001
    from plugtron.cli import build_cmd, plugins_cmd

    parser = argparse.ArgumentParser(prog="plugtron", description="model-family plugins for megatron-core")
    parser.add_argument(
        "-p", "--plugin", action="append", default=[], metavar="MODULE",
        help="also register this importable module as a plugin (repeatable)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    plugins_cmd.add_parser(commands)
    build_cmd.add_parser(commands)
    pm.hooks.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        pm = _manager(_extra_plugins(argv))
        args = _parser(pm).parse_args(argv)
        return int(args.run(args) or 0)
    except PlugtronError as exc:
        print(f"plugtron: error: {exc}", file=sys.stderr)
        return 2


def _manager(extra: Sequence[str]):  # noqa: ANN202 - avoids importing the manager type eagerly
    from plugtron.manager import get_plugin_manager

    pm = get_plugin_manager()
    for module in extra:
        if module not in pm.records:
            pm.register(module, name=module)
    return pm


def manager_for(args: argparse.Namespace):  # noqa: ANN201
    """The manager with the ``-p`` plugins of this command line registered."""
    return _manager(args.plugin)


if __name__ == "__main__":
    sys.exit(main())
