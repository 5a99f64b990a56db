"""`reconstruct`: refit compressed layers so their outputs match the original model's.

After pruning (or any pass that changes weights in place), a layer sees inputs X' that differ
from the original X (earlier layers changed too) and computes with W' instead of W. For each
MatMul, Gemm, 2-D Conv and ConvTranspose whose weights differ from the same node's in the pipeline's input
model (nodes are matched by name), this solves

    min_W' || [X' 1] W' - Y ||^2   over the entries W' already has nonzero (zeros stay zero)

where Y is that node's output in the original model, and the bias row, where the layer has
one, is refit too. It is fine-tuning done per layer in closed form, the classic reconstruction
step of channel pruning, from sums streamed over calibration data in float64. A ridge pulls
the fit towards the compressed weights; its strength is chosen per layer on held-out data (fit
on the even calibration samples, scored on the odd ones, and the other way round), and where
no ridge beats the compressed weights there, they stay. Layers with about as many unknowns as
equations (wide inputs at low resolution: a 3x3 Conv over 180 channels on a 10x10 map sees
1,600 windows in 16 images for 1,621 unknowns) otherwise fit the calibration images exactly
and fail on every other image.

* MatMul/Gemm: rows of X' are the layer's input vectors and Y = [X 1] W; three Gram matrices
  (X'^T X', X'^T X, X^T X) carry everything, one column of outputs solved at a time.
* Conv: rows of X' are the windows of the input that the output positions see (im2col), so the
  Gram X'^T X' has in/group * kh * kw + 1 rows for each group and X'^T Y a column per output
  channel. Grouped and depthwise Convs are fitted group by group. Only `max_positions` output
  positions per image, drawn at random with a fixed seed, enter the sums of a larger map: the
  large maps are the early, narrow layers, whose few unknowns need far fewer equations. A Conv
  without a bias gets one: a bias is what gives back the average that removed channels fed it.
* A MatMul/Gemm whose weight `cluster` rebuilds from a codebook: the codebook's values are the
  unknowns (each weight keeps its code), from the same three Grams (SharedDense). Per-channel
  codebooks give one small system per output column, solved as a batch.
* ConvTranspose: the same, seen as the stride-1 Conv with the flipped kernel that it is over its
  input with stride - 1 zeros inserted between neighbours.

Channel pruning leaves a node fewer output channels than the original's: it is fitted to the
original outputs of the channels it kept, which `prune_channels.kept_channels` recovers from
the weights. 1-D and 3-D convolutions, and a ConvTranspose sized by output_shape or auto_pad,
are left as they are, with a note.

Layers are refit in stages, in graph order. A stage holds the changed layers whose inputs
depend on no changed layer not yet refit, so each is fitted to the inputs its already refit
predecessors now give it; refitting all from one pass over the data leaves each fitted to
inputs that no longer occur (on the digits MLP at 90% sparsity that costs more accuracy than
reconstruction wins). Each stage streams the calibration data once through the current model
and once through the original, each cut down to the nodes the stage observes.

Then, with `network=auto`, network_refit trains the same unknowns together against the original
model's outputs, where it can differentiate every op on the way (MLPs): layer by layer, no fit can
undo an error that only a later layer could absorb.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import onnx
import scipy.linalg
from onnx import TensorProto, numpy_helper

from onnxshrink.activations import Gram, main_graph_tensors, stream_tensors, upstream_model
from onnxshrink.errors import OnnxShrinkError
from onnxshrink.graph import all_names, attribute, constant_tensors, constants_to_initializers, layer_bias, \
    outer_scope_names, subgraphs, tensor_reads, unique_name
from onnxshrink.options import PassOptions, option
from onnxshrink.pass_base import Note, Pass, PassContext, PassOutput
from onnxshrink.registry import register_pass

from .network_refit import refine
from .weight_sharing import column_normal_equations, shared_weight


_LAYERS = ("MatMul", "Gemm", "Conv", "ConvTranspose")


@register_pass("reconstruct")
class Reconstruct(Pass):
    summary = ("Least-squares refit of compressed MatMul/Gemm/Conv/ConvTranspose layers to the original model's "
               "outputs (zeros stay zero).")
    needs_data = True

    @dataclass(frozen=True)
    class Options(PassOptions):
        max_samples: int = option(128, "calibration samples streamed", low=1)
        damping: float = option(1e-4, "smallest ridge tried, relative to the mean input energy; ten times more, "
                                      "up to 10, are tried too, and held-out samples pick one", low=0)
        max_positions: int = option(1024, "Conv: output positions per image that enter the fit, drawn at random "
                                          "where a map has more; 0 takes them all", low=0)
        network: str = option("auto", "auto: then refine the refit layers together against the model's outputs by "
                                      "gradient descent, where every op on the way is one it differentiates (MLPs, "
                                      "transformer encoders; not Conv) and held-out samples confirm the gain; off: "
                                      "layer by layer only",
                              choices=("auto", "off"))
        steps: int = option(2000, "network refit: most gradient steps (held-out samples choose how many); a large "
                                     "model may need fewer to fit the work limit (its note says how many)", low=1)
        rate: float = option(0.03, "network refit: Adam step, relative to each tensor's RMS value", low=0)
        code_bits: float = option(0.01, "network refit of clustered weights: what a bit of code length costs when a "
                                        "weight is snapped to a codebook value, as a fraction of the mean square "
                                        "weight (0: the nearest value; more packs smaller)", low=0)
        network_samples: int = option(512, "network refit: calibration rows used (entries along the inputs' "
                                                   "first axis)", low=8)

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassOutput:
        if context.reference is None or context.data is None:
            raise OnnxShrinkError("reconstruct needs calibration data and the original model: run it in a pipeline "
                                  "after the pass that changed the weights, e.g. 'prune(sparsity=0.8),reconstruct'")
        constants_to_initializers(model.graph, {name for node in model.graph.node  # refit weights are written
                                                if node.op_type in _LAYERS for name in node.input[1:3]})  # as initializers
        layers, notes = _changed_layers(model, context.reference, self.options.max_positions)
        if not layers:
            return PassOutput(model, notes + [Note("(graph)", "no MatMul/Gemm/Conv/ConvTranspose weights differ from "
                                                              "the original model")])
        weights = {t.name: t for t in model.graph.initializer}
        taken = all_names(model)
        for stage in _stages(model, layers):
            _observe(model, context.reference, stage, context, self.options.max_samples)
            for layer in stage:
                before, after, how = layer.refit(model, weights, self.options.damping, taken)
                notes.append(Note(layer.where, f"output error {before:.3g} -> {after:.3g} of the original output "
                                               f"energy{how}"))
        if self.options.network == "auto":
            notes += refine(model, context.reference, layers, weights, context.data, context.data_is_real,
                            self.options.steps, self.options.rate, self.options.network_samples,
                            self.options.code_bits)
        return PassOutput(model, notes)


# --------------------------------------------------------------------------
# the least-squares problem and its fit
# --------------------------------------------------------------------------
FOLDS = 2  # calibration samples alternate between two halves, to choose the ridge on held-out data


@dataclass
class Problem:
    """min ||X w - Y||^2 for one layer as sums over each fold's samples, group by group:
    gram X^T X [fold, group, K, K], rhs X^T Y [fold, group, K, N], energy ||Y||^2 [fold]."""

    gram: np.ndarray
    rhs: np.ndarray
    energy: np.ndarray

    def error(self, w: np.ndarray, fold: int | None = None) -> float:
        """||X w - Y||^2 over one fold or all, `w` [group, K, N]."""
        folds = slice(None) if fold is None else slice(fold, fold + 1)
        gram, rhs = self.gram[folds].sum(axis=0), self.rhs[folds].sum(axis=0)
        return float(np.sum(w * (gram @ w)) - 2 * np.sum(w * rhs) + np.sum(self.energy[folds]))


def ridges(damping: float) -> list[float]:
    """The ridges tried, relative to the mean input energy: `damping` and the powers of ten above it up to 10."""
    return [damping] + [10.0 ** k for k in range(-4, 2) if 10.0 ** k > damping]


@dataclass
class Fit:
    weights: np.ndarray  # [group, K, N]; `start` itself where the compressed weights stay
    before: float  # ||X w - Y||^2 / ||Y||^2 on all calibration samples, compressed weights
    after: float  # the same, refit weights
    how: str  # the ridge chosen, or why the compressed weights stay

    @property
    def changed(self) -> bool:
        return self.after < self.before


def fit(problem: Problem, start: np.ndarray, support: np.ndarray, damping: float) -> Fit:
    """Refit `start` [group, K, N], the compressed weights, never worse on the calibration samples.

    The fit is a ridge regression that pulls towards `start`, the compressed weights:
    (X^T X + r I) w = X^T Y + r start, over each column's `support` (the rest stays zero). The
    ridge r is the one whose fit on one half of the samples best predicts the other half (the
    halves swapped and the two errors added); keeping `start` competes too. Deep layers see few
    positions per image and, with wide inputs, have about as many unknowns as equations: there
    the smallest ridge fits the calibration samples nearly exactly and fails on anything else.
    Held-out scores use the solve without the zero pattern, which is much cheaper and ranks the
    ridges alike."""
    energy = max(float(problem.energy.sum()), 1e-30)
    before = problem.error(start) / energy
    if before < 1e-9:  # e.g. a layer that only lost output channels, on unchanged inputs
        return Fit(start, before, before, "kept: it already matches")
    tried = ridges(damping)
    if np.all(problem.energy > 0):
        scores = [sum(problem.error(_solve(problem.gram[a], problem.rhs[a], start, None, ridge), b)
                      for a, b in ((0, 1), (1, 0))) for ridge in tried]
        if min(scores) >= sum(problem.error(start, b) for b in (0, 1)):
            return Fit(start, before, before, "kept: no ridge predicts held-out samples better")
        ridge = tried[int(np.argmin(scores))]
    else:  # one sample: nothing to hold out
        ridge = damping
    solved = _solve(problem.gram.sum(axis=0), problem.rhs.sum(axis=0), start, support, ridge)
    after = problem.error(solved) / energy
    if after >= before:
        return Fit(start, before, before, "kept: the refit was no better")
    return Fit(solved, before, after, f"ridge {ridge:g}")


def _solve(gram: np.ndarray, rhs: np.ndarray, start: np.ndarray, support: np.ndarray | None,
           ridge: float) -> np.ndarray:
    """(gram + r I) w = rhs + r start per group, over `support` (None: every entry is free)."""
    scale = (ridge + 1e-12) * np.mean(np.diagonal(gram, axis1=1, axis2=2), axis=1)  # the floor keeps it definite
    if support is None or support.all():
        system = gram + scale[:, None, None] * np.eye(gram.shape[1])
        right = rhs + scale[:, None, None] * start
        if len(gram) == 1:
            return scipy.linalg.solve(system[0], right[0], assume_a="pos")[None]
        return np.linalg.solve(system, right)
    solved = start.copy()
    for g in range(len(gram)):
        patterns, which = np.unique(support[g].T, axis=0, return_inverse=True)
        which = which.reshape(-1)
        for index, pattern in enumerate(patterns):
            free, columns = np.flatnonzero(pattern), np.flatnonzero(which == index)
            if free.size:
                block = gram[g][np.ix_(free, free)] + scale[g] * np.eye(free.size)
                right = rhs[g][np.ix_(free, columns)] + scale[g] * start[g][np.ix_(free, columns)]
                solved[g][np.ix_(free, columns)] = scipy.linalg.solve(block, right, assume_a="pos")
    return solved


# --------------------------------------------------------------------------
# MatMul / Gemm
# --------------------------------------------------------------------------
@dataclass(eq=False)
class Dense:
    node: onnx.NodeProto
    weight: str
    bias: str | None
    original_input: str
    original_weight: np.ndarray  # [K, N'], float64: the columns of the outputs this layer kept
    original_bias: np.ndarray | None
    transposed: bool  # Gemm transB: stored [N, K]
    inputs: int  # K' of the current weights
    sums: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return self.node.name or self.node.output[0]

    def taps(self) -> tuple[list[str], list[str]]:
        return [self.node.input[0]], [self.original_input]

    def observe(self, pool: dict) -> None:
        """Register the Gram matrices it needs: [x' 1] and [x 1] with each other and themselves
        (Y = [x 1] W enters through them); layers reading the same tensors share them."""
        now, then = ("current", self.node.input[0]), ("original", self.original_input)
        k_now, k_then = self.inputs + 1, self.original_weight.shape[0] + 1
        self.sums = {"inner": pool.setdefault(("inner", now), _InputGram(now, None, k_now)),
                     "cross": pool.setdefault(("cross", now, then), _InputGram(now, then, k_now, k_then)),
                     "outer": pool.setdefault(("outer", then), _InputGram(then, None, k_then))}

    def _folds(self, target: np.ndarray, biased: bool):
        """Per fold: (X'^T X', X'^T Y, ||Y||^2) for Y = [X 1] target, from the streamed Grams; the ones
        column (the bias's input) is kept only where a bias is fit."""
        for fold in range(FOLDS):
            inner, cross, outer = (self.sums[key].grams[fold].total() for key in ("inner", "cross", "outer"))
            if not biased:  # the Gram matrices carry a ones column either way; drop it
                inner, cross, outer = inner[:-1, :-1], cross[:-1, :-1], outer[:-1, :-1]
            yield inner, cross @ target, np.sum(target * (outer @ target))

    def refit(self, model, weights, damping, taken) -> tuple[float, float, str]:
        current = numpy_helper.to_array(weights[self.weight]).astype(np.float64)
        current = current.T if self.transposed else current
        biased = self.bias is not None
        target = _stack(self.original_weight, self.original_bias)  # [K(+1), N']
        start = _stack(current, numpy_helper.to_array(weights[self.bias]).astype(np.float64) if biased else None)
        grams, rhs, energy = [], [], []
        for inner, right, fold_energy in self._folds(target, biased):
            grams.append(inner[None])  # one group
            rhs.append(right[None])
            energy.append(fold_energy)
        support = start != 0
        if biased:  # a column left with no weight and no bias stays so (prune zeroes what nothing reads)
            support[-1] = support.any(axis=0)
        result = fit(Problem(np.stack(grams), np.stack(rhs), np.array(energy)), start[None], support[None], damping)
        if not result.changed:
            return result.before, result.after, f" ({result.how})"
        solved = result.weights
        matrix = solved[0, :-1] if biased else solved[0]
        stored = matrix.T if self.transposed else matrix
        weights[self.weight].CopyFrom(numpy_helper.from_array(stored.astype(np.float32), self.weight))
        if biased:
            weights[self.bias].CopyFrom(numpy_helper.from_array(solved[0, -1].astype(np.float32), self.bias))
        return result.before, result.after, f" ({result.how})"


@dataclass(eq=False)
class SharedDense(Dense):
    """A MatMul/Gemm whose weight `cluster` rebuilds from a codebook: the unknowns are the codebook's
    values (and the bias), W = sum_p c_p M_p with M_p marking the entries that read value p, so
    X W = sum_p c_p (X M_p) stays linear and its normal equations come from the same Gram sums:
    A_pq = sum(M_q * (X^T X) M_p), b_p = sum(M_p * X^T Y). Values that are exactly 0 (the code
    `cluster` keeps for pruned weights) stay 0."""

    codebook: str = ""
    positions: np.ndarray | None = None  # [K, N]: the codebook position each weight reads

    def refit(self, model, weights, damping, taken) -> tuple[float, float, str]:
        if _private_columns(self.positions):
            return self._refit_by_column(weights, damping)
        values = numpy_helper.to_array(weights[self.codebook]).astype(np.float64)
        flat = values.reshape(-1)
        free = np.array([p for p in np.unique(self.positions) if flat[p] != 0], dtype=np.int64)
        masks = [(self.positions == p).astype(np.float64) for p in free]
        biased = self.bias is not None
        k, n = self.positions.shape
        target = _stack(self.original_weight, self.original_bias)
        grams, rhs, energy = [], [], []
        for inner, right, fold_energy in self._folds(target, biased):
            spread = [inner[:k, :k] @ m for m in masks]
            a = np.array([[np.sum(m * s) for m in masks] for s in spread])
            b = np.array([np.sum(m * right[:k]) for m in masks])
            if biased:
                mixed = np.stack([inner[k, :k] @ m for m in masks])  # [values, N]: sum x against each column
                a = np.block([[a, mixed], [mixed.T, inner[k, k] * np.eye(n)]])
                b = np.concatenate([b, right[k]])
            grams.append(a[None])
            rhs.append(b[None, :, None])
            energy.append(fold_energy)
        start = flat[free]
        support = np.ones(start.size, bool)
        if biased:
            bias = numpy_helper.to_array(weights[self.bias]).astype(np.float64).reshape(-1)
            start = np.concatenate([start, bias])
            support = np.concatenate([support, _live_columns(flat, self.positions, bias)])
        result = fit(Problem(np.stack(grams), np.stack(rhs), np.array(energy)), start[None, :, None],
                     support[None, :, None], damping)
        how = f" ({len(free)} codebook values: {result.how})"
        if not result.changed:
            return result.before, result.after, how
        solved = result.weights[0, :, 0]
        flat = flat.copy()
        flat[free] = solved[:len(free)]
        stored = _as_stored(flat.reshape(values.shape), weights[self.codebook])
        weights[self.codebook].CopyFrom(numpy_helper.from_array(stored, self.codebook))
        if biased:
            weights[self.bias].CopyFrom(numpy_helper.from_array(solved[len(free):].astype(np.float32), self.bias))
        return result.before, result.after, how

    def _refit_by_column(self, weights, damping) -> tuple[float, float, str]:
        """Per-channel codebooks: no value is read by two output columns, so the normal equations
        split into one small system per column (its own values and bias), solved as a batch."""
        values = numpy_helper.to_array(weights[self.codebook]).astype(np.float64)
        flat = values.reshape(-1)
        k, n = self.positions.shape
        columns = [np.unique(self.positions[:, c], return_inverse=True) for c in range(n)]
        width = max(len(used) for used, _ in columns)
        local = np.stack([codes.reshape(-1) for _, codes in columns], axis=1)  # [K, N]: position within the column
        start = np.zeros((n, width))
        free = np.zeros((n, width), bool)
        for c, (used, _) in enumerate(columns):
            start[c, :len(used)] = flat[used]
            free[c, :len(used)] = flat[used] != 0  # the 0.0 that `cluster` keeps for pruned weights stays
        biased = self.bias is not None
        target = _stack(self.original_weight, self.original_bias)
        grams, rhs, energy = [], [], []
        for inner, right, fold_energy in self._folds(target, biased):
            a, b = column_normal_equations(inner[:k, :k], right[:k], local, width)
            if biased:
                mixed = np.stack([np.bincount(local[:, c], weights=inner[:k, k], minlength=width) for c in range(n)])
                a = np.concatenate([np.concatenate([a, mixed[:, :, None]], axis=2),
                                    np.concatenate([mixed[:, None, :], np.full((n, 1, 1), inner[k, k])], axis=2)],
                                   axis=1)
                b = np.concatenate([b, right[k][:, None]], axis=1)
            grams.append(a)
            rhs.append(b[:, :, None])
            energy.append(fold_energy)
        support = free
        if biased:
            bias = numpy_helper.to_array(weights[self.bias]).astype(np.float64).reshape(-1)
            start = np.concatenate([start, bias[:, None]], axis=1)
            support = np.concatenate([free, _live_columns(flat, self.positions, bias)[:, None]], axis=1)
        result = fit(Problem(np.stack(grams), np.stack(rhs), np.array(energy)), start[:, :, None],
                     support[:, :, None], damping)
        how = f" ({int(free.sum())} codebook values in {n} per-column systems: {result.how})"
        if not result.changed:
            return result.before, result.after, how
        solved = result.weights[:, :, 0]
        flat = flat.copy()
        for c, (used, _) in enumerate(columns):
            flat[used] = np.where(free[c, :len(used)], solved[c, :len(used)], flat[used])
        stored = _as_stored(flat.reshape(values.shape), weights[self.codebook])
        weights[self.codebook].CopyFrom(numpy_helper.from_array(stored, self.codebook))
        if biased:
            weights[self.bias].CopyFrom(numpy_helper.from_array(solved[:, -1].astype(np.float32), self.bias))
        return result.before, result.after, how


def _live_columns(flat: np.ndarray, positions: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Output columns with a nonzero weight or bias: the others, zeroed by prune because nothing reads
    them, keep their zero bias instead of being refit to the original's mean output."""
    return (flat[positions] != 0).any(axis=0) | (bias != 0)


def _as_stored(values: np.ndarray, codebook: onnx.TensorProto) -> np.ndarray:
    """Refit values in the codebook's own type (cluster stores grouped codebooks as float16)."""
    return values.astype(np.float16 if codebook.data_type == TensorProto.FLOAT16 else np.float32)


def _private_columns(positions: np.ndarray) -> bool:
    """Whether each codebook value is read by one output column only (per-channel codebooks)."""
    n = positions.shape[1]
    owner = np.full(int(positions.max()) + 1, -1)
    owner[positions] = np.broadcast_to(np.arange(n), positions.shape)
    return bool(np.all(owner[positions] == np.arange(n)[None, :])) and n > 1


# A clustered layer with shared codebooks needs one K x K x N product per codebook value.
_MAX_SHARED_VALUES = 256


@dataclass(eq=False)
class _InputGram:
    """sum [x 1]^T [y 1] over each fold's calibration samples; x and y are ("current"|"original", tensor name)."""

    left: tuple[str, str]
    right: tuple[str, str] | None
    size: int
    other_size: int | None = None
    grams: list = field(init=False)

    def __post_init__(self):
        self.grams = [Gram(self.size, self.other_size) for _ in range(FOLDS)]

    def add(self, values: dict, sample: int) -> None:
        rows = _with_ones(values[self.left], self.size)
        other = None if self.right is None else _with_ones(values[self.right], self.other_size)
        self.grams[sample % FOLDS].add(rows, other)


def _with_ones(value, size: int) -> np.ndarray:
    rows = np.asarray(value, dtype=np.float64).reshape(-1, size - 1)
    return np.hstack([rows, np.ones((rows.shape[0], 1))])


def _stack(matrix: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    return matrix if bias is None else np.vstack([matrix, bias[None, :]])


# --------------------------------------------------------------------------
# Conv
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Geometry:
    """How a 2-D Conv or ConvTranspose reads its input: what makes two layers see the same windows."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    auto_pad: str
    group: int
    transposed: bool = False  # ConvTranspose
    output_padding: tuple[int, int] = (0, 0)

    @classmethod
    def of(cls, node: onnx.NodeProto, kernel) -> "Geometry":
        auto_pad = attribute(node, "auto_pad", b"NOTSET")
        return cls(tuple(kernel), tuple(attribute(node, "strides", [1, 1])), tuple(attribute(node, "dilations", [1, 1])),
                   tuple(attribute(node, "pads", [0, 0, 0, 0])),
                   auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad, attribute(node, "group", 1),
                   node.op_type == "ConvTranspose", tuple(attribute(node, "output_padding", [0, 0])))

    def padding(self, height: int, width: int) -> tuple[int, int, int, int]:
        if self.transposed:  # as a stride-1 Conv over the zero-inserted input (auto_pad is refused earlier)
            (kh, kw), (dh, dw), (top, left, bottom, right) = self.kernel, self.dilations, self.pads
            return ((kh - 1) * dh - top, (kw - 1) * dw - left, (kh - 1) * dh - bottom + self.output_padding[0],
                    (kw - 1) * dw - right + self.output_padding[1])
        if self.auto_pad in ("NOTSET", "VALID"):
            return self.pads if self.auto_pad == "NOTSET" else (0, 0, 0, 0)
        begin, end = [], []
        for size, k, s, d in zip((height, width), self.kernel, self.strides, self.dilations):
            total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
            first = total // 2 if self.auto_pad == "SAME_UPPER" else total - total // 2
            begin.append(first)
            end.append(total - first)
        return begin[0], begin[1], end[0], end[1]

    def patches(self, x: np.ndarray, max_positions: int, seed, out_shape=None) -> tuple[np.ndarray, np.ndarray]:
        """The [C, n, kh, kw] input windows of `x` [C, H, W] at n output positions (drawn at random,
        seeded, where there are more than `max_positions`; 0 takes them all), and those positions.
        `out_shape` (h, w) defaults to what the padded input gives; a ConvTranspose is read as a
        stride-1 Conv with the flipped kernel over the zero-inserted input."""
        strides = self.strides
        if self.transposed:
            spread = np.zeros((x.shape[0], (x.shape[1] - 1) * strides[0] + 1, (x.shape[2] - 1) * strides[1] + 1), x.dtype)
            spread[:, ::strides[0], ::strides[1]] = x
            x, strides = spread, (1, 1)
        (kh, kw), (dh, dw) = self.kernel, self.dilations
        top, left, bottom, right = self.padding(*x.shape[1:])
        padded = np.pad(x, ((0, 0), (max(top, 0), max(bottom, 0)), (max(left, 0), max(right, 0))))
        padded = padded[:, max(-top, 0):padded.shape[1] - max(-bottom, 0), max(-left, 0):padded.shape[2] - max(-right, 0)]
        if out_shape is None:
            out_shape = ((padded.shape[1] - (kh - 1) * dh - 1) // strides[0] + 1,
                         (padded.shape[2] - (kw - 1) * dw - 1) // strides[1] + 1)
        out_h, out_w = out_shape
        positions = np.arange(out_h * out_w)
        if max_positions and positions.size > max_positions:
            positions = np.sort(np.random.default_rng(seed).choice(positions.size, max_positions, replace=False))
        oy, ox = np.divmod(positions, out_w)
        iy = oy[:, None] * strides[0] + np.arange(kh) * dh  # [n, kh]
        ix = ox[:, None] * strides[1] + np.arange(kw) * dw  # [n, kw]
        return padded[:, iy[:, :, None], ix[:, None, :]], positions


@dataclass(eq=False)
class _Windows:
    """Per fold and group, sum P^T P over the input windows P (with a ones column) at the sampled
    output positions, and for each target (an original output, restricted to some channels)
    sum P^T Y and sum Y^2. Convs reading one input through one geometry share it."""

    input: str
    geometry: Geometry
    max_positions: int
    gram: np.ndarray | None = None  # [fold, group, K+1, K+1]
    targets: dict = field(default_factory=dict)  # (output name, channels) -> [rhs [fold, group, K+1, O/group], energy [fold]]

    def target(self, output: str, channels: np.ndarray) -> tuple:
        key = (output, tuple(channels.tolist()))
        self.targets.setdefault(key, [None, np.zeros(FOLDS)])
        return key

    def add(self, values: dict, sample: int) -> None:
        fold = sample % FOLDS
        x = np.asarray(values[("current", self.input)])
        outputs = {key: np.asarray(values[("original", key[0])]) for key in self.targets}
        out_shape = next(iter(outputs.values())).shape[2:]
        for item in range(x.shape[0]):
            rows, positions = self.windows(x[item], out_shape, (sample, item))  # [group, n, K+1]
            if self.gram is None:
                self.gram = np.zeros((FOLDS, rows.shape[0], rows.shape[2], rows.shape[2]))
            self.gram[fold] += _inner(rows, rows)
            for key, y in outputs.items():
                picked = y[item][list(key[1])].reshape(len(key[1]), -1)[:, positions].astype(np.float64)  # [O', n]
                per_group = picked.reshape(self.geometry.group, -1, len(positions)).transpose(0, 2, 1)
                sums = self.targets[key]
                if sums[0] is None:
                    sums[0] = np.zeros((FOLDS, rows.shape[0], rows.shape[2], per_group.shape[2]))
                sums[0][fold] += _inner(rows, per_group)
                sums[1][fold] += float(np.sum(picked * picked))

    def windows(self, x: np.ndarray, out_shape, seed) -> tuple[np.ndarray, np.ndarray]:
        """[group, n, C/group * kh * kw + 1] windows of `x` [C, H, W] at n sampled output positions, and those positions."""
        g = self.geometry
        windows, positions = g.patches(x, self.max_positions, seed, out_shape)  # [C, n, kh, kw]
        per_group = x.shape[0] // g.group
        rows = np.empty((g.group, len(positions), per_group * g.kernel[0] * g.kernel[1] + 1))
        rows[..., -1] = 1
        rows[..., :-1] = windows.reshape(g.group, per_group, len(positions), -1).transpose(0, 2, 1, 3) \
            .reshape(g.group, len(positions), -1)
        return rows, positions


def _inner(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a^T b per group; one group as a plain 2-D product, which BLAS runs much faster than a stack."""
    if len(a) == 1:
        return (a[0].T @ b[0])[None]
    return np.matmul(a.transpose(0, 2, 1), b)


@dataclass(eq=False)
class ConvLayer:
    node: onnx.NodeProto
    weight: str
    bias: str | None
    original_output: str
    channels: np.ndarray  # the original output channels this node kept, in order
    geometry: Geometry
    max_positions: int
    windows: _Windows | None = None
    key: tuple | None = None

    @property
    def where(self) -> str:
        return self.node.name or self.node.output[0]

    def taps(self) -> tuple[list[str], list[str]]:
        return [self.node.input[0]], [self.original_output]

    def observe(self, pool: dict) -> None:
        self.windows = pool.setdefault(("windows", self.node.input[0], self.geometry),
                                       _Windows(self.node.input[0], self.geometry, self.max_positions))
        self.key = self.windows.target(self.original_output, self.channels)

    def as_matrix(self, weight: np.ndarray) -> np.ndarray:
        """Conv [O, C/g, kh, kw] or ConvTranspose [C, O/g, kh, kw] weights as the [g, C/g * kh * kw, O/g]
        matrices that multiply the windows."""
        group = self.geometry.group
        if not self.geometry.transposed:
            return weight.reshape(group, weight.shape[0] // group, -1).transpose(0, 2, 1)
        inputs, outputs, kh, kw = weight.shape
        flipped = weight.reshape(group, inputs // group, outputs, kh, kw)[..., ::-1, ::-1]
        return flipped.transpose(0, 2, 1, 3, 4).reshape(group, outputs, -1).transpose(0, 2, 1)

    def as_weight(self, matrix: np.ndarray, shape: tuple) -> np.ndarray:
        group = self.geometry.group
        if not self.geometry.transposed:
            return matrix.transpose(0, 2, 1).reshape(shape)
        inputs, outputs, kh, kw = shape
        per_group = matrix.transpose(0, 2, 1).reshape(group, outputs, inputs // group, kh, kw)[..., ::-1, ::-1]
        return per_group.transpose(0, 2, 1, 3, 4).reshape(shape)

    def refit(self, model, weights, damping, taken) -> tuple[float, float, str]:
        rhs, energy = self.windows.targets[self.key]
        problem = Problem(self.windows.gram, rhs, energy)
        current = numpy_helper.to_array(weights[self.weight]).astype(np.float64)
        group = self.geometry.group
        matrix = self.as_matrix(current)  # [g, K, O/g]
        outputs = group * matrix.shape[2]
        bias = numpy_helper.to_array(weights[self.bias]).astype(np.float64) if self.bias else np.zeros(outputs)
        start = np.concatenate([matrix, bias.reshape(group, 1, -1)], axis=1)  # [g, K+1, O/g]
        support = start != 0
        support[:, -1] = True
        result = fit(problem, start, support, damping)
        if not result.changed:
            return result.before, result.after, f" ({result.how})"
        solved, how = result.weights, result.how
        refit = self.as_weight(solved[:, :-1], current.shape)
        weights[self.weight].CopyFrom(numpy_helper.from_array(refit.astype(np.float32), self.weight))
        if not self.bias:
            self.bias = unique_name(f"{self.weight}_bias", taken)
            model.graph.initializer.append(numpy_helper.from_array(np.zeros(outputs, np.float32), self.bias))
            weights[self.bias] = model.graph.initializer[-1]
            del self.node.input[2:]
            self.node.input.append(self.bias)
            how += ", bias added"
        weights[self.bias].CopyFrom(numpy_helper.from_array(solved[:, -1].reshape(-1).astype(np.float32), self.bias))
        return result.before, result.after, f" ({how})"


# --------------------------------------------------------------------------
# finding the layers, ordering and observing them
# --------------------------------------------------------------------------
def _changed_layers(model, reference, max_positions: int) -> tuple[list, list[Note]]:
    original_nodes = {(n.name or n.output[0]): n for n in reference.graph.node}
    original_values = {t.name: t for t in constant_tensors(reference.graph)}
    weights = {t.name: t for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    tappable, original_tappable = main_graph_tensors(model), main_graph_tensors(reference)
    uses = tensor_reads(model.graph)
    kept = None  # channel correspondence, recovered only if some layer lost channels
    layers, notes = [], []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in _LAYERS or len(node.input) < 2:
            continue
        where = node.name or node.output[0]
        original = original_nodes.get(where)
        name = node.input[1]
        if original is None or original.op_type != node.op_type or len(original.input) < 2 \
                or original.input[1] not in original_values:
            continue
        if name not in weights:
            layer = _shared_layer(node, original, model, reference, weights, original_values, uses, tappable,
                                  original_tappable, notes)
            if layer is not None:
                layers.append(layer)
            continue
        stored = numpy_helper.to_array(weights[name])
        before = numpy_helper.to_array(original_values[original.input[1]])
        if stored.shape == before.shape and np.array_equal(stored, before):
            continue
        if node.op_type in ("Conv", "ConvTranspose") and stored.ndim != 4:
            notes.append(Note(where, f"not refit: only 2-D {node.op_type} is ({stored.ndim}-D weights)"))
            continue
        if node.op_type == "ConvTranspose" and (attribute(node, "output_shape") is not None or
                                                attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")):
            notes.append(Note(where, "not refit: a ConvTranspose sized by output_shape or auto_pad"))
            continue
        if node.op_type == "Gemm" and (attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0):
            continue
        if node.op_type in ("MatMul", "Gemm") and (stored.ndim != 2 or before.ndim != 2):
            continue
        if uses.get(name, 0) != 1 or node.input[0] not in tappable or original.input[0] not in original_tappable \
                or original.output[0] not in original_tappable:
            notes.append(Note(where, "not refit: shared weight or an input that cannot be observed"))
            continue
        transposed = node.op_type == "Gemm" and bool(attribute(node, "transB", 0))
        out_axis = 0 if node.op_type == "Conv" or transposed else 1  # MatMul, Gemm, ConvTranspose: 1
        if stored.shape == before.shape:
            channels = np.arange(before.shape[out_axis])
        else:
            if kept is None:
                from .prune_channels import kept_channels

                kept, _ = kept_channels(reference, model)
            if where not in kept or len(kept[where].outputs) != stored.shape[out_axis]:
                notes.append(Note(where, "not refit: its channels cannot be matched to the original layer's"))
                continue
            channels = kept[where].outputs
        if node.op_type in ("Conv", "ConvTranspose"):
            depthwise = node.op_type == "Conv" and stored.shape[1] == before.shape[1] == 1  # pruning changes its group
            if stored.shape[2:] != before.shape[2:] or \
                    (attribute(node, "group", 1) != attribute(original, "group", 1) and not depthwise):
                notes.append(Note(where, "not refit: its kernel or groups differ from the original's"))
                continue
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if bias is not None and (bias not in weights or uses.get(bias, 0) != 1):
                notes.append(Note(where, "not refit: its bias is computed or shared"))
                continue
            layers.append(ConvLayer(node, name, bias, original.output[0], channels,
                                    Geometry.of(node, stored.shape[2:]), max_positions))
            continue
        matrix = (before.T if transposed else before).astype(np.float64)[:, channels]
        bias, original_bias = _bias(node, model, weights, original_values, uses, channels)
        layers.append(Dense(node, name, bias, original.input[0], matrix, original_bias, transposed,
                            stored.shape[1 if transposed else 0]))
    return layers, notes


def _shared_layer(node, original, model, reference, weights, original_values, uses, tappable, original_tappable,
                  notes) -> SharedDense | None:
    """The layer to refit when `cluster` rebuilds its weight from a codebook (None otherwise, with a note
    where it is clustered but cannot be refit)."""
    name, where = node.input[1], node.name or node.output[0]
    shared = shared_weight(model, node.input[1])
    if shared is None:
        return None
    codebook, positions = shared
    before = numpy_helper.to_array(original_values[original.input[1]])
    transposed = node.op_type == "Gemm" and bool(attribute(node, "transB", 0))
    if node.op_type not in ("MatMul", "Gemm") or positions.ndim != 2 or positions.shape != before.shape:
        notes.append(Note(where, f"not refit: clustered {node.op_type} codebooks are refit for MatMul/Gemm only"))
        return None
    if node.op_type == "Gemm" and (attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0):
        return None
    if uses.get(name, 0) != 1 or uses.get(codebook, 0) != 1 or node.input[0] not in tappable \
            or original.input[0] not in original_tappable or original.output[0] not in original_tappable:
        notes.append(Note(where, "not refit: shared codebook or an input that cannot be observed"))
        return None
    if len(np.unique(positions)) > _MAX_SHARED_VALUES and not _private_columns(positions.T if transposed else positions):
        notes.append(Note(where, f"not refit: more than {_MAX_SHARED_VALUES} values shared across output columns"))
        return None
    channels = np.arange(before.shape[0 if transposed else 1])
    bias, original_bias = _bias(node, model, weights, original_values, uses, channels)
    matrix = (before.T if transposed else before).astype(np.float64)
    return SharedDense(node, name, bias, original.input[0], matrix, original_bias, transposed, matrix.shape[0],
                       codebook=codebook, positions=positions.T if transposed else positions)


def _bias(node, model, weights, original_values, reads, channels):
    """The layer's own bias (graph.layer_bias) and its original values for the kept channels, if it is refittable."""
    name = layer_bias(model.graph, node, weights, reads)
    if name is None or name not in original_values:
        return None, None
    original = numpy_helper.to_array(original_values[name]).astype(np.float64).reshape(-1)
    if original.size == 1 or weights[name].dims[0] != len(channels):
        return None, None
    return name, original[channels]


def _stages(model, layers) -> list[list]:
    """The layers grouped by depth: a layer's stage is one past the latest stage among the changed
    layers its input depends on, so a stage's inputs are final once earlier stages are refit."""
    by_output = {layer.node.output[0]: layer for layer in layers}
    depth: dict[str, int] = {}
    stages: dict[int, list] = {}
    for node in model.graph.node:
        reads = list(node.input) + [n for g in subgraphs(node) for n in outer_scope_names(g)]
        level = max((depth.get(n, 0) for n in reads), default=0)
        layer = by_output.get(node.output[0]) if node.output else None
        if layer is not None:
            level += 1
            stages.setdefault(level, []).append(layer)
        for name in node.output:
            depth[name] = level
    return [stages[level] for level in sorted(stages)]


def _observe(model, reference, stage, context, max_samples: int) -> None:
    """Stream the calibration data through both models once and fold it into the stage's sums.

    The two models run side by side, each on half the cores: one session per model with every
    core spins threads against the other's (on 2 busy cores that costs more than half the time),
    and the sums of one sample are folded in while the next is computed."""
    pool: dict = {}
    for layer in stage:
        layer.observe(pool)
    current = sorted({n for layer in stage for n in layer.taps()[0]})
    original = sorted({n for layer in stage for n in layer.taps()[1]})
    threads = max(1, (os.cpu_count() or 2) // 2)
    now = stream_tensors(upstream_model(model, current), current, islice(iter(context.data), max_samples), context.progress,
                         threads=threads)
    then = stream_tensors(upstream_model(reference, original), original, islice(iter(context.data), max_samples),
                          threads=threads)
    with ThreadPoolExecutor(2) as runner:
        pending = runner.submit(next, now, None), runner.submit(next, then, None)
        sample = 0
        while True:
            values_now, values_then = (job.result() for job in pending)
            if values_now is None or values_then is None:
                break
            pending = runner.submit(next, now, None), runner.submit(next, then, None)
            values = {("current", n): v for n, v in values_now.items()}
            values.update({("original", n): v for n, v in values_then.items()})
            for sums in pool.values():
                sums.add(values, sample)
            sample += 1
