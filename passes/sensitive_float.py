"""What to leave float after quantization, found by measurement.

Two searches. `keep_front_float` tries the first weighted layers float together (see there).
`keep_sensitive_float` looks for single activation tensors:

After `quantize-int8` has placed its QuantizeLinear/DequantizeLinear pairs, one activation tensor
can account for much of the drift: on YOLOv8n the second layer's SiLU output alone moves the class
scores from cosine 0.977 to 0.985 when it stays float. Which tensor that is does not follow from
its range or its histogram, so it is measured: the quantized model is run on calibration samples
with pairs removed (their consumers then read the float tensor) and compared with the float model.

Trying every pair alone costs one session per pair (over 200 on YOLOv8n, about a minute), so the
search is group testing: the pairs, in graph order, are cut into about sqrt(n) runs; the run whose
removal lowers the drift most is halved, and the better half kept, down to one pair. That is
about sqrt(n) + 2 log2(sqrt(n)) sessions per tensor found (24 on YOLOv8n, about 7 s). A tensor is
kept float only where removing it alone takes at least `_WORTHWHILE` of the remaining drift away.

The drift is balanced over channels (axis 1): 1 - cosine per channel, averaged. A whole-output
cosine would let large channels (YOLO's box coordinates) hide small ones (its class scores).
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from onnxshrink.graph import attribute, outer_scope_names, subgraphs
from onnxshrink.pass_base import Note
from onnxshrink.runtime import adapt_feeds, make_session, run_all

_WORTHWHILE = 0.2  # a pair stays float only if it alone removes this share of the drift


class DriftMeter:
    """balanced_drift of candidate models against `original` on `feeds`; the original's outputs
    are computed once, when first needed, for every search that measures against them."""

    def __init__(self, original: onnx.ModelProto, feeds):
        self.original, self.feeds = original, feeds
        self._reference: list | None = None

    @property
    def reference(self) -> list[list[np.ndarray]]:
        if self._reference is None:
            self._reference = run_all(make_session(self.original, threads=1), self.feeds)
        return self._reference

    def __call__(self, candidate: onnx.ModelProto) -> float:
        session = make_session(candidate, threads=1)
        return balanced_drift(self.reference, run_all(session, adapt_feeds(self.feeds, session)))


def keep_sensitive_float(meter: DriftMeter, quantized: onnx.ModelProto, limit: int,
                         notes: list[Note]) -> onnx.ModelProto:
    """`quantized` with up to `limit` activation pairs removed, each chosen by measured drift."""
    pairs = _activation_pairs(quantized)
    if not pairs or not meter.reference:
        return quantized

    def drift(removed: list[str]) -> float:
        return meter(_without(quantized, removed))

    kept: list[str] = []
    current = drift(kept)
    start, sessions = current, 1
    while len(kept) < limit and current > 0:
        remaining = [p for p in pairs if p not in kept]
        runs = _chunks(remaining, max(1, round(math.sqrt(len(remaining)))))
        scores = [drift(kept + run) for run in runs]
        sessions += len(runs)
        group, alone = runs[int(np.argmin(scores))], min(scores)
        while len(group) > 1:  # halve towards the pair that carries the gain
            halves = [group[:len(group) // 2], group[len(group) // 2:]]
            scores = [drift(kept + half) for half in halves]
            sessions += 2
            group, alone = halves[int(np.argmin(scores))], min(scores)
        if current - alone < _WORTHWHILE * current:
            break
        kept += group
        notes.append(Note(group[0], f"left float: quantizing it moved the outputs most (channel-balanced drift "
                                    f"{current:.4f} -> {alone:.4f} with it float)"))
        current = alone
    summary = f"sensitivity: {len(kept)} activation tensor(s) left float of {len(pairs)}; drift {start:.4f} -> " \
              f"{current:.4f} on {len(meter.feeds)} calibration samples ({sessions} trial sessions)"
    notes.append(Note("(graph)", summary))
    return _without(quantized, kept) if kept else quantized


def keep_front_float(meter: DriftMeter, model: onnx.ModelProto, build, weighted: list[onnx.NodeProto],
                     budget: float, notes: list[Note]) -> frozenset:
    """Names of the first weighted nodes (graph order) to leave float, chosen by measurement.

    The first layers of a vision model see the raw image at full resolution with few channels:
    their quantization error reaches every later layer, and they hold little of the compute. On
    PP-OCRv4 det no single activation carries a fifth of the drift (keep_sensitive_float finds
    nothing), yet the first Convs together hold most of it (text-mask IoU 0.916 -> 0.963 with 4
    float, 0.972 with 8; 5% and 10% of the multiply-adds; measured). So prefixes of 1, 2, 4, 8,
    ... weighted nodes, as long as they stay within `budget` of the model's multiply-adds, are
    tried float (`build(names)` gives the model with those nodes float); the shortest that takes
    at least 90% of the best prefix's gain is kept, if that gain is at least `_WORTHWHILE` of the
    drift."""
    costs = multiply_adds(model, next(iter(meter.feeds)))
    total = sum(costs.get(n.name, 0) for n in weighted)
    prefixes, spent = [], 0
    for length, node in enumerate(weighted, 1):
        if node.name not in costs or not node.name:
            break  # unknown size (or no name to leave float by): the front ends here
        spent += costs[node.name]
        if total <= 0 or spent > budget * total:
            break
        if length & (length - 1) == 0:  # 1, 2, 4, 8, ...
            prefixes.append((length, spent))
    if not prefixes:
        return frozenset()
    start = meter(build(frozenset()))
    trials = [(length, spent, meter(build(frozenset(n.name for n in weighted[:length])))) for length, spent in prefixes]
    best = min(d for _, _, d in trials)
    if start - best < _WORTHWHILE * start:
        notes.append(Note("(graph)", f"front: no prefix of the first weighted nodes left float lowers the drift "
                                     f"enough ({start:.4f} -> best {best:.4f}); all quantized"))
        return frozenset()
    length, spent, reached = next(t for t in trials if start - t[2] >= 0.9 * (start - best))
    names = [n.name for n in weighted[:length]]
    for name in names:
        notes.append(Note(name, f"left float: one of the first {length} weighted nodes ({spent / total:.1%} of the "
                                f"multiply-adds) whose quantization moved the outputs most"))
    notes.append(Note("(graph)", f"front: first {length} weighted node(s) left float, channel-balanced drift "
                                 f"{start:.4f} -> {reached:.4f} on {len(meter.feeds)} calibration samples (tried "
                                 f"{', '.join(str(t[0]) for t in trials)})"))
    return frozenset(names)


def multiply_adds(model: onnx.ModelProto, feed: dict) -> dict[str, int]:
    """Conv/ConvTranspose/MatMul/Gemm node name -> multiply-adds for one run on `feed`, from shapes
    inferred with the feed's input shapes; nodes whose shapes stay unknown are left out."""
    from .cleanup_shapes import onnx_inferred

    inferred = onnx_inferred(model, {name: np.shape(value) for name, value in feed.items()})
    # A rank onnx could not infer comes as None (PP-OCR cls: a Reshape to a computed shape), not as rank 0.
    shapes = {name: list(dims) for name, (_, dims) in inferred.items()
              if dims is not None and all(d is not None for d in dims)}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    costs = {}
    for node in model.graph.node:
        inputs = [shapes.get(name) for name in node.input[:2]]
        out = shapes.get(node.output[0]) if node.output else None
        if node.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm") or None in inputs or out is None:
            continue
        weight = inputs[1]
        if node.op_type == "Conv":
            costs[node.name] = int(np.prod(out)) * int(np.prod(weight[1:]))
        elif node.op_type == "ConvTranspose":
            costs[node.name] = int(np.prod(inputs[0])) * int(np.prod(weight[1:]))
        else:
            reduced = inputs[0][0] if node.op_type == "Gemm" and attribute(node, "transA", 0) else inputs[0][-1]
            costs[node.name] = int(np.prod(out)) * int(reduced)
    return costs


def balanced_drift(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> float:
    """Mean over float outputs of the mean over channels (axis 1) of 1 - cosine, over all samples."""
    drifts = []
    for index in range(len(reference[0])):
        if np.asarray(reference[0][index]).dtype.kind != "f":
            continue
        a = _by_channel([sample[index] for sample in reference])
        b = _by_channel([sample[index] for sample in candidate])
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        live = norms > 0
        if live.any():
            cosines = np.sum(a * b, axis=1)[live] / norms[live]
            drifts.append(float(np.mean(1.0 - np.clip(cosines, -1.0, 1.0))))
    return float(np.mean(drifts)) if drifts else 0.0


def _by_channel(samples: list) -> np.ndarray:
    """[channels, everything else] of one output over all samples (one row for outputs of rank < 2)."""
    rows = []
    for value in samples:
        value = np.asarray(value, np.float64)
        channels = value.shape[1] if value.ndim >= 2 else 1
        rows.append(value.reshape(value.shape[0] if value.ndim >= 2 else 1, channels, -1).transpose(1, 0, 2)
                    .reshape(channels, -1))
    return np.concatenate(rows, axis=1)


def _activation_pairs(model: onnx.ModelProto) -> list[str]:
    """Inputs of QuantizeLinear nodes on activations whose outputs only DequantizeLinear reads, in graph order."""
    constants = {t.name for t in model.graph.initializer}
    # Graph outputs and names read inside If/Loop bodies keep their pairs: renaming them is not local.
    outputs = {o.name for o in model.graph.output}
    outputs |= {name for node in model.graph.node for sub in subgraphs(node) for name in outer_scope_names(sub)}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    pairs = []
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in constants or node.output[0] in outputs:
            continue
        dequantizers = readers.get(node.output[0], [])
        if dequantizers and all(d.op_type == "DequantizeLinear" and d.output[0] not in outputs for d in dequantizers):
            pairs.append(node.input[0])
    return pairs


def _without(model: onnx.ModelProto, tensors: list[str]) -> onnx.ModelProto:
    """A copy with the pairs quantizing `tensors` removed: their readers take the float tensor."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if not tensors:
        return copy
    wanted = set(tensors)
    quantized = {node.output[0] for node in copy.graph.node if node.op_type == "QuantizeLinear"
                 and node.input[0] in wanted}
    source = {node.output[0]: node.input[0] for node in copy.graph.node if node.op_type == "QuantizeLinear"
              and node.input[0] in wanted}
    renamed = {node.output[0]: source[node.input[0]] for node in copy.graph.node
               if node.op_type == "DequantizeLinear" and node.input[0] in quantized}
    kept = [node for node in copy.graph.node if node.output[0] not in quantized and node.output[0] not in renamed]
    for node in kept:
        for position, name in enumerate(node.input):
            if name in renamed:
                node.input[position] = renamed[name]
    del copy.graph.node[:]
    copy.graph.node.extend(kept)
    return copy


def _chunks(items: list, count: int) -> list[list]:
    size = math.ceil(len(items) / count)
    return [items[i:i + size] for i in range(0, len(items), size)]
