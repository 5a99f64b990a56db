"""`dedup`: identical initializers stored once. Outputs unchanged."""

from __future__ import annotations

import hashlib

import onnx
from onnx import numpy_helper

from onnxshrink.graph import walk_graphs
from onnxshrink.pass_base import Note, Pass, PassContext, PassOutput
from onnxshrink.registry import register_pass


@register_pass("dedup")
class Dedup(Pass):
    summary = "Store identical initializers once (same type, shape and bytes); outputs unchanged."

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassOutput:
        graph = model.graph
        # Initializers that are also graph inputs can be overridden at run time, and graph
        # outputs must keep their names: neither may be merged away.
        pinned = {i.name for i in graph.input} | {o.name for o in graph.output}
        canonical: dict[tuple, str] = {}
        renamed: dict[str, str] = {}
        notes = []
        for tensor in graph.initializer:
            if tensor.name in pinned:
                continue
            array = numpy_helper.to_array(tensor)
            key = (tensor.data_type, tuple(tensor.dims), hashlib.sha256(array.tobytes()).hexdigest())
            if key in canonical:
                renamed[tensor.name] = canonical[key]
                notes.append(Note(tensor.name, f"same as {canonical[key]}: stored once"))
            else:
                canonical[key] = tensor.name
        if not renamed:
            return PassOutput(model, notes)
        keep = [t for t in graph.initializer if t.name not in renamed]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        # Subgraphs read outer-scope names directly, so rename there too.
        for g in walk_graphs(graph):
            for node in g.node:
                for index, name in enumerate(node.input):
                    if name in renamed:
                        node.input[index] = renamed[name]
        return PassOutput(model, notes)
