"""`reconstruct`: refit compressed layers so their outputs match the original model's.

After pruning (or any pass that changes weights in place), layer l sees inputs X' that differ
from the original X (earlier layers changed too), and computes X' W' instead of X W. For each
MatMul/Gemm whose weights differ from the same node's in the pipeline's input model, this solves

    min_W' || [X' 1] W' - [X 1] W ||^2   over the entries W' already has nonzero (zeros stay zero)

from three Gram matrices streamed over calibration data (X'^T X', X'^T X, X^T X), one column of
outputs at a time; the bias, where the layer has one, is refit too. It is the seed's fine-tuning
step done per layer in closed form, layer after layer in graph order, so that each one corrects
the drift its refit predecessors leave.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxshrink.activations import Gram, main_graph_tensors, stream_tensors
from onnxshrink.errors import OnnxShrinkError
from onnxshrink.graph import attribute
from onnxshrink.options import PassOptions, option
from onnxshrink.pass_base import Note, Pass, PassContext, PassOutput
from onnxshrink.registry import register_pass


@register_pass("reconstruct")
class Reconstruct(Pass):
    summary = "Least-squares refit of compressed MatMul/Gemm layers to the original model's outputs (zeros stay zero)."
    needs_data = True

    @dataclass(frozen=True)
    class Options(PassOptions):
        max_samples: int = option(128, "calibration samples streamed", low=1)
        damping: float = option(1e-4, "ridge term relative to the mean input energy; keeps sparse fits stable", low=0)

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassOutput:
        if context.reference is None or context.data is None:
            raise OnnxShrinkError("reconstruct needs calibration data and the original model: run it in a pipeline "
                                  "after the pass that changed the weights, e.g. 'prune(sparsity=0.8),reconstruct'")
        layers, notes = _changed_layers(model, context.reference)
        if not layers:
            return PassOutput(model, notes + [Note("(graph)", "no MatMul/Gemm weights differ from the original model")])
        weights = {t.name: t for t in model.graph.initializer}
        # In graph order, one input tensor at a time: a layer is refit to the inputs its already
        # refit predecessors now give it. Refitting all from one pass over the data leaves each
        # fitted to inputs that no longer occur (on the digits MLP at 90% sparsity that costs
        # more accuracy than reconstruction wins).
        stages = list(dict.fromkeys(layer.node.input[0] for layer in layers))
        for stage in stages:
            group = [layer for layer in layers if layer.node.input[0] == stage]
            grams = _stream_grams(model, context.reference, group, context, self.options.max_samples)
            for layer in group:
                inner, cross, outer = (grams[key].total() for key in layer.gram_keys())
                before, after = layer.refit(weights, inner, cross, outer, self.options.damping)
                notes.append(Note(layer.where, f"output error {before:.3g} -> {after:.3g} of the original output energy"))
        return PassOutput(model, notes)


@dataclass
class Layer:
    node: onnx.NodeProto
    weight: str  # current and original share the name
    bias: str | None
    original_input: str
    original_weight: np.ndarray  # [K, N]
    original_bias: np.ndarray | None
    transposed: bool  # Gemm transB: stored [N, K]

    @property
    def where(self) -> str:
        return self.node.name or self.node.output[0]

    def gram_keys(self) -> tuple:
        current, original = self.node.input[0], self.original_input
        return ("inner", current), ("cross", current, original), ("outer", original)

    def refit(self, weights, inner, cross, outer, damping) -> tuple[float, float]:
        """Solve each output column on its nonzero support; returns relative error before/after."""
        current = numpy_helper.to_array(weights[self.weight]).astype(np.float64)
        current = current.T if self.transposed else current
        biased = self.bias is not None
        target = _stack(self.original_weight, self.original_bias)  # [K(+1), N]
        start = _stack(current, numpy_helper.to_array(weights[self.bias]).astype(np.float64) if biased else None)
        if not biased:  # the Gram matrices carry a ones column either way; drop it
            inner, cross, outer = inner[:-1, :-1], cross[:-1, :-1], outer[:-1, :-1]
        rhs = cross @ target
        energy = np.einsum("kn,kl,ln->", target, outer, target)
        ridge = damping * np.mean(np.diag(inner))
        solved = start.copy()
        support = start != 0
        if biased:
            support[-1] = True
        for column in range(start.shape[1]):
            free = np.flatnonzero(support[:, column])
            if free.size:
                block = inner[np.ix_(free, free)] + ridge * np.eye(free.size)
                solved[free, column] = np.linalg.solve(block, rhs[free, column])

        def error(w):
            return float((np.einsum("kn,kl,ln->", w, inner, w) - 2 * np.einsum("kn,kn->", w, rhs) + energy)
                         / max(energy, 1e-30))

        before, after = error(start), error(solved)
        if after >= before:  # never worse on the calibration data
            return before, before
        matrix = solved[:-1] if biased else solved
        stored = matrix.T if self.transposed else matrix
        weights[self.weight].CopyFrom(numpy_helper.from_array(stored.astype(np.float32), self.weight))
        if biased:
            weights[self.bias].CopyFrom(numpy_helper.from_array(solved[-1].astype(np.float32), self.bias))
        return before, after


def _stack(matrix: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    return matrix if bias is None else np.vstack([matrix, bias[None, :]])


def _changed_layers(model, reference) -> tuple[list[Layer], list[Note]]:
    original_nodes = {(n.name or n.output[0]): n for n in reference.graph.node}
    original_weights = {t.name: t for t in reference.graph.initializer}
    weights = {t.name: t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    tappable, original_tappable = main_graph_tensors(model), main_graph_tensors(reference)
    uses = _uses(model.graph)
    layers, notes = [], []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        if node.op_type == "Gemm" and (attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0):
            continue
        where = node.name or node.output[0]
        original = original_nodes.get(where)
        name = node.input[1]
        if original is None or original.op_type != node.op_type or name not in weights or original.input[1] != name \
                or name not in original_weights or len(weights[name].dims) != 2:
            continue
        stored = numpy_helper.to_array(weights[name])
        before = numpy_helper.to_array(original_weights[name])
        if stored.shape != before.shape or np.array_equal(stored, before):
            continue
        if uses.get(name, 0) != 1 or node.input[0] not in tappable or original.input[0] not in original_tappable:
            notes.append(Note(where, "not refit: shared weight or an input that cannot be observed"))
            continue
        transposed = node.op_type == "Gemm" and bool(attribute(node, "transB", 0))
        bias, original_bias = _bias(node, model, reference, weights, original_weights, uses)
        layers.append(Layer(node, name, bias, original.input[0], (before.T if transposed else before).astype(np.float64),
                            original_bias, transposed))
    return layers, notes


def _bias(node, model, reference, weights, original_weights, uses):
    """The layer's 1-D bias (Gemm's C, or the constant of the Add a MatMul feeds), if it is refittable."""
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        name = node.input[2]
    else:
        readers = [n for n in model.graph.node if node.output[0] in n.input]
        add = readers[0] if len(readers) == 1 and readers[0].op_type == "Add" else None
        name = next((i for i in add.input if i in weights), None) if add is not None else None
    if name is None or name not in original_weights or uses.get(name, 0) != 1 or len(weights[name].dims) != 1:
        return None, None
    return name, numpy_helper.to_array(original_weights[name]).astype(np.float64)


def _stream_grams(model, reference, layers: list[Layer], context, max_samples: int) -> dict:
    """Gram matrices of [x 1] for the current and original layer inputs, streamed in lockstep."""
    current_names = sorted({layer.node.input[0] for layer in layers})
    original_names = sorted({layer.original_input for layer in layers})
    grams = {}
    for layer in layers:
        inner, cross, outer = layer.gram_keys()
        k = layer.original_weight.shape[0] + 1
        grams.setdefault(inner, Gram(k))
        grams.setdefault(cross, Gram(k, k))
        grams.setdefault(outer, Gram(k))
    now = stream_tensors(model, current_names, islice(iter(context.data), max_samples), context.progress)
    before = stream_tensors(reference, original_names, islice(iter(context.data), max_samples))
    for current, original in zip(now, before):
        for (kind, *names), gram in grams.items():
            if kind == "inner":
                gram.add(_with_ones(current[names[0]], gram.size))
            elif kind == "outer":
                gram.add(_with_ones(original[names[0]], gram.size))
            else:
                gram.add(_with_ones(current[names[0]], gram.size), _with_ones(original[names[1]], gram.size))
    return grams


def _with_ones(value, size: int) -> np.ndarray:
    rows = np.asarray(value, dtype=np.float64).reshape(-1, size - 1)
    return np.hstack([rows, np.ones((rows.shape[0], 1))])


def _uses(graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            counts[name] = counts.get(name, 0) + 1
    return counts

