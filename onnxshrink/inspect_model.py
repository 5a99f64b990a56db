"""`onnxshrink inspect`: what a model holds, in figures."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from .graph import constant_tensors, model_stats, op_histogram, tensor_elements, walk_graphs
from .report import human_bytes, table


def _value_text(value: onnx.ValueInfoProto) -> dict:
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        return {"name": value.name, "type": value.type.WhichOneof("value"), "shape": None}
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
    return {"name": value.name, "type": onnx.TensorProto.DataType.Name(tensor.elem_type).lower(), "shape": dims}


def inspect_model(model: onnx.ModelProto) -> dict:
    stats = model_stats(model)
    by_dtype: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "params": 0, "bytes": 0})
    sparsity = []
    for tensor in constant_tensors(model.graph):
        name = onnx.TensorProto.DataType.Name(tensor.data_type).lower()
        array = numpy_helper.to_array(tensor)
        entry = by_dtype[name]
        entry["tensors"] += 1
        entry["params"] += tensor_elements(tensor)
        entry["bytes"] += array.nbytes
        if array.size >= 256 and array.dtype.kind in "fiu":
            sparsity.append({"name": tensor.name, "shape": list(array.shape),
                             "sparsity": round(float(np.mean(array == 0)), 4)})
    initializers = {t.name for t in model.graph.initializer}
    return {
        "ir_version": model.ir_version,
        "opsets": {(e.domain or "ai.onnx"): e.version for e in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "nodes": stats.nodes,
        "subgraphs": sum(1 for _ in walk_graphs(model.graph)) - 1,
        "params": stats.params,
        "bytes": stats.bytes,
        "ops": dict(op_histogram(model).most_common()),
        "weights_by_dtype": dict(by_dtype),
        "sparsity": sorted(sparsity, key=lambda s: -s["sparsity"]),
        "inputs": [_value_text(v) for v in model.graph.input if v.name not in initializers],
        "outputs": [_value_text(v) for v in model.graph.output],
    }


def inspect_text(info: dict) -> str:
    opsets = ", ".join(f"{d} {v}" for d, v in info["opsets"].items())
    lines = [f"ir {info['ir_version']}, opsets: {opsets}, producer: {info['producer'] or '-'}",
             f"{info['nodes']} nodes ({info['subgraphs']} subgraphs), {info['params']:,} params, {human_bytes(info['bytes'])}",
             "", "inputs:"]
    lines += [f"  {v['name']}: {v['type']} {v['shape']}" for v in info["inputs"]]
    lines += ["outputs:"] + [f"  {v['name']}: {v['type']} {v['shape']}" for v in info["outputs"]]
    lines += ["", table(["op", "count"], [[op, n] for op, n in info["ops"].items()])]
    lines += ["", table(["dtype", "tensors", "params", "bytes"],
                        [[d, e["tensors"], f"{e['params']:,}", human_bytes(e["bytes"])] for d, e in info["weights_by_dtype"].items()])]
    sparse = [s for s in info["sparsity"] if s["sparsity"] > 0]
    if sparse:
        lines += ["", table(["initializer", "shape", "zeros"],
                            [[s["name"], "x".join(map(str, s["shape"])), f"{s['sparsity']:.1%}"] for s in sparse[:30]])]
    else:
        lines += ["", "no initializer of 256+ elements holds zeros"]
    return "\n".join(lines)
