"""The report: rows of measured figures, the machine they were measured on, the printed table and the
JSON file."""
from __future__ import annotations

import datetime
import json
import os
import platform
from dataclasses import dataclass

import numpy as np
import torch

from .library import write_text_atomic
from .metrics import cpu_name


@dataclass
class Row:
    """One measured figure (or ratio of two figures measured in the same run) of the table."""

    figure: str
    value: float | int | str | None
    unit: str = ""
    section: str = ""
    note: str = ""


def device_info(device: torch.device) -> dict:
    info = {
        "cpu": cpu_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device if device.type == "cuda" else 0)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs"
        info["cuda"] = torch.version.cuda
    return info


def format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e5 or magnitude < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4g}" if magnitude < 1000 else f"{value:,.0f}"


def format_table(rows: list[Row]) -> str:
    header = ("section", "figure", "value", "unit")
    cells = [(r.section, r.figure, format_value(r.value), r.unit) for r in rows]
    widths = [max(len(str(c[i])) for c in [header, *cells]) for i in range(len(header))]
    lines = []
    for index, cell in enumerate([header, *cells]):
        line = "  ".join(str(c).ljust(w) if i != 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cell, widths)))
        lines.append(line.rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    notes = [f"  [{r.section}] {r.figure}: {r.note}" for r in rows if r.note]
    return "\n".join(lines + (["", "notes:"] + notes if notes else []))


def write_json(path: str | None, report: dict) -> None:
    """The report as JSON at `path` (none: nothing), written whole or not at all."""
    if path:
        write_text_atomic(path, json.dumps(report, indent=2, default=str) + "\n")
