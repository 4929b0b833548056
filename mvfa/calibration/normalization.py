"""Fixed normalisation statistics of the scoring branches, and their running min and max."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
import math

import torch

from mvfa.method import scoring
from mvfa.runtime.distributed import Dist, all_reduce
from mvfa.runtime.errors import MVFAError


@dataclass(frozen=True)
class Normalization:
    """Fixed min-max statistics of each scoring branch (plain floats, so checkpoints keep them as data).

    Each branch value v becomes (v - low) / (high - low) (or v - low when high == low). Branches:
    - zero_score: the zero-shot image score (det tokens); zero-shot scores, few-shot without masks;
    - zero_map: the zero-shot map's pixels (seg tokens; datasets with masks);
    - few_map: the memory map's pixels (seg tokens; few-shot, datasets with masks);
    - few_score: the memory map's image mean (det tokens; few-shot, datasets without masks).
    Fitted on normal images (`fit_normalization`), normal images then score about 0..1 and
    anomalies above. `count` and `source` say what the statistics were fitted on.
    """

    zero_score_low: float
    zero_score_high: float
    zero_map_low: float | None = None
    zero_map_high: float | None = None
    few_map_low: float | None = None
    few_map_high: float | None = None
    few_score_low: float | None = None
    few_score_high: float | None = None
    count: int = 0
    source: str = ""

    BRANCHES = ("zero_score", "zero_map", "few_map", "few_score")

    @classmethod
    def identity(cls, source: str = "none: raw branch values") -> "Normalization":
        """Low 0 and high 1 everywhere: the raw branch values (used when no statistics exist)."""
        return cls(0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0, source)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data, where: str = "normalization") -> "Normalization":
        """Read `to_dict`'s output back; a malformed entry raises MVFAError naming `where`."""
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or "zero_score_low" not in data or set(data) - names:
            raise MVFAError(f"{where} is malformed (expected the keys {', '.join(sorted(names))})")
        values = {}
        for key, value in data.items():
            if key == "source":
                values[key] = str(value)
            elif key == "count":
                values[key] = int(value)
            elif value is None:
                values[key] = None
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                values[key] = float(value)
            else:
                raise MVFAError(f"{where}: {key} is {value!r}, not a finite number")
        return cls(**values)

    def bounds(self, branch: str) -> tuple[float, float] | None:
        low, high = getattr(self, f"{branch}_low"), getattr(self, f"{branch}_high")
        return None if low is None or high is None else (low, high)

    def missing(self, branches: tuple[str, ...]) -> list[str]:
        """Those of `branches` these statistics have no bounds for."""
        return [b for b in branches if self.bounds(b) is None]


def affine(values: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    return scoring.rescale_(values.clone(), *bounds)


class MinMax:
    """Running min and max of several branches over batches."""

    def __init__(self) -> None:
        self.low: dict[str, float] = {}
        self.high: dict[str, float] = {}

    def update(self, branch: str, values: torch.Tensor) -> None:
        low, high = float(values.min()), float(values.max())
        self.low[branch] = min(low, self.low.get(branch, math.inf))
        self.high[branch] = max(high, self.high.get(branch, -math.inf))

    def reduce(self, branches: list[str], dist: Dist) -> None:
        """The minima and maxima of `branches` over all ranks (a rank without images holds none)."""
        lows = torch.tensor([self.low.get(b, math.inf) for b in branches], dtype=torch.float64)
        highs = torch.tensor([self.high.get(b, -math.inf) for b in branches], dtype=torch.float64)
        both = all_reduce(torch.cat([lows, -highs]), "min", dist)
        for i, branch in enumerate(branches):
            self.low[branch], self.high[branch] = float(both[i]), -float(both[len(branches) + i])

    def result(self, count: int, source: str) -> Normalization:
        out = {}
        for branch in Normalization.BRANCHES:
            out[f"{branch}_low"] = self.low.get(branch)
            out[f"{branch}_high"] = self.high.get(branch)
        return Normalization(**out, count=count, source=source)
