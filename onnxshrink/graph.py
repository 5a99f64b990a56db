"""Helpers over ONNX graphs that every pass needs: walking subgraphs, counting, opsets."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx

@dataclass(frozen=True)
class ModelStats:
    params: int  # elements in initializers and Constant nodes, subgraphs included
    bytes: int  # serialized model size
    nodes: int  # nodes, subgraphs included

    def as_dict(self) -> dict:
        return {"params": self.params, "bytes": self.bytes, "nodes": self.nodes}


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def walk_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph nested in it, outermost first."""
    yield graph
    for node in graph.node:
        for sub in subgraphs(node):
            yield from walk_graphs(sub)


def walk_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for g in walk_graphs(graph):
        yield from g.node


def attribute(node: onnx.NodeProto, name: str, default=None):
    """The value of `node`'s attribute `name`, or `default` when it is not set."""
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def tensor_elements(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1


def constant_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and Constant-node values of the graph and its subgraphs."""
    for g in walk_graphs(graph):
        yield from g.initializer
        for node in g.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value":
                        yield attr.t


def model_stats(model: onnx.ModelProto) -> ModelStats:
    params = sum(tensor_elements(t) for t in constant_tensors(model.graph))
    nodes = sum(1 for _ in walk_nodes(model.graph))
    return ModelStats(params=params, bytes=model.ByteSize(), nodes=nodes)


def opset_version(model: onnx.ModelProto, domain: str = "") -> int | None:
    for entry in model.opset_import:
        if entry.domain in ((domain, "ai.onnx") if domain == "" else (domain,)):
            return entry.version
    return None


def op_histogram(model: onnx.ModelProto) -> Counter:
    return Counter((f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type) for n in walk_nodes(model.graph))


def outer_scope_names(graph: onnx.GraphProto) -> set[str]:
    """Names a (sub)graph reads without defining them: what it captures from enclosing graphs."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(name for name in node.input if name)
        for sub in subgraphs(node):
            used |= outer_scope_names(sub)
        defined.update(node.output)
    used.update(o.name for o in graph.output)
    return used - defined


def tensor_reads(graph: onnx.GraphProto) -> Counter:
    """How often each tensor is read: node inputs in the graph and its subgraphs, and graph outputs."""
    counts = Counter(name for g in walk_graphs(graph) for node in g.node for name in node.input if name)
    counts.update(o.name for o in graph.output)
    return counts


def layer_bias(graph: onnx.GraphProto, node: onnx.NodeProto, initializers: dict, reads: Counter) -> str | None:
    """The 1-D initializer added, unscaled, to each output channel of `node` and read by nothing else:
    Gemm's C (beta 1), Conv's or ConvTranspose's B, or else the initializer operand of the Add that
    alone reads a MatMul's (or a Gemm's) result. None where there is no such tensor.
    `reads` is tensor_reads(graph)."""
    if node.op_type in ("Gemm", "Conv", "ConvTranspose") and len(node.input) > 2 and node.input[2]:
        if node.op_type == "Gemm" and attribute(node, "beta", 1.0) != 1.0:
            return None
        name = node.input[2]
    elif node.op_type in ("MatMul", "Gemm") and reads[node.output[0]] == 1:
        add = next((n for n in graph.node if node.output[0] in n.input), None)
        operands = list(add.input) if add is not None and add.op_type == "Add" and add.domain in ("", "ai.onnx") else []
        name = next((i for i in operands if i != node.output[0] and i in initializers), "")
    else:
        return None
    tensor = initializers.get(name)
    if tensor is None or reads[name] != 1 or len(tensor.dims) != 1:
        return None
    return name


def unique_name(base: str, taken: set[str]) -> str:
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def all_names(model: onnx.ModelProto) -> set[str]:
    names: set[str] = set()
    for g in walk_graphs(model.graph):
        names.update(i.name for i in g.input)
        names.update(t.name for t in g.initializer)
        for node in g.node:
            names.update(node.output)
            names.add(node.name)
    return names


def constants_to_initializers(graph: onnx.GraphProto, only: set[str] | None = None) -> None:
    """Turn the graph's own Constant nodes (those named in `only`, if given) into initializers,
    so passes see one kind of constant."""
    keep = []
    for node in graph.node:
        is_constant = node.op_type == "Constant" and node.domain in ("", "ai.onnx")
        value = next((a.t for a in node.attribute if a.name == "value"), None) if is_constant else None
        if value is not None and len(node.output) == 1 and (only is None or node.output[0] in only):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            keep.append(node)
    if len(keep) != len(graph.node):  # rebuilding copies the nodes: references held elsewhere would go stale
        del graph.node[:]
        graph.node.extend(keep)


def replace_nodes(graph: onnx.GraphProto, instead: dict[int, list]) -> None:
    """Rebuild `graph.node` with each node whose id() is a key of `instead` replaced by that list
    ([] removes it); the ids must come from nodes of this graph still referenced by the caller."""
    rebuilt = []
    for node in graph.node:
        rebuilt.extend(instead.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(rebuilt)


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Remove initializers that no node (subgraph bodies included) and no graph output reads."""
    used = {name for node in graph.node for name in node.input}
    used |= {name for node in graph.node for sub in subgraphs(node) for name in outer_scope_names(sub)}
    used |= {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)
