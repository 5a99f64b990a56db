"""`equalize`: cross-layer equalization (Nagel et al., "Data-Free Quantization", 2019).

Two weighted layers joined by ops that commute with a positive per-channel scale (Relu,
LeakyRelu, pooling) compute the same function when channel i of the first layer's output is
divided by s_i and the second layer's matching input weights are multiplied by s_i. Choosing
s_i = sqrt(r1_i / r2_i), with r1_i and r2_i the ranges of those weight slices, gives both the
same range sqrt(r1_i r2_i): no channel's weights are tiny next to the largest one's, which is what
a single per-tensor weight scale needs. Chains longer than two are equalized by sweeping the
pairs until the scales settle. Outputs are unchanged up to float rounding; no data is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxshrink.graph import attribute, constants_to_initializers, walk_graphs
from onnxshrink.options import PassOptions, option
from onnxshrink.pass_base import Note, Pass, PassContext, PassOutput
from onnxshrink.registry import register_pass

# Ops between the two layers: each maps channel i to channel i and f(s x) = s f(x) for s > 0.
_HOMOGENEOUS = {"Relu", "LeakyRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "Identity", "Dropout"}
_DEAD = 1e-6  # relative weight range below which a channel counts as switched off
_LIMIT = 1e4  # bound on one step's scale


@register_pass("equalize")
class Equalize(Pass):
    summary = "Cross-layer equalization: rescale channels between Conv/Gemm/MatMul pairs joined by Relu-like ops."

    @dataclass(frozen=True)
    class Options(PassOptions):
        sweeps: int = option(20, "passes over all pairs at most (chains of more than two layers need several)", low=1)

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassOutput:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        constants_to_initializers(probe.graph)  # exporters often store weights as Constant nodes
        pairs, notes = find_pairs(probe)
        if not pairs:
            return PassOutput(model, notes + [Note("(graph)", "no Conv/Gemm/MatMul pairs joined by Relu-like ops")])
        model = probe
        weights = {t.name: t for t in model.graph.initializer}
        arrays = {name: numpy_helper.to_array(weights[name]).astype(np.float64)
                  for pair in pairs for name in pair.tensors()}
        before = {id(pair): pair.imbalance(arrays) for pair in pairs}
        for _ in range(self.options.sweeps):
            largest = 0.0
            for pair in pairs:
                largest = max(largest, pair.equalize(arrays))
            if largest < 1e-3:  # every scale within 0.1% of 1: settled
                break
        for name, array in arrays.items():
            weights[name].CopyFrom(numpy_helper.from_array(array.astype(np.float32), name))
        for pair in pairs:
            first, second = pair.first.node, pair.second.node
            notes.append(Note(first.name or first.output[0],
                              f"equalized with {second.name or second.output[0]}: channel range spread "
                              f"{before[id(pair)]:.3g}x -> {pair.imbalance(arrays):.3g}x"))
        return PassOutput(model, notes)


@dataclass
class Layer:
    node: onnx.NodeProto
    weight: str
    bias: str | None  # a 1-D bias of the output channels: Conv/Gemm input, or a following Add's constant

    def out_ranges(self, arrays) -> np.ndarray:
        w = arrays[self.weight]
        return np.abs(_channels_first(w, self._out_axis())).reshape(w.shape[self._out_axis()], -1).max(axis=1)

    def in_ranges(self, arrays) -> np.ndarray:
        w = arrays[self.weight]
        if self.node.op_type == "Conv":  # input channel i = group i // per_group, slice i % per_group
            groups = attribute(self.node, "group", 1)
            per_out = w.shape[0] // groups
            sliced = np.abs(w).reshape(groups, per_out, w.shape[1], -1).max(axis=(1, 3))  # [groups, per_group]
            return sliced.reshape(-1)
        return np.abs(_channels_first(w, self._in_axis())).reshape(w.shape[self._in_axis()], -1).max(axis=1)

    def scale_out(self, arrays, factor: np.ndarray) -> None:
        arrays[self.weight] = _scaled(arrays[self.weight], self._out_axis(), 1 / factor)
        if self.bias is not None:
            arrays[self.bias] = arrays[self.bias] / factor

    def scale_in(self, arrays, factor: np.ndarray) -> None:
        w = arrays[self.weight]
        if self.node.op_type == "Conv":
            groups = attribute(self.node, "group", 1)
            per_group = factor.reshape(groups, w.shape[1])  # [groups, in per group]
            expanded = np.repeat(per_group, w.shape[0] // groups, axis=0)  # [out, in per group]
            arrays[self.weight] = w * expanded.reshape(expanded.shape + (1,) * (w.ndim - 2))
        else:
            arrays[self.weight] = _scaled(w, self._in_axis(), factor)

    def _out_axis(self) -> int:
        if self.node.op_type == "Gemm":
            return 0 if attribute(self.node, "transB", 0) else 1
        return 0 if self.node.op_type == "Conv" else 1

    def _in_axis(self) -> int:
        if self.node.op_type == "Gemm":
            return 1 if attribute(self.node, "transB", 0) else 0
        return 0  # MatMul [K, N]; Conv is handled by groups


@dataclass
class Pair:
    first: Layer
    second: Layer

    def tensors(self) -> list[str]:
        return [t for t in (self.first.weight, self.first.bias, self.second.weight) if t]

    def imbalance(self, arrays) -> float:
        """Largest over smallest nonzero output-channel range of the first layer."""
        ranges = self.first.out_ranges(arrays)
        ranges = ranges[ranges > 0]
        return float(ranges.max() / ranges.min()) if ranges.size else 1.0

    def equalize(self, arrays) -> float:
        r1, r2 = self.first.out_ranges(arrays), self.second.in_ranges(arrays)
        # A channel one side has all but switched off is left alone: equalizing it would shrink
        # the other side's weights towards nothing, a spread far worse than the one removed.
        usable = (r1 > _DEAD * r1.max()) & (r2 > _DEAD * r2.max())
        scale = np.ones_like(r1)
        scale[usable] = np.sqrt(r1[usable] / r2[usable])
        scale = np.clip(scale, 1 / _LIMIT, _LIMIT)
        self.first.scale_out(arrays, scale)
        self.second.scale_in(arrays, scale)
        return float(np.abs(np.log(scale)).max())


def find_pairs(model: onnx.ModelProto) -> tuple[list[Pair], list[Note]]:
    """Weighted layer pairs in the main graph whose joining ops commute with channel scaling."""
    graph = model.graph
    uses: dict[str, int] = {}
    for g in walk_graphs(graph):
        for node in g.node:
            for name in node.input:
                uses[name] = uses.get(name, 0) + 1
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    pinned = {i.name for i in graph.input} | {o.name for o in graph.output}
    floats = {t.name: t for t in graph.initializer if t.data_type == TensorProto.FLOAT and t.name not in pinned}
    owned = {name for name in floats if uses.get(name) == 1}  # rescaling a shared weight would change its other reader

    def only_consumer(tensor):
        readers = consumers.get(tensor, [])
        return readers[0] if len(readers) == 1 and tensor not in pinned else None

    pairs, notes = [], []
    for node in graph.node:
        first = _layer(node, owned, floats)
        if first is None:
            continue
        tensor = node.output[0]
        if node.op_type == "MatMul":  # PyTorch exports Linear as MatMul + Add(bias)
            following = only_consumer(tensor)
            if following is not None and following.op_type == "Add":
                bias = next((n for n in following.input if n in owned and len(floats[n].dims) == 1), None)
                if bias is None:
                    continue
                first.bias, tensor = bias, following.output[0]
        reader = only_consumer(tensor)
        while reader is not None and reader.op_type in _HOMOGENEOUS and reader.domain in ("", "ai.onnx"):
            tensor = reader.output[0]
            reader = only_consumer(tensor)
        second = _layer(reader, owned, floats, scales_output=False) if reader is not None and reader.input[0] == tensor else None
        if second is None:
            continue
        if (first.node.op_type == "Conv") != (second.node.op_type == "Conv"):
            continue  # channel axis 1 vs last: not the same channels
        if len(first.out_ranges({first.weight: _array(floats[first.weight])})) != \
                len(second.in_ranges({second.weight: _array(floats[second.weight])})):
            notes.append(Note(node.name or node.output[0], "not equalized: channel counts differ"))
            continue
        pairs.append(Pair(first, second))
    return pairs, notes


def _layer(node, owned: set[str], floats: dict, scales_output: bool = True) -> Layer | None:
    """The weighted layer at `node`, or None. Only a layer whose output is rescaled needs a bias it may rescale."""
    if node is None or node.domain not in ("", "ai.onnx") or len(node.input) < 2 or node.input[1] not in owned:
        return None
    rank = len(floats[node.input[1]].dims)
    has_bias = len(node.input) > 2 and bool(node.input[2])
    bias = node.input[2] if has_bias and node.input[2] in owned and len(floats[node.input[2]].dims) == 1 else None
    if scales_output and has_bias and bias is None:
        return None  # shared, computed, scalar or 2-D: cannot be rescaled per channel
    if node.op_type == "Conv" and rank >= 3:
        return Layer(node, node.input[1], bias)
    if node.op_type == "Gemm" and rank == 2 and not attribute(node, "transA", 0):
        return Layer(node, node.input[1], bias)
    if node.op_type == "MatMul" and rank == 2:
        return Layer(node, node.input[1], None)
    return None


def _array(tensor) -> np.ndarray:
    return numpy_helper.to_array(tensor)



def _channels_first(array: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(array, axis, 0)


def _scaled(array: np.ndarray, axis: int, factor: np.ndarray) -> np.ndarray:
    shape = [1] * array.ndim
    shape[axis] = factor.size
    return array * factor.reshape(shape)
