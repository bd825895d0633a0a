"""Where the analysis commands (`redundancy`, `clusters`, `probes`) leave their results: NAME.json and NAME.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def write_report(out_dir: str | Path, name: str, report: dict, plot: Callable[[dict, Path], None]) -> Path:
    """Write `report` as out_dir/NAME.json and `plot(report, out_dir/NAME.png)`; return the folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, out_dir / f"{name}.png")
    return out_dir
