"""`prune`: zero the weights that matter least, so later stages can store or skip them.

* `method=magnitude` zeroes the smallest |w|; `method=obs` is one-shot Optimal Brain Surgeon in
  the SparseGPT form (Frantar & Alistarh 2023): each MatMul/Gemm layer's input Hessian
  H = sum x^T x is streamed from calibration data, weights are pruned column block by column
  block by the saliency w^2 / [chol(H^-1)]_jj^2, and each removed weight's error is spread over
  the columns not yet visited, so the layer's outputs move far less than the zeroed mass suggests.
  N:M groups are chosen when the solver reaches them, from weights that already carry the
  earlier columns' updates.
* A Conv of group 1 is a MatMul over its input patches (activations.conv_patch_rows), so obs
  prunes it with their Gram matrix as the Hessian, fit to its own dense outputs (the refit and
  bias match below are for MatMul/Gemm); a depthwise Conv has one Hessian per channel
  (sparsegpt_columns). At 50%: YOLOv8n's class-score cosine 0.135 with magnitude, 0.732 with obs;
  PP-OCRv4 det's text-mask IoU 0.724, 0.913 (measured). Other grouped Convs keep magnitude.
* obs prunes layer by layer in graph order (`sequential`): a layer's Hessian comes from the inputs
  X' its already pruned predecessors give it, and (`target=original`) the layer is fit to the
  unpruned model's outputs [X 1][W; b], not to its own outputs on X': its weights are first refit
  to argmin ||[X' 1][V; c] - [X 1][W; b]||^2 + r ||V - W||^2, then pruned, then its bias is set so
  that its mean output over the calibration tokens is the original one. The refit is where most of
  the gain is, and the ridge r is what keeps it from learning the calibration set: fit nearly
  exactly, MiniLM's sentence embeddings keep cosine 0.99 on the calibration sentences but 0.93 on
  held-out ones (0.943 with the default r). Cost: two calibration passes (this model cut after the
  layer input, and the original) per distinct layer input; `sequential=false` is one pass.
* Positions an `attention_mask` input marks as padding are left out of every statistic: they are
  no real input, and a calibration set padded to one length can be half padding.
* `pattern=unstructured` prunes anywhere; `N:M` keeps N of every M consecutive weights along the
  reduction axis (input features; input channels for Conv), the layout sparse kernels use;
  `channel` removes whole output channels (passes/prune_channels.py): a smaller dense model.
* `scope=layer` prunes each layer to `sparsity`; `scope=global` applies one magnitude threshold
  to all layers, so layers with many small weights give up more; `scope=auto` measures each
  layer's output drift over a sweep of sparsities (passes/sensitivity.py) and spends the
  parameter-weighted target where it hurts least.
* `zero_unread`: at high sparsity a layer can leave some of its input channels with no weight at
  all, and the weights computing those channels then change nothing (the digits MLP at 90% per
  layer: its 10-class head reads 60 of 128 units). prune_channels.unread_outputs follows the
  channels through the graph to find them; prune then starts again from the unpruned weights with
  them zeroed first, so their share of each layer's budget goes to channels still read (accuracy
  0.938 -> 0.971), and zeroes what the second pass leaves unread, which is exact.

Zeros stay stored densely here, so that reconstruct, quantization or clustering read ordinary
weights afterwards; `store-sparse` is what makes the file small.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice, repeat

import numpy as np
import onnx
import scipy.linalg
from onnx import TensorProto, numpy_helper

from onnxshrink.activations import (Gram, conv_input_grams, main_graph_tensors, patch_kind, stream_tensors,
                                   upstream_model)
from onnxshrink.errors import OnnxShrinkError, UsageError
from onnxshrink.graph import attribute, constants_to_initializers, layer_bias, tensor_reads
from onnxshrink.io import load
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
                                          "weight updates from calibration data (MatMul/Gemm, Conv of group 1 or "
                                          "depthwise)",
                             choices=("magnitude", "obs"))
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
        damping: float = option(0.1, "obs: added to the Hessian diagonal, relative to its mean (a few hundred "
                                     "sentences or images under-sample it; 0.01 fits them too closely)", low=0)
        block: int = option(128, "obs: columns pruned and compensated together", low=8)
        sequential: bool = option(True, "obs: prune in graph order, each layer from the inputs its already pruned "
                                        "predecessors give it (one calibration pass per layer input; false: one "
                                        "pass on the unpruned model, faster)")
        target: str = option("original", "obs: original: fit each layer to the unpruned model's outputs (weights "
                                         "refit to undo earlier layers' drift, bias matched; with sequential=false "
                                         "only the bias); layer: to its own dense outputs on the same inputs",
                             choices=("original", "layer"))
        ridge: float = option(1.0, "obs, target=original: how strongly the refit stays near the original weights, "
                                   "relative to the mean input energy (small values fit the calibration data "
                                   "and generalize worse)", low=0)
        zero_unread: bool = option(True, "also zero the weights computing output channels that no remaining weight "
                                         "reads (exact; at high sparsity a tiny head leaves many such channels)")

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
        obs = opts.method == "obs"
        if obs and context.data is None:
            raise OnnxShrinkError("prune(method=obs) needs calibration data (--calib) for the layer Hessians")
        original = load(model) if obs and opts.target == "original" and opts.sequential else None
        respend = opts.zero_unread and not n_m  # (N:M fixes every group's count: nothing to hand on)
        unpruned = {t.name: t.SerializeToString() for t in model.graph.initializer} if respend else {}
        done = self._prune_all(model, original, layers, targets, n_m, context, {})
        if respend:
            from .prune_channels import unread_outputs

            unread = {name: mask for name, (mask, _) in unread_outputs(model, opts.exclude).items()
                      if name in targets and mask.any()}
            if unread:
                # Prune again from the unpruned weights with those channels zeroed first, so their
                # share of each layer's budget goes to the channels still read. One round: the digits
                # MLP at 90% per layer keeps accuracy 0.971 instead of 0.938; further rounds only
                # found more channels to drop (0.950, 0.942).
                for tensor in model.graph.initializer:
                    tensor.ParseFromString(unpruned[tensor.name])
                done = self._prune_all(model, original, layers, targets, n_m, context, unread)
                for name, mask in unread.items():
                    done[name] += f" (second pass: {int(mask.sum())} output channels left unread by the first " \
                                  f"gave up their share)"
        notes += [Note(layer.where, done[layer.weight]) for layer in layers]
        if opts.zero_unread:
            from .prune_channels import zero_unread_outputs

            notes += zero_unread_outputs(model, opts.exclude)
        return PassOutput(model, notes)

    def _prune_all(self, model, original, layers, targets, n_m, context, unread: dict) -> dict[str, str]:
        """Prune every layer to its target; `unread` (weight name -> mask of output channels) are zeroed
        first and count towards it. Weight name -> what was done."""
        obs = self.options.method == "obs"
        weights = {t.name: t for t in model.graph.initializer}
        done = {}
        # Magnitude layers first: they need no data, and the obs layers then see the inputs they leave.
        for layer in layers:
            if not (obs and layer.supports_obs):
                matrix = _without(layer.matrix(weights), unread.get(layer.weight))
                why = " (obs needs a MatMul/Gemm or a Conv of group 1 or depthwise)" if obs else ""
                done[layer.weight] = "magnitude" + why + _store_magnitude(layer, weights, matrix, targets, n_m)
        if obs:
            done |= self._obs(model, original, [l for l in layers if l.supports_obs], targets, n_m, context, unread)
        return done

    def _obs(self, model, original, layers, targets, n_m, context, unread: dict) -> dict[str, str]:
        """SparseGPT on `layers`, grouped by input tensor, in graph order; weight name -> what was done."""
        opts = self.options
        weights = {t.name: t for t in model.graph.initializer}
        tappable, reads = main_graph_tensors(model), tensor_reads(model.graph)
        done, stages = {}, {}
        for layer in layers:
            if layer.node.input[0] in tappable:
                stages.setdefault(layer.node.input[0], []).append(layer)
            else:
                matrix = _without(layer.matrix(weights), unread.get(layer.weight))
                done[layer.weight] = "magnitude (obs: the layer input is a constant)" + \
                    _store_magnitude(layer, weights, matrix, targets, n_m)
        convs = {source: [l for l in group if l.node.op_type == "Conv"] for source, group in stages.items()}
        stages = {source: [l for l in group if l.node.op_type != "Conv"] for source, group in stages.items()}
        sizes = {source: group[0].matrix(weights).shape[0] for source, group in stages.items() if group}
        if sizes and not opts.sequential:
            grams = _input_grams(model, None, sizes, opts.max_samples, context)
        patch_grams = self._patch_grams(model, [l for group in convs.values() for l in group], context) \
            if not opts.sequential else {}
        for source, group in stages.items():
            if opts.sequential and convs[source]:  # the model as pruned so far
                patch_grams = self._patch_grams(model, convs[source], context)
            for layer in convs[source]:
                done[layer.weight] = self._obs_conv(layer, weights, patch_grams.get(layer.weight), targets, n_m,
                                                    unread.get(layer.weight))
            if not group:
                continue
            if opts.sequential:  # the model as pruned so far, and the original, on the same samples
                grams = _input_grams(model, original, {source: sizes[source]}, opts.max_samples, context)
            inner, cross = grams[source]
            cross = inner if cross is None else cross  # one pass: the inputs are the original ones
            for layer in group:
                matrix = layer.matrix(weights)
                bias = _bias(model.graph, layer.node, matrix.shape[1], weights, reads) \
                    if opts.target == "original" else None
                bias_values = numpy_helper.to_array(weights[bias]).astype(np.float64) if bias else None
                goal = _refit(matrix, bias_values, inner, cross, opts.ridge) if original is not None else matrix
                goal = _without(goal, unread.get(layer.weight))
                pruned = sparsegpt(goal, inner[:-1, :-1], targets[layer.weight], n_m, opts.block, opts.damping)
                layer.store(weights, pruned)
                done[layer.weight] = "obs" + _zeros(pruned)
                if bias:
                    matched = _matched_bias(matrix, bias_values, pruned, inner, cross)
                    weights[bias].CopyFrom(numpy_helper.from_array(matched.astype(np.float32), bias))
                    done[layer.weight] += f"; bias '{bias}' refit"
        return done

    def _patch_grams(self, model, layers: list["Layer"], context) -> dict[str, np.ndarray]:
        """weight name -> Gram matrix of its Conv's input patches over the calibration samples."""
        if not layers:
            return {}
        return conv_input_grams(model, [l.node for l in layers], context.data, self.options.max_samples,
                                context.progress)

    def _obs_conv(self, layer: "Layer", weights, gram: np.ndarray | None, targets, n_m, unread) -> str:
        """SparseGPT on a Conv with its patch Hessian, fit to its own dense outputs (no refit or bias
        match: those need the original model's patches too). Magnitude where the input could not
        be unfolded. `unread` output channels are zeroed first."""
        matrix = _without(layer.matrix(weights), unread)
        if gram is None or len(weights[layer.weight].dims) != 4:
            return "magnitude (obs: the Conv input could not be unfolded into patches)" + \
                _store_magnitude(layer, weights, matrix, targets, n_m)
        if gram.ndim == 3 and n_m:  # sparsegpt_columns chooses zeros over the whole layer, not per group
            return "magnitude (obs: N:M on a depthwise Conv)" + _store_magnitude(layer, weights, matrix, targets, n_m)
        if gram.ndim == 3:  # depthwise: output o reads input channel o // (outputs per channel)
            per_channel = matrix.shape[1] // gram.shape[0]
            hessians = gram[np.arange(matrix.shape[1]) // per_channel]
            pruned = sparsegpt_columns(matrix, hessians, targets[layer.weight], self.options.damping)
            layer.store(weights, pruned)
            return "obs (Hessians of each channel's input patches)" + _zeros(pruned)
        order = layer.patch_order()
        pruned = sparsegpt(matrix, gram[np.ix_(order, order)], targets[layer.weight], n_m, self.options.block,
                           self.options.damping)
        layer.store(weights, pruned)
        return "obs (Hessian of the input patches)" + _zeros(pruned)

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
            layers.append(Layer(node, name, dims=tuple(tensor.dims)))
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
    dims: tuple = ()

    @property
    def where(self) -> str:
        return self.node.name or self.node.output[0]

    @property
    def supports_obs(self) -> bool:
        if self.node.op_type == "Conv":  # through its input patches (activations.conv_input_grams)
            return patch_kind(self.node, list(self.dims)) is not None
        return self.node.op_type == "MatMul" or (self.node.op_type == "Gemm" and not attribute(self.node, "transA", 0))

    def patch_order(self) -> np.ndarray:
        """For a Conv: the patch position (C, kh, kw order) of each row of `matrix` ((kh, kw, C) order)."""
        _, channels, kh, kw = self._tensor.dims
        return np.arange(channels * kh * kw).reshape(channels, kh, kw).transpose(1, 2, 0).reshape(-1)

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


def _zeros(pruned: np.ndarray) -> str:
    return f": {np.mean(pruned == 0):.1%} zeros of {pruned.size:,} weights"


def _store_magnitude(layer: "Layer", weights: dict, matrix: np.ndarray, targets: dict, n_m) -> str:
    """Magnitude-prune `matrix` (the layer's weights as it will store them) to the layer's target and
    store it; the note on its zeros."""
    pruned = _magnitude(matrix, targets[layer.weight], n_m)
    layer.store(weights, pruned)
    return _zeros(pruned)


def _without(matrix: np.ndarray, outputs: np.ndarray | None) -> np.ndarray:
    """`matrix` [K, N] with the columns of `outputs` (a mask over N) zeroed, so pruning counts them
    first and spends the rest of the layer's budget elsewhere."""
    if outputs is None:
        return matrix
    matrix = matrix.copy()
    matrix[:, outputs] = 0
    return matrix


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
              damping: float = 0.1) -> np.ndarray:
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
        pruned_mask = np.zeros(chunk.shape, bool)
        if not n_m:
            score = chunk ** 2 / diag[None, :] ** 2
            count = int(round(sparsity * score.size))
            if count:
                pruned_mask.ravel()[np.argpartition(score.ravel(), count - 1)[:count]] = True
        errors = np.zeros_like(chunk)
        for j in range(stop - start):
            if n_m and j % n_m[1] == 0:  # this group's survivors, from weights the columns before it updated
                group = slice(j, j + n_m[1])
                score = chunk[:, group] ** 2 / diag[None, group] ** 2
                weakest = np.argsort(score, axis=1, kind="stable")[:, :n_m[1] - n_m[0]]
                np.put_along_axis(pruned_mask[:, group], weakest, True, axis=1)
            column = chunk[:, j]
            kept = np.where(pruned_mask[:, j], 0.0, column)
            error = (column - kept) / diag[j]
            chunk[:, j:] -= np.outer(error, u_chunk[j, j:])
            chunk[:, j] = kept
            errors[:, j] = error
        w[:, start:stop] = chunk
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return w.T


def sparsegpt_columns(matrix: np.ndarray, hessians: np.ndarray, sparsity: float, damping: float = 0.1) -> np.ndarray:
    """sparsegpt for a matrix [K, N] whose every column has its own input Hessian hessians[n] [K, K]
    (a depthwise Conv: K taps of one channel): the weights to zero are the lowest saliencies
    w^2 / [chol(H^-1)]_jj^2 over the whole matrix, so the layer gets exactly `sparsity`, and each
    removed weight's error is spread over its own column's later taps."""
    k, n = matrix.shape
    w = matrix.T.astype(np.float64).copy()  # [N, K]
    h = hessians.astype(np.float64).copy()
    diagonal = np.einsum("nkk->nk", h)
    dead = diagonal == 0
    diagonal[dead] = 1.0
    w[dead] = 0.0
    diagonal += damping * diagonal.mean(axis=1, keepdims=True)
    inverse = np.linalg.inv(h)
    u = np.linalg.cholesky(inverse).transpose(0, 2, 1)  # H^-1 = U^T U, U upper
    d = np.einsum("nkk->nk", u)
    count = int(round(sparsity * w.size))
    mask = np.zeros(w.shape, bool)
    if count:
        mask.ravel()[np.argpartition((w ** 2 / d ** 2).ravel(), count - 1)[:count]] = True
    for j in range(k):
        kept = np.where(mask[:, j], 0.0, w[:, j])
        error = (w[:, j] - kept) / d[:, j]
        w[:, j:] -= error[:, None] * u[:, j, j:]
        w[:, j] = kept
    return w.T


def _refit(matrix: np.ndarray, bias: np.ndarray | None, inner: np.ndarray, cross: np.ndarray,
           ridge: float) -> np.ndarray:
    """The weights V [K, N] for which the layer, on its current inputs X', comes closest to its
    original outputs [X 1] [W; b]: argmin ||[X' 1][V; c] - [X 1][W; b]||^2 + r ||V - W||^2.

    `inner` = [X' 1]^T [X' 1] and `cross` = [X' 1]^T [X 1], summed over the calibration tokens.
    r = ridge * the mean input energy. The intercept c is solved for but not returned: the bias
    is matched after pruning (_matched_bias)."""
    k = matrix.shape[0]
    # A floor keeps the system solvable for inputs the calibration data never excites.
    penalty = np.full(k + 1, max(ridge, 1e-9) * np.mean(np.diag(inner)[:k]))
    if bias is None:  # no intercept to solve for: the original outputs carry none
        target, penalty = matrix, penalty[:k]
        inner, cross = inner[:k, :k], cross[:k, :k]
    else:
        target = np.vstack([matrix, bias[None, :]])
        penalty[k] = 0
    system = inner + np.diag(penalty)
    return scipy.linalg.solve(system, cross @ target + penalty[:, None] * target, assume_a="pos")[:k]


def _matched_bias(matrix, bias, pruned, inner, cross) -> np.ndarray:
    """The bias that gives the pruned layer, on its current inputs, the original mean output over
    the calibration tokens: pruning shifts that mean, and the later layers see the shift in every token."""
    k = matrix.shape[0]
    count = inner[k, k]
    return bias + (cross[k, :k] @ matrix - inner[k, :k] @ pruned) / count


def _bias(graph, node, outputs: int, weights, reads) -> str | None:
    """The layer's own float bias [outputs] (graph.layer_bias), where its weight is unscaled (Gemm alpha 1)."""
    if node.op_type == "Gemm" and attribute(node, "alpha", 1.0) != 1.0:
        return None
    name = layer_bias(graph, node, weights, reads)
    if name is None or weights[name].data_type != TensorProto.FLOAT or tuple(weights[name].dims) != (outputs,):
        return None
    return name


def _input_grams(model, original, sizes: dict[str, int], max_samples: int, context: PassContext) -> dict:
    """tensor name -> ([x 1]^T [x 1] summed over the tokens x of that tensor in `model`, and
    [x 1]^T [x0 1] with x0 the same tensor in `original` on the same sample, or None without one)."""
    names = list(sizes)
    inner = {name: Gram(sizes[name] + 1) for name in names}
    cross = {name: Gram(sizes[name] + 1, sizes[name] + 1) for name in names} if original is not None else {}

    def samples():
        return islice(iter(context.data), max_samples)

    if original is None:
        streams = zip(stream_tensors(upstream_model(model, names), names, samples(), context.progress), repeat(None))
    else:  # half the cores each: two sessions that both claim every core spin against each other
        threads = max(1, (os.cpu_count() or 2) // 2)
        streams = _side_by_side(
            stream_tensors(upstream_model(model, names), names, samples(), context.progress, threads=threads),
            stream_tensors(upstream_model(original, names), names, samples(), threads=threads))
    for feed, (values, originals) in zip(samples(), streams):
        for name in names:
            rows = _token_rows(values[name], feed, sizes[name], name)
            inner[name].add(rows)
            if originals is not None:
                cross[name].add(rows, _token_rows(originals[name], feed, sizes[name], name))
    return {name: (inner[name].total(), cross[name].total() if cross else None) for name in names}


def _side_by_side(*streams):
    """Advance the streams together, each in its own thread (onnxruntime lets go of the GIL while it runs)."""
    with ThreadPoolExecutor(len(streams)) as runner:
        while True:
            values = list(runner.map(lambda stream: next(stream, None), streams))
            if any(value is None for value in values):
                return
            yield values


def _token_rows(value, feed, size: int, name: str) -> np.ndarray:
    """An activation as rows [tokens, size] plus a ones column. Where the feed has an
    attention_mask shaped like the activation's leading [batch, sequence] axes, padded positions
    are dropped: they are no real input, and calibration sets padded to one length are mostly padding."""
    value = np.asarray(value)
    if value.dtype != np.float32 or value.shape[-1] != size:
        raise OnnxShrinkError(f"obs: input '{name}' has shape {value.shape}, not [..., {size}]")
    mask = feed.get("attention_mask")
    if mask is not None and value.ndim == 3 and np.shape(mask) == value.shape[:2]:
        value = value[np.asarray(mask) != 0]
    rows = value.reshape(-1, size)
    return np.hstack([rows, np.ones((len(rows), 1), rows.dtype)])


def _hessians(model, layers: list[Layer], max_samples: int, context: PassContext, notes: list[Note]) -> dict:
    """weight name -> sum x^T x over the calibration inputs of its layer in `model` as it is (one pass)."""
    tappable = main_graph_tensors(model)
    weights = {t.name: t for t in model.graph.initializer}
    sizes, owners = {}, {}
    for layer in layers:
        source = layer.node.input[0]
        if source not in tappable:
            notes.append(Note(layer.where, "obs: the layer input is a constant; magnitude instead"))
            continue
        sizes[source] = layer.matrix(weights).shape[0]
        owners[layer.weight] = source
    grams = _input_grams(model, None, sizes, max_samples, context)
    return {weight: grams[source][0][:-1, :-1] for weight, source in owners.items()}
