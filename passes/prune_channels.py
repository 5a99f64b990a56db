"""Structured channel pruning: remove whole output channels of Conv/ConvTranspose/Gemm/MatMul
layers and the matching input channels of everything that reads them, leaving a smaller dense
model that stock runtimes execute as is.

Channels are followed through the graph rather than guessed from layer pairs. Every output
channel of a weighted layer gets an id. Ops that pass channels through (activations, pooling,
Resize, BatchNormalization, element-wise ops with a per-channel constant) hand the ids on,
Concat along the channel axis joins id lists and Split cuts them. An element-wise op between two
tensors of the same channel space ties their ids (union-find): the two sides of SiLU's
x * Sigmoid(x), of a residual Add or of a squeeze-excite Mul, and a depthwise Conv with its
input, keep or lose a channel together. Whatever the flow cannot follow (a graph output, Reshape,
Transpose, Shape, Softmax, a subgraph, an excluded node, an op not listed here) freezes the ids
that reach it, with a note saying where and why.

The unit of choice is a tied class of ids. Its score is the sum of its members' criterion: the
L1 or L2 norm of the layer's weights for that output channel, or |gamma| of a
BatchNormalization reading the layer's output. Classes found in exactly the same tensors form a
block, and each block loses `sparsity` of its classes, lowest scores first, so every layer,
Split piece and Concat part shrinks by about the same fraction and keeps at least one channel.
Then the recorded cuts are applied: weights sliced on their output and input axes; biases,
BatchNormalization parameters and per-channel constants sliced; Split sizes and depthwise
`group` updated; value_info of resized tensors dropped. A constant read by more than one node is
copied before it is cut, so no other reader sees a slice meant for someone else.

Pruning writes no record of what it kept: `kept_channels(original, pruned)` recovers it from
the weights, for passes such as `reconstruct` that refit the pruned layers to the original's.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxshrink.errors import UsageError
from onnxshrink.graph import (all_names, attribute, constants_to_initializers, layer_bias, model_stats, opset_version,
                              outer_scope_names, subgraphs, tensor_reads, unique_name)
from onnxshrink.pass_base import Note

CRITERIA = ("l1", "l2", "bn-scale")

# Ops whose first output carries the channels of their first input, channel for channel (their
# other inputs are scalars or per-axis scales: Clip's bounds, Resize's scales).
_PASS_THROUGH = {
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
    "Gelu", "Mish", "Softplus", "Softsign", "ThresholdedRelu", "Clip", "Erf", "Exp", "Log", "Abs",
    "Neg", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Identity",
    "Dropout", "Cast", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
    "GlobalLpPool", "Resize", "Upsample",
}
# Element-wise ops over operands that broadcast (PRelu's slope is a per-channel operand too).
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu"}


def prune_channels(model: onnx.ModelProto, sparsity: float, criterion: str = "l2",
                   exclude: tuple[str, ...] = (), round_to: int = 1) -> tuple[onnx.ModelProto, list[Note]]:
    """Remove `sparsity` of the output channels of every prunable layer (see the module docstring).

    `exclude` names nodes (by name or op type) to leave as they are; `round_to` rounds each
    block's kept channel count up to a multiple of it where the block is large enough.
    Returns the pruned copy and notes: one per frozen tensor, one per layer, and a summary.
    """
    _check_arguments(sparsity, criterion, round_to)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    constants_to_initializers(pruned.graph)  # exporters often store weights as Constant nodes
    flow = ChannelFlow(pruned, set(exclude))
    flow.follow()
    removed = choose_removed(flow, sparsity, criterion, round_to)
    kept = flow.kept_mask(removed)
    apply_cuts(pruned, flow, kept)
    notes = flow.notes + layer_notes(flow, kept)
    total = sum(len(layer.ids) for layer in flow.layers)
    left = sum(int(kept(layer.ids).sum()) for layer in flow.layers)
    notes.append(Note("(graph)", f"{total - left} of {total} output channels removed in {len(flow.layers)} layers "
                                 f"(sparsity {sparsity:g}, {criterion}); parameters "
                                 f"{model_stats(model).params} -> {model_stats(pruned).params}"))
    return pruned, notes


@dataclass(frozen=True)
class KeptChannels:
    """Which channels of an original layer its pruned copy computes, as increasing indices."""

    outputs: np.ndarray  # into the original layer's output channels
    inputs: np.ndarray | None  # into its input channels; None where the input was not cut


def kept_channels(original: onnx.ModelProto, pruned: onnx.ModelProto) -> tuple[dict[str, KeptChannels], list[Note]]:
    """Recover, for each layer of `original` (keyed by node name, else first output), the channels
    `pruned` kept of it, so that a later pass can compare the two models channel for channel.

    Nothing is stored in the pruned model: the channel flow is replayed on the original, and in
    graph order each layer's pruned weights (and bias) are matched against the original rows
    restricted to the input channels already known to be kept. Cuts keep the order of channels,
    so the match is the first original row, after the previous match, that agrees with the pruned
    row wherever that row is nonzero: weights zeroed by unstructured pruning still match. Tied
    channels must agree across layers. A layer that cannot be matched (a renamed node, weights
    changed otherwise) gets a note, and so does every layer whose input it feeds.
    """
    reference = onnx.ModelProto()
    reference.CopyFrom(original)
    constants_to_initializers(reference.graph)
    current = onnx.ModelProto()
    current.CopyFrom(pruned)
    constants_to_initializers(current.graph)
    flow = ChannelFlow(reference, set())  # exclusions do not matter: an excluded layer matches as kept whole
    flow.follow()
    nodes = {(n.name or n.output[0]): n for n in current.graph.node}
    arrays = {t.name: t for t in current.graph.initializer}
    roots = flow.roots()
    decided: dict[int, bool] = {}
    found: dict[str, KeptChannels] = {}
    notes: list[Note] = []
    for layer in flow.layers:
        node = nodes.get(layer.name)
        if node is None or node.op_type != layer.node.op_type or len(node.input) < 2 or node.input[1] not in arrays:
            notes.append(Note(layer.name, "no layer of that name and type with constant weights in the pruned model"))
            continue
        in_axis, out_axis = flow.layer_axes(layer.node)
        input_roots = roots[layer.input_ids] if layer.input_ids is not None else np.zeros(0, np.int64)
        if any(int(r) not in decided for r in input_roots):
            notes.append(Note(layer.name, "its input channels come from a layer that could not be matched"))
            continue
        input_kept = np.array([decided[int(r)] for r in input_roots], dtype=bool)
        weight = numpy_helper.to_array(arrays[node.input[1]])
        expected = layer.weight if layer.input_ids is None or in_axis is None else \
            np.compress(input_kept, layer.weight, axis=in_axis)
        rows, pruned_rows = _rows(expected, out_axis), _rows(weight, out_axis)
        bias, pruned_bias = _bias_column(flow, layer.node, len(layer.ids)), \
            _bias_column_of(arrays, node, weight.shape[out_axis])
        if bias is not None and pruned_bias is not None:  # biases tell apart rows that agree on their weights
            rows, pruned_rows = np.hstack([rows, bias]), np.hstack([pruned_rows, pruned_bias])
        if in_axis is None:  # depthwise: its channels are its input's
            output_kept = input_kept
            matched = len(pruned_rows) == int(output_kept.sum()) and _agrees(rows[output_kept], pruned_rows)
        else:
            chosen = _match_rows(rows, pruned_rows)
            matched = chosen is not None
            output_kept = np.zeros(len(layer.ids), dtype=bool)
            if matched:
                output_kept[chosen] = True
        output_roots = roots[layer.ids].tolist()
        if not matched or any(decided.get(r, keep) != keep for r, keep in zip(output_roots, output_kept.tolist())):
            notes.append(Note(layer.name, "its pruned weights are not a channel slice of the original's"))
            continue
        decided.update(zip(output_roots, output_kept.tolist()))
        inputs = None if layer.input_ids is None or in_axis is None else np.flatnonzero(input_kept)
        found[layer.name] = KeptChannels(np.flatnonzero(output_kept), inputs)
    return found, notes


def unread_outputs(model: onnx.ModelProto, exclude: tuple[str, ...] = ()) -> dict[str, tuple[np.ndarray, int]]:
    """Weight name -> (mask of its output channels that nothing reads any more, its output axis).

    Unstructured pruning can leave every weight that reads some channel at zero: the digits MLP
    pruned 90% per layer uses 60 of its 128 second-layer units, and the weights computing the
    other 68 (a third of the layer's budget) change nothing. A channel class of the flow is unread
    when every layer that takes it as input has only zeros for it and nothing the flow cannot
    follow (a graph output, a Reshape, a LayerNormalization ...) sees it. Zeroing the rows that
    compute it can leave their own inputs unread in turn, so this repeats until nothing changes.
    Only weights read by one node, of layers not excluded, are listed.
    """
    flow = ChannelFlow(model, set(exclude))
    flow.follow()
    roots = flow.roots()
    frozen = {int(roots[i]) for i in flow.frozen}
    uses = tensor_reads(model.graph)
    arrays = {layer.node.input[1]: flow.array(layer.node.input[1]).copy() for layer in flow.layers}
    readers = []  # (layer, its input axis) for the layers whose input channels the flow knows
    for layer in flow.layers:
        in_axis, _ = flow.layer_axes(layer.node)
        if in_axis is not None and layer.input_ids is not None:
            readers.append((layer, in_axis))
    producers = [layer for layer in flow.layers if uses[layer.node.input[1]] == 1 and
                 layer.node.name not in exclude and layer.node.op_type not in exclude]
    masks = {layer.node.input[1]: (np.zeros(len(layer.ids), bool), layer.out_axis) for layer in producers}
    while True:
        seen, read = set(), set()
        for layer, in_axis in readers:
            weight = arrays[layer.node.input[1]]
            used = (np.moveaxis(weight, in_axis, 0).reshape(len(layer.input_ids), -1) != 0).any(axis=1)
            seen.update(roots[layer.input_ids].tolist())
            read.update(roots[layer.input_ids[used]].tolist())
        unread = np.array(sorted(seen - read - frozen), dtype=np.int64)
        changed = False
        for layer in producers:
            rows = np.isin(roots[layer.ids], unread)
            moved = np.moveaxis(arrays[layer.node.input[1]], layer.out_axis, 0)  # a view: writes reach the array
            if rows.any() and moved[rows].any():
                moved[rows] = 0
                changed = True
            masks[layer.node.input[1]][0][rows] = True
        if not changed:
            return masks


def zero_unread_outputs(model: onnx.ModelProto, exclude: tuple[str, ...] = ()) -> list[Note]:
    """Zero, in place, the weights that compute output channels nothing reads (unread_outputs): exact,
    and shapes stay as they are, so later passes still line the layers up with the original model's;
    the zeros cost next to nothing once stored sparse or packed. A note per layer that changed."""
    masks = unread_outputs(model, exclude)
    initializers = {t.name: t for t in model.graph.initializer}
    uses = tensor_reads(model.graph)
    notes = []
    for node in model.graph.node:
        name = node.input[1] if len(node.input) > 1 else None
        if name not in masks or not masks[name][0].any():
            continue
        mask, out_axis = masks[name]
        weight = numpy_helper.to_array(initializers[name]).copy()
        rows = np.moveaxis(weight, out_axis, 0)  # a view
        count = int((rows[mask] != 0).sum())
        if count:
            rows[mask] = 0
            initializers[name].CopyFrom(numpy_helper.from_array(weight, name))
        biases = _zero_bias(model.graph, node, mask, initializers, uses)
        if count or biases:
            notes.append(Note(node.name or node.output[0], f"{count:,} more weights and {biases} biases zeroed: "
                                                            f"they computed {int(mask.sum())} of {len(mask)} "
                                                            f"output channels that nothing reads any more"))
    return notes


def _zero_bias(graph, node, mask: np.ndarray, initializers: dict, reads: Counter) -> int:
    """Zero the entries of the layer's own bias (graph.layer_bias) for the channels in `mask`; how many changed."""
    name = layer_bias(graph, node, initializers, reads)
    if name is None or initializers[name].dims[0] != len(mask):
        return 0
    bias = numpy_helper.to_array(initializers[name]).copy()
    count = int((bias[mask] != 0).sum())
    if count:
        bias[mask] = 0
        initializers[name].CopyFrom(numpy_helper.from_array(bias, name))
    return count


def _rows(weight: np.ndarray, out_axis: int) -> np.ndarray:
    return np.moveaxis(weight, out_axis, 0).reshape(weight.shape[out_axis], -1).astype(np.float32)


def _bias_column(flow: ChannelFlow, node: onnx.NodeProto, count: int) -> np.ndarray | None:
    name = node.input[2] if len(node.input) > 2 else ""
    return _as_column(flow.array(name) if name in flow.constants else None, count)


def _bias_column_of(arrays: dict, node: onnx.NodeProto, count: int) -> np.ndarray | None:
    name = node.input[2] if len(node.input) > 2 else ""
    return _as_column(numpy_helper.to_array(arrays[name]) if name in arrays else None, count)


def _as_column(bias: np.ndarray | None, count: int) -> np.ndarray | None:
    return bias.reshape(count, 1).astype(np.float32) if bias is not None and bias.size == count else None


def _agrees(rows: np.ndarray, pruned_rows: np.ndarray) -> bool:
    """Every pruned row equals its original row wherever the pruned row is nonzero."""
    return rows.shape == pruned_rows.shape and bool(np.all((rows == pruned_rows) | (pruned_rows == 0)))


def _match_rows(rows: np.ndarray, pruned_rows: np.ndarray, window: int = 16) -> np.ndarray | None:
    """Increasing indices of `rows` that the `pruned_rows` are, or None; the earliest agreeing row
    wins. Kept rows are usually next to each other, so rows are tried a few at a time."""
    if rows.shape[1:] != pruned_rows.shape[1:]:
        return None
    chosen, start = [], 0
    for row in pruned_rows:
        nonzero = row != 0
        while True:
            candidates = rows[start:start + window]
            if not len(candidates):
                return None
            hit = np.flatnonzero(np.all(candidates[:, nonzero] == row[nonzero], axis=1))
            if hit.size:
                start += int(hit[0])
                break
            start += len(candidates)
        chosen.append(start)
        start += 1
    return np.array(chosen, dtype=np.int64)


def _check_arguments(sparsity, criterion, round_to) -> None:
    if not 0 <= sparsity < 1:
        raise UsageError(f"prune_channels: sparsity must be in [0, 1), got {sparsity}")
    if criterion not in CRITERIA:
        raise UsageError(f"prune_channels: unknown criterion {criterion!r}; use one of {', '.join(CRITERIA)}")
    if not isinstance(round_to, int) or round_to < 1:
        raise UsageError(f"prune_channels: round_to must be a positive integer, got {round_to!r}")


@dataclass
class Channels:
    """The channels of one tensor: an id per position along `axis` (negative: counted from the end,
    which survives broadcasting against operands of another rank)."""

    ids: np.ndarray
    axis: int
    rank: int | None

    def positive_axis(self) -> int | None:
        return None if self.rank is None else self.axis + self.rank


@dataclass
class Layer:
    node: onnx.NodeProto
    ids: np.ndarray  # its output channels
    weight: np.ndarray
    out_axis: int
    input_ids: np.ndarray | None = None  # the channels its input axis was cut by (a depthwise Conv's are its ids)
    gamma: np.ndarray | None = None  # |scale| of a BatchNormalization reading its output

    @property
    def name(self) -> str:
        return self.node.name or self.node.output[0]

    def scores(self, criterion: str) -> np.ndarray:
        if criterion == "bn-scale" and self.gamma is not None:
            return self.gamma
        rows = np.moveaxis(self.weight.astype(np.float64), self.out_axis, 0).reshape(len(self.ids), -1)
        return np.abs(rows).sum(axis=1) if criterion == "l1" else np.sqrt((rows * rows).sum(axis=1))


class ChannelFlow:
    """Follows channel ids through the main graph, recording every cut pruning will need."""

    def __init__(self, model: onnx.ModelProto, exclude: set[str]):
        self.graph = model.graph
        self.opset = opset_version(model) or 1
        self.exclude = exclude
        pinned = {i.name for i in self.graph.input} | {o.name for o in self.graph.output}
        self.constants = {t.name: t for t in self.graph.initializer if t.name not in pinned}
        self.ranks = _declared_ranks(model)
        self.channels: dict[str, Channels] = {}
        self.parent: list[int] = []  # union-find over channel ids
        self.frozen: set[int] = set()
        self.layers: list[Layer] = []
        self.layer_by_output: dict[str, Layer] = {}
        # (node index, input index) -> the cuts of that constant: (axis, ids of the positions on it)
        self.cuts: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = defaultdict(list)
        self.splits: list[tuple[int, list[np.ndarray]]] = []  # Split node, ids of each piece
        self.depthwise: list[tuple[int, np.ndarray]] = []  # Conv node whose group is its channel count
        self.notes: list[Note] = []
        self._arrays: dict[str, np.ndarray] = {}

    # -- ids ------------------------------------------------------------------------------------

    def new_ids(self, count: int) -> np.ndarray:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return np.arange(start, start + count)

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        for i, j in zip(a.tolist(), b.tolist()):
            self.parent[self.find(i)] = self.find(j)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)

    def kept_mask(self, removed: set[int]):
        """A function from ids to a mask of the ones that stay."""
        roots, gone = self.roots(), np.array(sorted(removed), dtype=np.int64)
        return lambda ids: ~np.isin(roots[ids], gone)

    def freeze(self, tensor: str, where: str, why: str) -> None:
        self.frozen.update(self.channels[tensor].ids.tolist())
        self.notes.append(Note(where, f"channels of {tensor} kept whole: {why}"))

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            self._arrays[name] = numpy_helper.to_array(self.constants[name])
        return self._arrays[name]

    # -- the walk -------------------------------------------------------------------------------

    def follow(self) -> None:
        for index, node in enumerate(self.graph.node):  # ONNX graphs are stored in topological order
            where = node.name or node.output[0]
            problem = self.visit(index, node)
            if problem:
                for name in dict.fromkeys(n for n in node.input if n in self.channels):
                    self.freeze(name, where, problem)
        for output in self.graph.output:
            if output.name in self.channels:
                self.freeze(output.name, output.name, "it is a graph output")

    def visit(self, index: int, node: onnx.NodeProto) -> str | None:
        """Hand the channels of the node's inputs on to its outputs; a reason where they cannot go on."""
        if node.name in self.exclude or node.op_type in self.exclude:
            self.notes.append(Note(node.name or node.output[0], "excluded: left as it is"))
            return "read by an excluded node"
        inner = list(subgraphs(node))
        if inner:  # only the main graph is pruned
            captured = set().union(*(outer_scope_names(g) for g in inner))
            for name in sorted(captured & self.channels.keys()):
                self.freeze(name, node.name or node.output[0], f"read inside a {node.op_type} subgraph")
            return f"read by {node.op_type}, which has subgraphs"
        if node.domain not in ("", "ai.onnx"):
            return f"read by {node.domain}::{node.op_type}"
        shape = self.layer_axes(node)
        if shape is not None:
            return self.follow_layer(index, node, *shape)
        if not any(n in self.channels for n in node.input):
            return None
        if node.op_type == "Conv" and attribute(node, "group", 1) != 1:
            return "grouped Conv (not depthwise) is not pruned"
        if node.op_type in _ELEMENTWISE:
            return self.follow_elementwise(index, node)
        if node.op_type in _PASS_THROUGH or node.op_type == "BatchNormalization":
            return self.follow_pass_through(index, node)
        if node.op_type == "Concat":
            return self.follow_concat(node)
        if node.op_type == "Split":
            return self.follow_split(index, node)
        return f"read by {node.op_type}"

    def layer_axes(self, node: onnx.NodeProto) -> tuple[int | None, int] | None:
        """(input axis, output axis) of the weights of a layer that can be pruned, or None.
        A depthwise Conv has no input axis: its channels are its input's."""
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            return None
        weight = self.constants.get(node.input[1])
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if weight is None or (has_bias and node.input[2] not in self.constants):
            return None
        rank, group = len(weight.dims), attribute(node, "group", 1)
        if node.op_type == "Conv" and rank >= 3:
            if group == 1:
                return 1, 0
            if group == weight.dims[0] and weight.dims[1] == 1:
                return None, 0
        if node.op_type == "ConvTranspose" and rank >= 3 and group == 1:
            return 0, 1
        if node.op_type == "Gemm" and rank == 2 and not attribute(node, "transA", 0):
            return (1, 0) if attribute(node, "transB", 0) else (0, 1)
        if node.op_type == "MatMul" and rank == 2:
            return 0, 1
        return None

    def follow_layer(self, index: int, node: onnx.NodeProto, in_axis: int | None, out_axis: int) -> str | None:
        weight = self.array(node.input[1])
        spatial = node.op_type in ("Conv", "ConvTranspose")
        channel_axis = 1 - weight.ndim if spatial else -1
        source = self.channels.get(node.input[0])
        lines_up = source is not None and source.axis == channel_axis and \
            len(source.ids) == weight.shape[0 if in_axis is None else in_axis]
        input_ids = None
        if in_axis is None:  # depthwise: output channel i filters input channel i alone
            if source is None:
                return None
            if not lines_up:
                return "the depthwise Conv's channels do not line up with its input's"
            ids = input_ids = source.ids
            self.depthwise.append((index, ids))
        else:
            if source is not None and not lines_up:
                self.freeze(node.input[0], node.name or node.output[0],
                            "its channel axis does not match the layer's weights")
            elif source is not None:
                self.cuts[(index, 1)].append((in_axis, source.ids))
                input_ids = source.ids
            ids = self.new_ids(weight.shape[out_axis])
        self.cuts[(index, 1)].append((out_axis, ids))
        if len(node.input) > 2 and node.input[2]:
            problem = self.cut_broadcast(index, 2, ids, -1 if node.op_type == "Gemm" else 0)
            if problem:
                self.frozen.update(ids.tolist())
                self.notes.append(Note(node.name or node.output[0], f"output channels kept whole: {problem}"))
        rank = weight.ndim if spatial else 2 if node.op_type == "Gemm" else \
            (source.rank if source is not None else self.ranks.get(node.input[0]))
        layer = Layer(node, ids, weight, out_axis, input_ids)
        self.layers.append(layer)
        self.layer_by_output[node.output[0]] = layer
        self.channels[node.output[0]] = Channels(ids, channel_axis, rank)
        return None

    def cut_broadcast(self, index: int, slot: int, ids: np.ndarray, axis: int) -> str | None:
        """Record the cut of a constant operand along `axis` (negative: aligned from the end, as
        broadcasting aligns it) where it has one value per channel; size-1 axes broadcast as they are."""
        name = self.graph.node[index].input[slot]
        dims = list(self.constants[name].dims)
        position = axis if axis >= 0 else len(dims) + axis
        if position < 0 or (axis < 0 and dims[position] == 1):
            return None
        if position >= len(dims) or dims[position] != len(ids):
            return f"constant {name} does not have one value per channel"
        self.cuts[(index, slot)].append((position, ids))
        return None

    def follow_elementwise(self, index: int, node: onnx.NodeProto) -> str | None:
        first = next(self.channels[n] for n in node.input if n in self.channels)
        for slot, name in enumerate(node.input):
            if name in self.channels:
                other = self.channels[name]
                if other.axis != first.axis or len(other.ids) != len(first.ids):
                    return "its operands' channels do not line up"
                self.tie(first.ids, other.ids)
            elif name in self.constants:
                problem = self.cut_broadcast(index, slot, first.ids, first.axis)
                if problem:
                    return problem
            elif name:
                return "its other operand is computed, with channels the flow does not know"
        self.channels[node.output[0]] = Channels(first.ids, first.axis, self.ranks.get(node.output[0], first.rank))
        return None

    def follow_pass_through(self, index: int, node: onnx.NodeProto) -> str | None:
        source = self.channels.get(node.input[0])
        if source is None or any(n in self.channels for n in node.input[1:]):
            return f"channels reach a parameter input of {node.op_type}"
        if any(node.output[1:]):
            return f"{node.op_type} has a second output"
        if node.op_type == "Resize" and len(node.input) > 3 and node.input[3]:
            return "Resize to given sizes fixes the channel count"
        if node.op_type == "BatchNormalization":
            if source.positive_axis() != 1 or not all(n in self.constants for n in node.input[1:5]):
                return "BatchNormalization with computed parameters or a channel axis other than 1"
            for slot in range(1, 5):
                if self.cut_broadcast(index, slot, source.ids, 0):
                    return "BatchNormalization parameters do not have one value per channel"
            if node.input[0] in self.layer_by_output:
                self.layer_by_output[node.input[0]].gamma = np.abs(self.array(node.input[1]).astype(np.float64))
        self.channels[node.output[0]] = source
        return None

    def follow_concat(self, node: onnx.NodeProto) -> str | None:
        parts = [self.channels.get(n) for n in node.input]
        if any(p is None for p in parts):
            return "Concat of tensors whose channels the flow does not know"
        first = parts[0]
        axis = attribute(node, "axis", 0)
        if axis >= 0:
            if first.rank is None:
                return "Concat along an axis of unknown rank"
            axis -= first.rank
        if any(p.axis != first.axis for p in parts):
            return "Concat of tensors with different channel axes"
        if axis == first.axis:
            self.channels[node.output[0]] = Channels(np.concatenate([p.ids for p in parts]), axis, first.rank)
            return None
        if any(len(p.ids) != len(first.ids) for p in parts):
            return "Concat along another axis of tensors with different channel counts"
        for part in parts[1:]:  # joined along another axis: channel i of every part is one channel
            self.tie(first.ids, part.ids)
        self.channels[node.output[0]] = first
        return None

    def follow_split(self, index: int, node: onnx.NodeProto) -> str | None:
        source = self.channels.get(node.input[0])
        if source is None:
            return "channels reach the split sizes"
        axis = attribute(node, "axis", 0)
        if axis >= 0:
            if source.rank is None:
                return "Split along an axis of unknown rank"
            axis -= source.rank
        if axis != source.axis:
            for output in node.output:
                self.channels[output] = source
            return None
        sizes = self.split_sizes(node, len(source.ids))
        if sizes is None:
            return "Split with computed sizes"
        if sum(sizes) != len(source.ids):
            return "Split sizes do not add up to the channel count"
        pieces = np.split(source.ids, np.cumsum(sizes)[:-1])
        self.splits.append((index, pieces))
        for output, piece in zip(node.output, pieces):
            self.channels[output] = Channels(piece, source.axis, source.rank)
        return None

    def split_sizes(self, node: onnx.NodeProto, count: int) -> list[int] | None:
        if len(node.input) > 1 and node.input[1]:
            return self.array(node.input[1]).astype(int).tolist() if node.input[1] in self.constants else None
        given = attribute(node, "split", None)
        if given is not None:
            return list(given)
        chunk = math.ceil(count / len(node.output))  # opset 18 splits unevenly: the last piece is smaller
        return [chunk] * (len(node.output) - 1) + [count - chunk * (len(node.output) - 1)]


def choose_removed(flow: ChannelFlow, sparsity: float, criterion: str, round_to: int) -> set[int]:
    """Roots of the tied classes to remove: in each block, the lowest-scoring `sparsity` of them."""
    roots = flow.roots()
    score = np.zeros(len(roots))
    for layer in flow.layers:
        np.add.at(score, roots[layer.ids], layer.scores(criterion))
    frozen = {int(roots[i]) for i in flow.frozen}
    homes: dict[int, set[int]] = defaultdict(set)  # class -> the tracked tensors it occurs in
    for t, channels in enumerate(flow.channels.values()):
        for root in set(roots[channels.ids].tolist()):
            homes[root].add(t)
    blocks: dict[frozenset, list[int]] = defaultdict(list)
    for root, tensors in homes.items():
        if root not in frozen:
            blocks[frozenset(tensors)].append(root)
    removed: set[int] = set()
    for members in blocks.values():
        members.sort()
        order = np.argsort(score[members], kind="stable")
        removed.update(members[i] for i in order[:len(members) - kept_count(len(members), sparsity, round_to)])
    return removed


def kept_count(count: int, sparsity: float, round_to: int) -> int:
    keep = max(1, count - int(sparsity * count + 0.5))
    return min(count, math.ceil(keep / round_to) * round_to)  # rounding up never prunes more than asked


def apply_cuts(model: onnx.ModelProto, flow: ChannelFlow, kept) -> None:
    graph = model.graph
    values: dict[tuple[int, int], np.ndarray] = {}
    for (index, slot), cuts in flow.cuts.items():
        array = flow.array(graph.node[index].input[slot])
        for axis, ids in cuts:
            mask = kept(ids)
            if not mask.all():
                array = np.compress(mask, array, axis=axis)
        if array.shape != flow.array(graph.node[index].input[slot]).shape:
            values[(index, slot)] = array
    taken = all_names(model)
    for index, pieces in flow.splits:
        sizes = [int(kept(piece).sum()) for piece in pieces]
        if sizes != [len(piece) for piece in pieces]:
            set_split_sizes(graph, index, sizes, flow.opset, values, taken)
    for index, ids in flow.depthwise:
        node = graph.node[index]
        group = next(a for a in node.attribute if a.name == "group")
        group.i = int(kept(ids).sum())
    write_constants(graph, values, taken)
    resized = {name for name, channels in flow.channels.items() if not kept(channels.ids).all()}
    stale = [v for v in graph.value_info if v.name in resized]  # simpler than recomputing their shapes
    for entry in stale:
        graph.value_info.remove(entry)


def set_split_sizes(graph: onnx.GraphProto, index: int, sizes: list[int], opset: int, values: dict,
                    taken: set[str]) -> None:
    node = graph.node[index]
    if opset < 13:
        for stale in [a for a in node.attribute if a.name == "split"]:
            node.attribute.remove(stale)
        node.attribute.append(helper.make_attribute("split", sizes))
    elif len(node.input) > 1 and node.input[1]:
        values[(index, 1)] = np.array(sizes, dtype=np.int64)
    else:  # sizes were implied (equal pieces, or opset 18's num_outputs): now they must be given
        for stale in [a for a in node.attribute if a.name == "num_outputs"]:
            node.attribute.remove(stale)
        name = unique_name(f"{node.name or node.output[0]}_split", taken)
        graph.initializer.append(numpy_helper.from_array(np.array(sizes, dtype=np.int64), name))
        node.input.append(name)


def write_constants(graph: onnx.GraphProto, values: dict[tuple[int, int], np.ndarray], taken: set[str]) -> None:
    """Give each (node, input) its new constant: in place where that input is the constant's only
    reader, else as a copy under a new name (identical copies shared), dropping originals left unread."""
    readers = tensor_reads(graph)
    initializers = {t.name: t for t in graph.initializer}
    copies: dict[tuple, str] = {}
    replaced: set[str] = set()
    for (index, slot), array in values.items():
        node = graph.node[index]
        name = node.input[slot]
        if readers[name] == 1:
            initializers[name].CopyFrom(numpy_helper.from_array(array, name))
            continue
        key = (name, array.dtype.str, array.shape, array.tobytes())
        if key not in copies:
            copies[key] = unique_name(f"{name}_pruned", taken)
            graph.initializer.append(numpy_helper.from_array(array, copies[key]))
        node.input[slot] = copies[key]
        replaced.add(name)
    still_read = tensor_reads(graph)
    for tensor in [t for t in graph.initializer if t.name in replaced and not still_read[t.name]]:
        graph.initializer.remove(tensor)


def layer_notes(flow: ChannelFlow, kept) -> list[Note]:
    frozen_roots = {flow.find(i) for i in flow.frozen}
    notes = []
    for layer in flow.layers:
        left = int(kept(layer.ids).sum())
        frozen = sum(flow.find(i) in frozen_roots for i in layer.ids.tolist())
        suffix = f" ({frozen} frozen)" if frozen else ""
        notes.append(Note(layer.name, f"output channels {len(layer.ids)} -> {left}{suffix}"))
    return notes


def _declared_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Ranks that shape inference can tell: they place channel axes given as positive numbers."""
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            ranks[info.name] = len(info.type.tensor_type.shape.dim)
    return ranks

