"""Child entry point: ``python benchmarks/_child.py module:function '{"kw": ...}'``.

Runs one measurement function in this fresh process and prints its result
dict as one JSON line after a marker, with the process's peak RSS added.
"""

from __future__ import annotations

import json
import sys
import warnings


def main() -> int:
    target, raw = sys.argv[1], sys.argv[2]
    warnings.simplefilter("ignore")
    from _measure import MARKER, call, peak_rss_mb

    result = call(target, json.loads(raw))

    result.setdefault("peak_rss_mb", peak_rss_mb())
    sys.stdout.flush()
    print(MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
