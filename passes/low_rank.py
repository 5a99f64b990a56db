"""`svd`: factor MatMul/Gemm weights W[K,N] into W1[K,r] W2[r,N] where that saves parameters.

A layer is factored only where r(K+N) <= (1 - min_saving) K N, so every factored layer is smaller
and, at batch 1, reads fewer bytes. The rank comes from `rank` (fixed), `energy` (the smallest
rank keeping that fraction of the squared singular values) or `ratio` (the largest rank whose
factors hold at most that fraction of W's parameters).

`activation_aware=true` (as in ASVD / SVD-LLM) minimizes the error of the layer's *outputs* on
calibration data instead of the error of W: with the input Gram H = X^T X = L L^T, the truncated
SVD of L^T W = U S V^T gives W1 = L^-T U_r S_r and W2 = V_r^T, the best rank-r map for those
inputs (directions the inputs never take cost nothing to drop). Energy is then measured on the
output error too.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

import numpy as np
import onnx
import scipy.linalg
from onnx import helper, numpy_helper

from onnxshrink.activations import Gram, main_graph_tensors, stream_tensors
from onnxshrink.errors import OnnxShrinkError, UsageError
from onnxshrink.graph import (all_names, attribute, constants_to_initializers, outer_scope_names, subgraphs,
                              unique_name)
from onnxshrink.options import PassOptions, option
from onnxshrink.pass_base import Note, Pass, PassContext, PassOutput
from onnxshrink.registry import register_pass


@register_pass("svd")
class LowRank(Pass):
    summary = "Factor MatMul/Gemm weights into two thin ones by (activation-aware) truncated SVD where it saves."
    needs_data = True

    @dataclass(frozen=True)
    class Options(PassOptions):
        rank: int = option(0, "fixed rank (0: use energy or ratio)", low=0)
        energy: float = option(0.0, "keep this fraction of the squared singular values (0: use rank or ratio)",
                               low=0, high=1)
        ratio: float = option(0.0, "factors hold at most this fraction of each weight's parameters "
                                   "(0: use rank or energy)", low=0, high=1)
        min_saving: float = option(0.1, "factor a layer only where it saves at least this fraction", low=0, high=1,
                                   high_exclusive=True)
        activation_aware: bool = option(True, "fit the layer's outputs on calibration data, not the weights")
        exclude: tuple[str, ...] = option((), "op types or node names left as they are")
        min_elements: int = option(4096, "smaller weights are left as they are", low=1)
        max_samples: int = option(64, "calibration samples for the input Grams", low=1)
        damping: float = option(0.01, "activation-aware: added to the Gram's diagonal, relative to its mean", low=0)

        def __post_init__(self):
            super().__post_init__()
            given = [name for name in ("rank", "energy", "ratio") if getattr(self, name)]
            if len(given) != 1:
                raise UsageError("give exactly one of rank=, energy= or ratio= (e.g. svd(energy=0.95))")

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassOutput:
        opts = self.options
        constants_to_initializers(model.graph)
        weights = {t.name: t for t in model.graph.initializer}
        layers, notes = _layers(model, weights, opts)
        if not layers:
            return PassOutput(model, notes + [Note("(graph)", "no MatMul/Gemm weights to factor")])
        grams = {}
        if opts.activation_aware:
            if context.data is None:
                raise OnnxShrinkError("svd(activation_aware=true) needs calibration data (--calib); "
                                      "or give activation_aware=false")
            grams = _input_grams(model, layers, weights, context, opts.max_samples, notes)
        taken = all_names(model)
        replaced = {}
        for node, matrix in layers:
            where = node.name or node.output[0]
            factors = _factor(matrix, grams.get(node.input[0]), opts)
            if factors is None:
                notes.append(Note(where, f"left as is: no rank of {matrix.shape} saves {opts.min_saving:.0%}"))
                continue
            left, right, kept = factors
            replaced[id(node)] = _factored_nodes(node, left, right, model.graph, taken)
            k, n = matrix.shape
            notes.append(Note(where, f"rank {left.shape[1]} of {min(k, n)}: {left.size + right.size:,} of {k * n:,} "
                                     f"weights, {kept:.1%} energy kept" + (" (of the outputs)" if grams else "")))
        if not replaced:
            return PassOutput(model, notes)
        new_nodes = []
        for node in model.graph.node:
            new_nodes += replaced.get(id(node), [node])
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        # The factored weights' originals are dropped unless something else still reads them.
        graph = model.graph
        needed = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        needed |= {name for node in graph.node for sub in subgraphs(node) for name in outer_scope_names(sub)}
        kept_inits = [t for t in model.graph.initializer if t.name in needed]
        del graph.initializer[:]
        graph.initializer.extend(kept_inits)
        return PassOutput(model, notes)


def _layers(model, weights, opts) -> tuple[list[tuple[onnx.NodeProto, np.ndarray]], list[Note]]:
    """(node, W as [K, N] float64) for each MatMul/Gemm this pass may factor."""
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    graph_inputs = {i.name for i in model.graph.input}
    layers, notes = [], []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        where = node.name or node.output[0]
        tensor = weights.get(node.input[1])
        if tensor is None or node.input[1] in graph_inputs or tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        if node.op_type in opts.exclude or node.name in opts.exclude:
            notes.append(Note(where, "left as is: excluded"))
            continue
        if len(tensor.dims) != 2 or int(np.prod(tensor.dims)) < opts.min_elements:
            continue
        if node.op_type == "Gemm" and (attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0
                                       or attribute(node, "beta", 1.0) != 1.0):
            notes.append(Note(where, "left as is: Gemm with transA, alpha or beta"))
            continue
        if readers[node.input[1]] > 1:
            notes.append(Note(where, "left as is: its weight is shared with other nodes"))
            continue
        matrix = numpy_helper.to_array(tensor).astype(np.float64)
        layers.append((node, matrix.T if node.op_type == "Gemm" and attribute(node, "transB", 0) else matrix))
    return layers, notes


def _input_grams(model, layers, weights, context, max_samples, notes) -> dict[str, np.ndarray]:
    tappable = main_graph_tensors(model)
    grams: dict[str, Gram] = {}
    for node, matrix in layers:
        if node.input[0] in tappable:
            grams.setdefault(node.input[0], Gram(matrix.shape[0]))
        else:
            notes.append(Note(node.name or node.output[0], "plain SVD: the layer input cannot be observed"))
    for values in stream_tensors(model, sorted(grams), islice(iter(context.data), max_samples), context.progress):
        for name, gram in grams.items():
            value = np.asarray(values[name])
            if value.dtype != np.float32 or value.shape[-1] != gram.size:
                raise OnnxShrinkError(f"svd: input '{name}' has shape {value.shape}, not [..., {gram.size}]")
            gram.add(value.reshape(-1, gram.size))
    return {name: gram.total() for name, gram in grams.items()}


def _factor(matrix: np.ndarray, gram: np.ndarray | None, opts) -> tuple[np.ndarray, np.ndarray, float] | None:
    """(W1 [K, r], W2 [r, N], energy kept) or None where no allowed rank saves enough."""
    k, n = matrix.shape
    most = int((1 - opts.min_saving) * k * n // (k + n))  # the largest rank that still saves enough
    if most < 1:
        return None
    if gram is not None:
        damped = gram + opts.damping * np.mean(np.diag(gram)) * np.eye(k) + 1e-12 * np.eye(k)
        lower = scipy.linalg.cholesky(damped, lower=True)  # H = L L^T
        u, s, vt = np.linalg.svd(lower.T @ matrix, full_matrices=False)
    else:
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    energy = np.cumsum(s ** 2) / max(np.sum(s ** 2), 1e-300)
    if opts.rank:
        r = opts.rank
    elif opts.energy:
        r = int(np.searchsorted(energy, opts.energy - 1e-12) + 1)
    else:
        r = int(opts.ratio * k * n // (k + n))
    if r > min(k, n) and opts.rank:
        raise UsageError(f"svd: rank={r} is larger than min(K, N) = {min(k, n)} of a {k}x{n} weight")
    r = min(r, min(k, n))
    if r < 1 or r > most:
        return None
    left = u[:, :r] * s[:r]
    if gram is not None:
        left = scipy.linalg.solve_triangular(lower.T, left, lower=False)  # L^-T U_r S_r
    return left.astype(np.float32), vt[:r].astype(np.float32), float(energy[r - 1])


def _factored_nodes(node, left, right, graph, taken) -> list[onnx.NodeProto]:
    base = node.name or node.output[0]
    w1, w2, middle = (unique_name(f"{base}_{suffix}", taken) for suffix in ("svd_w1", "svd_w2", "svd_mid"))
    graph.initializer.extend([numpy_helper.from_array(left, w1), numpy_helper.from_array(right, w2)])
    first = helper.make_node("MatMul", [node.input[0], w1], [middle], name=unique_name(f"{base}_svd1", taken))
    if node.op_type == "MatMul":
        second = helper.make_node("MatMul", [middle, w2], list(node.output), name=node.name or None)
    else:  # Gemm: the bias stays on the second factor
        second = helper.make_node("Gemm", [middle, w2, *node.input[2:]], list(node.output), name=node.name or None)
    return [first, second]
