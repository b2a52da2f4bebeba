"""How every benchmark reports: a table on stdout, and the same figures as JSON when asked."""

from __future__ import annotations

import json
from pathlib import Path

Row = tuple[str, str, str]  # name, formatted value, target ("" when none)


def report(rows: list[Row], results: dict, json_path: Path | None) -> None:
    width = max(len(name) for name, _, _ in rows)
    print(f"{'metric':<{width}}  {'value':>10}  target")
    for name, value, target in rows:
        print(f"{name:<{width}}  {value:>10}  {target}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {json_path}")
