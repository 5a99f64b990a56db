"""How close a candidate model's outputs are to the reference's, and drift bounds such as `cosine>=0.99`."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

import numpy as np

from .errors import UsageError

# metric name -> (key in the summary, True when higher is better)
METRICS = {"cosine": "cosine", "top1": "top1", "max-abs": "max_abs", "max-rel": "max_rel"}
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def output_metrics(names: list[str], reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> dict:
    """Per-output cosine, max abs/rel error and (for [batch, classes] scores) top-1 agreement over all samples."""
    result = {}
    for index, name in enumerate(names):
        ref = [sample[index] for sample in reference]
        cand = [sample[index] for sample in candidate]
        if any(np.shape(r) != np.shape(c) for r, c in zip(ref, cand)):
            result[name] = {"cosine": 0.0, "max_abs": float("inf"), "max_rel": float("inf"), "note": "shape changed"}
            continue
        a = np.concatenate([np.asarray(r, dtype=np.float64).ravel() for r in ref])
        b = np.concatenate([np.asarray(c, dtype=np.float64).ravel() for c in cand])
        metrics = {"cosine": cosine(a, b), "max_abs": _max(np.abs(a - b))}
        scale = _max(np.abs(a))
        metrics["max_rel"] = metrics["max_abs"] / scale if scale > 0 else (0.0 if metrics["max_abs"] == 0 else float("inf"))
        if _looks_like_scores(ref[0]):
            agree = [np.argmax(r, axis=-1) == np.argmax(c, axis=-1) for r, c in zip(ref, cand)]
            metrics["top1"] = float(np.mean(np.concatenate([x.ravel() for x in agree])))
        result[name] = metrics
    return result


def summarize(per_output: dict) -> dict:
    """Worst case over outputs: the figure a drift bound is checked against."""
    summary = {}
    for key, worst in (("cosine", min), ("top1", min), ("max_abs", max), ("max_rel", max)):
        values = [m[key] for m in per_output.values() if key in m]
        if values:
            summary[key] = worst(values)
    return summary


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return 0.0 if not np.array_equal(a, b, equal_nan=True) else 1.0
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def _max(values: np.ndarray) -> float:
    if values.size == 0:
        return 0.0
    return float(np.nanmax(values)) if not np.all(np.isnan(values)) else float("inf")


def _looks_like_scores(array: np.ndarray) -> bool:
    array = np.asarray(array)
    return array.dtype.kind == "f" and array.ndim == 2 and 1 < array.shape[-1] <= 100_000


@dataclass(frozen=True)
class Bound:
    metric: str
    op: str
    value: float

    def holds(self, summary: dict) -> bool | None:
        """True/False, or None when the models have no output this metric applies to."""
        key = METRICS[self.metric]
        if key not in summary:
            return None
        return bool(_OPS[self.op](summary[key], self.value))

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_drift(text: str | None) -> list[Bound]:
    """`cosine>=0.99,top1>=0.98,max-abs<=1e-2` -> bounds; unknown metrics are a usage error."""
    if text is None or not str(text).strip():
        return []
    bounds = []
    for part in str(text).split(","):
        match = re.fullmatch(r"\s*([a-z0-9_-]+)\s*(>=|<=|>|<)\s*([-+0-9.eE]+)\s*", part)
        if not match:
            raise UsageError(f"bad drift bound '{part.strip()}': write metric>=value, e.g. cosine>=0.99 or max-abs<=1e-2")
        metric, op, value = match.group(1).replace("_", "-"), match.group(2), match.group(3)
        if metric not in METRICS:
            raise UsageError(f"unknown drift metric '{metric}' (known: {', '.join(METRICS)})")
        try:
            number = float(value)
        except ValueError:
            raise UsageError(f"bad number '{value}' in drift bound '{part.strip()}'") from None
        bounds.append(Bound(metric, op, number))
    return bounds
