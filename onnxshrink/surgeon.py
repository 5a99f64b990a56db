"""Moving between ModelProto and onnx-graphsurgeon's in-memory graph without losing model-level fields."""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    # Some exporters repeat a graph output in value_info with less information (no shape);
    # graphsurgeon would let that entry replace the declared output type.
    declared = {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
    if any(v.name in declared for v in model.graph.value_info):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        keep = [v for v in copy.graph.value_info if v.name not in declared]
        del copy.graph.value_info[:]
        copy.graph.value_info.extend(keep)
        model = copy
    return gs.import_onnx(model)


def export_model(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export `graph` keeping `like`'s IR version, opsets, producer and metadata (graphsurgeon drops some)."""
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = like.ir_version
    opsets = {entry.domain: entry.version for entry in model.opset_import}
    opsets.update({entry.domain: entry.version for entry in like.opset_import})
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in opsets.items())
    for name in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, name, getattr(like, name))
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    if not model.functions and like.functions:
        model.functions.extend(like.functions)
    return model
