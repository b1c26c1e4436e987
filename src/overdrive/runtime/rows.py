"""The rows of one flush, as ``Tracking.log_rows`` hands them to the trackers.

``Rows`` keeps them in order as segments: a ``StepColumns`` (the step metrics' rows, one
list per key) or one ``rt.log`` row ``(metrics, step)``. A tracker's ``log_rows`` gets
``rows.pairs()``, ``[(metrics, step), ...]`` with fresh dicts; the jsonl tracker sends the
columns as they are (``runtime/jsonl.py``), so a fast loop builds no dict per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


@dataclass
class StepColumns:
    """Rows given column by column: ``columns[key][i]`` is row ``i``'s value, None where
    that row has no such key (a step without a clipped norm has no ``grad_norm``)."""

    steps: list[int]
    columns: dict[str, list]

    def __len__(self) -> int:
        return len(self.steps)

    def row(self, i: int) -> dict[str, float]:
        return {k: c[i] for k, c in self.columns.items() if c[i] is not None}

    def pairs(self) -> list[tuple[dict[str, float], int]]:
        columns = list(self.columns.items())
        if not any(None in c for _, c in columns):
            keys = [k for k, _ in columns]
            values = zip(*[c for _, c in columns]) if columns else ((),) * len(self.steps)
            return [(dict(zip(keys, v)), s) for v, s in zip(values, self.steps)]
        return [(self.row(i), s) for i, s in enumerate(self.steps)]


Segment = Union[StepColumns, tuple]


class Rows:
    """A flush's rows in order: ``StepColumns`` and ``(metrics, step)`` segments."""

    __slots__ = ("segments",)

    def __init__(self, segments: list[Segment]):
        self.segments = segments

    def __len__(self) -> int:
        return sum(len(s) if isinstance(s, StepColumns) else 1 for s in self.segments)

    def pairs(self) -> list[tuple[dict[str, float], int]]:
        """Every row as ``(metrics, step)``, each dict a fresh one."""
        out: list[tuple[dict[str, float], int]] = []
        for segment in self.segments:
            if isinstance(segment, StepColumns):
                out.extend(segment.pairs())
            else:
                row, step = segment
                out.append((dict(row), step))
        return out
