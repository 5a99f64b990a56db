"""`prune`: zero the weights that matter least, so later stages can store or skip them.

* `method=magnitude` zeroes the smallest |w|; `method=obs` is one-shot Optimal Brain Surgeon in
  the SparseGPT form (Frantar & Alistarh 2023): each MatMul/Gemm layer's input Hessian
  H = sum x^T x is streamed from calibration data, weights are pruned column block by column
  block by the saliency w^2 / [H^-1]_jj^2, and each removed weight's error is spread over the
  columns not yet visited, so the layer's outputs move far less than the zeroed mass suggests.
* `pattern=unstructured` prunes anywhere; `N:M` keeps N of every M consecutive weights along the
  reduction axis (input features; input channels for Conv), the layout sparse kernels use;
  `channel` removes whole output channels (passes/prune_channels.py): a smaller dense model.
* `scope=layer` prunes each layer to `sparsity`; `scope=global` applies one magnitude threshold
  to all layers, so layers with many small weights give up more; `scope=auto` measures each
  layer's output drift over a sweep of sparsities (passes/sensitivity.py) and spends the
  parameter-weighted target where it hurts least.

Zeros stay stored densely here, so that reconstruct, quantization or clustering read ordinary
weights afterwards; `store-sparse` is what makes the file small.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice

import numpy as np
import onnx
import scipy.linalg
from onnx import TensorProto, numpy_helper

from onnxshrink.activations import Gram, main_graph_tensors, stream_tensors
from onnxshrink.errors import OnnxShrinkError, UsageError
from onnxshrink.graph import attribute, constants_to_initializers
from onnxshrink.options import PassOptions, option
from onnxshrink.pass_base import Note, Pass, PassContext, PassOutput
from onnxshrink.registry import register_pass

PATTERNS = ("unstructured", "2:4", "4:8", "channel")


@register_pass("prune")
class Prune(Pass):
    summary = "Zero the least important weights (magnitude or one-shot OBS), unstructured, N:M or whole channels."
    needs_data = True

    @dataclass(frozen=True)
    class Options(PassOptions):
        sparsity: float = option(0.5, "fraction of each layer's weights (or channels) removed; N:M patterns fix it "
                                      "at 1 - N/M", low=0, high=1, high_exclusive=True)
        method: str = option("magnitude", "magnitude: smallest |w|; obs: second-order one-shot pruning with "
                                          "weight updates from calibration data (MatMul/Gemm)", choices=("magnitude", "obs"))
        pattern: str = option("unstructured", "where zeros may go", choices=PATTERNS)
        scope: str = option("layer", "layer: each layer to `sparsity`; global: one magnitude threshold for all; "
                                     "auto: per-layer sparsities from measured sensitivity (unstructured)",
                            choices=("layer", "global", "auto"))
        criterion: str = option("l2", "channel importance for pattern=channel", choices=("l1", "l2", "bn-scale"))
        round_to: int = option(1, "pattern=channel: keep a multiple of this many channels per layer (8 suits "
                                  "onnxruntime's CPU kernels: odd counts can run slower than the original)", low=1)
        exclude: tuple[str, ...] = option((), "op types or node names left dense")
        min_elements: int = option(1024, "smaller weights are left dense (biases, tiny heads)", low=1)
        max_samples: int = option(128, "calibration samples for obs Hessians", low=1)
        damping: float = option(0.01, "obs: added to the Hessian diagonal, relative to its mean", low=0)
        block: int = option(128, "obs: columns pruned and compensated together", low=8)

        def __post_init__(self):
            super().__post_init__()
            if self.scope == "auto" and self.pattern != "unstructured":
                raise UsageError("scope=auto needs pattern=unstructured (N:M fixes each layer's sparsity, "
                                 "channel changes shapes)")

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassOutput:
        opts = self.options
        if opts.pattern == "channel":
            from .prune_channels import prune_channels

            pruned, notes = prune_channels(model, opts.sparsity, opts.criterion, opts.exclude, opts.round_to)
            return PassOutput(pruned, notes)
        constants_to_initializers(model.graph)
        layers, notes = self._layers(model)
        if not layers:
            return PassOutput(model, notes + [Note("(graph)", "no MatMul/Gemm/Conv weights to prune")])
        n_m = _n_m(opts.pattern)
        weights = {t.name: t for t in model.graph.initializer}
        if n_m:
            uneven = [l for l in layers if l.matrix(weights).shape[0] % n_m[1]]
            notes += [Note(l.where, f"left dense: its {l.matrix(weights).shape[0]} inputs are not a multiple of "
                                    f"{n_m[1]}") for l in uneven]
            layers = [l for l in layers if l not in uneven]
        if opts.scope == "auto":
            if context.data is None:
                raise OnnxShrinkError("prune(scope=auto) needs calibration data (--calib) to measure sensitivity")
            from .sensitivity import auto_sparsities

            chosen = auto_sparsities(model, context.data, opts.sparsity, opts.method, opts.pattern,
                                     min_elements=opts.min_elements, exclude=opts.exclude, progress=context.progress)
            targets = {layer.weight: chosen.get(layer.weight, 0.0) for layer in layers}
        else:
            targets = self._targets(layers, n_m, weights)
        hessians = {}
        if opts.method == "obs":
            if context.data is None:
                raise OnnxShrinkError("prune(method=obs) needs calibration data (--calib) for the layer Hessians")
            hessians = _hessians(model, [l for l in layers if l.supports_obs], opts.max_samples, context, notes)
        for layer in layers:
            matrix = layer.matrix(weights)
            if layer.weight in hessians:
                pruned = sparsegpt(matrix, hessians[layer.weight], targets[layer.weight], n_m, opts.block, opts.damping)
                how = "obs"
            else:
                pruned = _magnitude(matrix, targets[layer.weight], n_m)
                how = "magnitude" + (" (obs needs a MatMul/Gemm with an observable input)" if opts.method == "obs" else "")
            layer.store(weights, pruned)
            notes.append(Note(layer.where, f"{how}: {np.mean(pruned == 0):.1%} zeros of {pruned.size:,} weights"))
        return PassOutput(model, notes)

    def _layers(self, model) -> tuple[list["Layer"], list[Note]]:
        opts = self.options
        weights = {t.name: t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
        pinned = {i.name for i in model.graph.input}
        layers, notes, seen = [], [], set()
        for node in model.graph.node:
            if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2:
                continue
            name = node.input[1]
            where = node.name or node.output[0]
            if name not in weights or name in pinned or name in seen:
                continue
            if node.op_type in opts.exclude or node.name in opts.exclude:
                notes.append(Note(where, "left dense: excluded"))
                continue
            tensor = weights[name]
            if int(np.prod(tensor.dims)) < opts.min_elements or len(tensor.dims) < 2:
                continue
            if node.op_type == "MatMul" and len(tensor.dims) != 2:
                notes.append(Note(where, "left dense: batched MatMul weight"))
                continue
            seen.add(name)
            layers.append(Layer(node, name))
        return layers, notes

    def _targets(self, layers, n_m, weights) -> dict[str, float]:
        """Sparsity per layer: the option, N:M's own, or what one global magnitude threshold leaves."""
        opts = self.options
        if n_m:
            return {layer.weight: 1 - n_m[0] / n_m[1] for layer in layers}
        if opts.scope == "layer":
            return {layer.weight: opts.sparsity for layer in layers}
        magnitudes = {layer.weight: np.abs(layer.matrix(weights)).ravel() for layer in layers}
        everything = np.concatenate(list(magnitudes.values()))
        rank = int(opts.sparsity * everything.size)
        if rank == 0:
            return {name: 0.0 for name in magnitudes}
        threshold = np.partition(everything, rank - 1)[rank - 1]
        return {name: float(np.mean(values <= threshold)) for name, values in magnitudes.items()}


@dataclass
class Layer:
    """A weighted node seen as a matrix [reduction K, outputs N]; N:M groups run along K."""

    node: onnx.NodeProto
    weight: str
    _tensor: onnx.TensorProto | None = None

    @property
    def where(self) -> str:
        return self.node.name or self.node.output[0]

    @property
    def supports_obs(self) -> bool:
        return self.node.op_type == "MatMul" or (self.node.op_type == "Gemm" and not attribute(self.node, "transA", 0))

    def matrix(self, weights) -> np.ndarray:
        self._tensor = weights[self.weight]
        array = numpy_helper.to_array(self._tensor).astype(np.float64)
        if self.node.op_type == "Conv":  # [O, I, kh, kw] -> [kh*kw*I, O]: input channels adjacent
            return array.transpose(2, 3, 1, 0).reshape(-1, array.shape[0]) if array.ndim == 4 else \
                array.reshape(array.shape[0], -1).T
        if self.node.op_type == "Gemm" and attribute(self.node, "transB", 0):
            return array.T
        return array

    def store(self, weights, matrix: np.ndarray) -> None:
        dims = tuple(self._tensor.dims)
        if self.node.op_type == "Conv":
            if len(dims) == 4:
                out, inp, kh, kw = dims
                array = matrix.reshape(kh, kw, inp, out).transpose(3, 2, 0, 1)
            else:
                array = matrix.T.reshape(dims)
        elif self.node.op_type == "Gemm" and attribute(self.node, "transB", 0):
            array = matrix.T
        else:
            array = matrix
        weights[self.weight].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), self.weight))


def _n_m(pattern: str) -> tuple[int, int] | None:
    if ":" not in pattern:
        return None
    n, m = (int(x) for x in pattern.split(":"))
    return n, m


def _magnitude(matrix: np.ndarray, sparsity: float, n_m) -> np.ndarray:
    magnitude = np.abs(matrix)
    if n_m:
        return matrix * _n_m_keep(magnitude, n_m)
    count = int(round(sparsity * matrix.size))
    if count == 0:
        return matrix.copy()
    cut = np.argpartition(magnitude.ravel(), count - 1)[:count]
    pruned = matrix.copy().ravel()
    pruned[cut] = 0
    return pruned.reshape(matrix.shape)


def _n_m_keep(score: np.ndarray, n_m) -> np.ndarray:
    """1 where a weight is among the N highest scores of its group of M along axis 0."""
    n, m = n_m
    rows, cols = score.shape
    if rows % m:
        return np.ones_like(score)  # the caller leaves such a layer dense
    grouped = score.reshape(rows // m, m, cols)
    order = np.argsort(-grouped, axis=1, kind="stable")
    keep = np.zeros_like(grouped)
    np.put_along_axis(keep, order[:, :n, :], 1.0, axis=1)
    return keep.reshape(rows, cols)


def sparsegpt(matrix: np.ndarray, hessian: np.ndarray, sparsity: float, n_m, block: int = 128,
              damping: float = 0.01) -> np.ndarray:
    """Prune `matrix` [K, N] to `sparsity` (or N:M along K) minimizing the change of x @ W for
    inputs x with Gram matrix `hessian` [K, K]."""
    w = matrix.T.astype(np.float64).copy()  # rows: outputs, columns: inputs (pruned in order)
    k = w.shape[1]
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h[np.diag_indices(k)] += damping * np.mean(np.diag(h))
    inverse = scipy.linalg.cho_solve(scipy.linalg.cho_factor(h), np.eye(k))
    u = scipy.linalg.cholesky(inverse, lower=False)  # H^-1 = U^T U: row j of U drives column j's update
    if n_m:
        block = max(n_m[1], block - block % n_m[1])
    for start in range(0, k, block):
        stop = min(start + block, k)
        chunk, u_chunk = w[:, start:stop].copy(), u[start:stop, start:stop]
        diag = np.diag(u_chunk)
        score = chunk ** 2 / diag[None, :] ** 2
        if n_m:
            pruned_mask = _n_m_keep(score.T, n_m).T == 0
        else:
            count = int(round(sparsity * score.size))
            pruned_mask = np.zeros(score.shape, bool)
            if count:
                pruned_mask.ravel()[np.argpartition(score.ravel(), count - 1)[:count]] = True
        errors = np.zeros_like(chunk)
        for j in range(stop - start):
            column = chunk[:, j]
            kept = np.where(pruned_mask[:, j], 0.0, column)
            error = (column - kept) / diag[j]
            chunk[:, j:] -= np.outer(error, u_chunk[j, j:])
            chunk[:, j] = kept
            errors[:, j] = error
        w[:, start:stop] = chunk
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return w.T


def _hessians(model, layers: list[Layer], max_samples: int, context: PassContext, notes: list[Note]) -> dict:
    """weight name -> sum x^T x over the calibration inputs of its layer (streamed)."""
    tappable = main_graph_tensors(model)
    weights = {t.name: t for t in model.graph.initializer}
    grams: dict[str, Gram] = {}
    owners: dict[str, str] = {}
    for layer in layers:
        source = layer.node.input[0]
        if source not in tappable:
            notes.append(Note(layer.where, "obs: the layer input is a constant; magnitude instead"))
            continue
        size = layer.matrix(weights).shape[0]
        if source in grams and grams[source].size != size:
            continue
        grams.setdefault(source, Gram(size))
        owners[layer.weight] = source
    samples = islice(iter(context.data), max_samples)
    for values in stream_tensors(model, sorted(grams), samples, context.progress):
        for name, gram in grams.items():
            value = np.asarray(values[name])
            if value.dtype != np.float32 or value.shape[-1] != gram.size:
                raise OnnxShrinkError(f"obs: input '{name}' has shape {value.shape}, not [..., {gram.size}]")
            gram.add(value.reshape(-1, gram.size))
    return {weight: grams[source].total() for weight, source in owners.items()}

