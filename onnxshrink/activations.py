"""Intermediate tensors of a model, streamed one calibration sample at a time.

Passes that need activations (calibration ranges, layer Hessians, input means) call
`stream_tensors` and fold each sample into running statistics, so memory stays flat in the
number of samples instead of growing with it the way keeping every activation would.
Only tensors of the main graph can be tapped; subgraph-local tensors are not visible outside.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np
import onnx

from .errors import OnnxShrinkError
from .runtime import adapt_feeds, make_session

Feed = dict[str, np.ndarray]


def main_graph_tensors(model: onnx.ModelProto) -> set[str]:
    """Names that can be tapped: graph inputs and node outputs of the main graph."""
    graph = model.graph
    return {i.name for i in graph.input} | {name for node in graph.node for name in node.output if name}


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs `names` (types left open; ORT infers them)."""
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    present = {o.name for o in tapped.graph.output}
    inputs = {i.name for i in tapped.graph.input}
    for name in names:
        if name not in present and name not in inputs:
            tapped.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return tapped


def stream_tensors(model: onnx.ModelProto, names: list[str], data: Iterable[Feed],
                   progress: Callable = lambda iterable, **_: iterable, threads: int | None = None,
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Yield, per sample, a dict name -> value of the tensors `names` (main-graph tensors only).

    Graph inputs among `names` are returned from the feed itself."""
    available = main_graph_tensors(model)
    missing = [n for n in names if n not in available]
    if missing:
        raise OnnxShrinkError(f"tensor '{missing[0]}' is not a main-graph tensor and cannot be observed")
    inputs = {i.name for i in model.graph.input}
    computed = [n for n in dict.fromkeys(names) if n not in inputs]
    session = make_session(with_outputs(model, computed), threads=threads) if computed else None
    for feed in progress(data, desc="calibration", unit="sample"):
        values = {n: feed[n] for n in names if n in inputs}
        if session is not None:
            feed = adapt_feeds([feed], session)[0]
            try:
                outputs = session.run(computed, feed)
            except Exception as exc:  # ORT raises its own types for kernel and feed failures
                raise OnnxShrinkError(f"onnxruntime failed on a calibration sample: {str(exc).splitlines()[0]}") from None
            values.update(zip(computed, outputs))
        yield values

