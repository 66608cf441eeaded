"""``plugtron plugins``: what is installed, what it provides, whether it loaded.

Must answer in well under a second, so it reads only plugin records: no
availability checks (they may import torch) unless ``--check`` asks for them.
The human form is rendered by :mod:`plugtron.cli.plugins_render`; ``--json``
carries the same data, complete, for scripts.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("plugins", help="list plugins, their families and layer specs")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--check", action="store_true", help="also run layer-spec availability checks (imports torch)")
    parser.set_defaults(run=run)


def collect(pm: Any, check: bool = False) -> dict[str, Any]:
    from plugtron.errors import PlugtronError

    error = None
    try:
        tables = pm.tables
        families, specs, converters = tables.families.values(), tables.layer_specs.values(), tables.converters.values()
    except PlugtronError as exc:
        error, families, specs, converters = str(exc), [], [], []
    rows = []
    for record in pm.records.values():
        mine = lambda items: [i for i in items if i.plugin == record.name]  # noqa: E731
        rows.append(
            {
                "name": record.name,
                "distribution": record.distribution,
                "version": record.version,
                "source": record.source,
                "status": record.status,
                "error": record.error,
                "hooks": record.hooks,
                "families": [f.name for f in mine(families)],
                "layer_specs": [_spec_entry(s, check) for s in mine(specs)],
                "converters": [f"{c.source_format}:{c.architecture}->{c.family}" for c in mine(converters)],
            }
        )
    return {"plugins": rows, "error": error, "warnings": list(getattr(pm, "warnings", []))}


def _spec_entry(spec: Any, check: bool) -> Any:
    entry = {"family": spec.family, "name": spec.name, "priority": spec.priority}
    if check:
        available = spec.availability()
        entry.update(available=available.ok, reason=available.reason)
    return entry


def run(args: argparse.Namespace) -> int:
    from plugtron.cli import manager_for

    data = collect(manager_for(args), check=args.check)
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        from plugtron.cli.plugins_render import render

        print(render(data))
    return 1 if data["error"] else 0
