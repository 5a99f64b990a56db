"""`tucker`: factor a k x k Conv into 1x1 -> k x k -> 1x1 convolutions (Tucker-2), where it saves.

The low-rank family's Conv member (`svd` in low_rank.py factors MatMul/Gemm). A kernel
W[O, I, kh, kw] becomes

    y = U_out * conv(A * x, C) + b'       A [r_in, I], C [r_out, r_in, kh, kw], U_out [O, r_out]

a 1x1 Conv reducing the input channels, a k x k Conv on the reduced channels with the original's
strides, pads and dilations, and a 1x1 Conv expanding to the output channels that carries the
bias. A factor that would be the identity (r_in = I or r_out = O) is left out.

Plain (`activation_aware=false`) this is HOSVD: A holds the leading left singular vectors of W
unfolded along its input channels, U_out those of the projected kernel unfolded along its output
channels (one HOOI step, which is never worse than HOSVD's own U_out), C the kernel in those
bases.

`activation_aware=true` (the default) fits the layer's *outputs* on calibration data. From the
streamed windows p the Conv sees (im2col: [I, kh, kw] patches at sampled output positions) it
keeps their mean and covariance S_p, and:

* input mode: with the channel covariance S_c = L L^T (S_p's diagonal blocks averaged over the
  kernel taps), the SVD of W_(in) L (the kernel unfolded as [O kh kw, I], whitened) gives
  A = V_r^T L^-1: the input subspace that carries the most output energy, the ASVD / SVD-LLM
  whitening applied to one mode. Directions the inputs never take cost nothing to drop.
* core and output mode, exactly: with q = (A (x) I) p the reduced windows, the least-squares map
  F = Cov(y, q) Cov(q)^-1 is the best k x k Conv over the reduced channels, and U_out the
  leading eigenvectors of F Cov(q) F^T, the covariance of its outputs; C = U_out^T F. The output
  error is then tr Cov(y) - the kept eigenvalues, which is what `energy` and the notes report
  (as "of the output variance"). The bias absorbs every mean shift: b' = mean(y) - U_out C mean(q).

Ranks: `rank` (both modes), `energy` (per mode: the input mode by the whitened singular values,
the output mode by the eigenvalues above) or `ratio` (the factors hold at most that fraction of
W's parameters: several splits of that budget between r_in and r_out are tried, r_in = I
included, and the one with the least output error is kept). A Conv is factored only where the
factors hold at most (1 - min_saving) of its parameters. `pointwise=true` factors 1x1 Convs too,
as two 1x1 Convs (the output mode alone: the activation-aware truncated SVD). Grouped and
depthwise Convs, 1-D/3-D Convs and Convs whose kernel is shared are left as they are, with a
note.
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
from onnxshrink.graph import (all_names, attribute, constants_to_initializers, drop_unused_initializers,
                              outer_scope_names, replace_nodes, subgraphs, unique_name)
from onnxshrink.options import PassOptions, option
from onnxshrink.pass_base import Note, Pass, PassContext, PassOutput
from onnxshrink.registry import register_pass

from .reconstruct import Geometry

_KEPT_ATTRIBUTES = ("strides", "pads", "dilations", "auto_pad", "kernel_shape")
_SPLITS = (0.6, 0.75, 0.9, 1.0, 1.15, 1.3, 1.5)  # r_in tried, relative to the split proportional to I and O


@register_pass("tucker")
class Tucker(Pass):
    summary = "Factor k x k Convs into 1x1 -> k x k -> 1x1 by (activation-aware) Tucker-2 where it saves."
    needs_data = True

    @dataclass(frozen=True)
    class Options(PassOptions):
        ratio: float = option(0.0, "the factors hold at most this fraction of each kernel's parameters "
                                   "(0: use energy or rank)", low=0, high=1)
        energy: float = option(0.0, "per channel mode, keep this fraction of the (output) energy "
                                    "(0: use ratio or rank)", low=0, high=1)
        rank: int = option(0, "fixed rank of both channel modes (0: use ratio or energy)", low=0)
        min_saving: float = option(0.1, "factor a Conv only where it saves at least this fraction", low=0, high=1,
                                   high_exclusive=True)
        activation_aware: bool = option(True, "fit the layer's outputs on calibration data, not the kernel")
        pointwise: bool = option(False, "also factor 1x1 Convs, as two 1x1 Convs")
        exclude: tuple[str, ...] = option((), "node names left as they are")
        min_elements: int = option(4096, "smaller kernels are left as they are", low=1)
        max_samples: int = option(32, "calibration samples for the window statistics", low=1)
        max_positions: int = option(1024, "output positions per image whose windows enter the statistics, "
                                          "drawn at random where a map has more; 0 takes them all", low=0)
        damping: float = option(0.01, "activation-aware: added to the covariances' diagonal, relative to their "
                                      "mean", low=0)

        def __post_init__(self):
            super().__post_init__()
            given = [name for name in ("ratio", "energy", "rank") if getattr(self, name)]
            if len(given) != 1:
                raise UsageError("give exactly one of ratio=, energy= or rank= (e.g. tucker(ratio=0.5))")

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassOutput:
        opts = self.options
        constants_to_initializers(model.graph)
        layers, notes = _layers(model, opts)
        if opts.rank:  # refused before any calibration work, and before anything is written
            for layer in layers:
                if opts.rank > layer.limit:
                    raise UsageError(f"tucker: rank={opts.rank} is larger than the channels of Conv '{layer.where}' "
                                     f"({layer.out_channels} out, {layer.in_channels} in); give a smaller rank, "
                                     "ratio= or energy=, or exclude= that node")
        if not layers:
            return PassOutput(model, notes or [Note("(graph)", "no Conv to factor")])
        if opts.activation_aware:
            if context.data is None:
                raise OnnxShrinkError("tucker(activation_aware=true) needs calibration data (--calib); "
                                      "or give activation_aware=false")
            _observe(model, layers, context, opts, notes)
        taken = all_names(model)
        replaced = {}
        for layer in layers:
            factors = factor(layer, opts)
            if factors is None:
                notes.append(Note(layer.where, f"left as is: no ranks of {layer.kernel.shape} save "
                                               f"{opts.min_saving:.0%}"))
                continue
            replaced[id(layer.node)] = _factored_convs(layer, factors, model.graph, taken)
            what = "output variance" if layer.stats is not None else "kernel energy"
            notes.append(Note(layer.where, f"ranks {factors.r_in} in, {factors.r_out} out of {layer.in_channels}, "
                                           f"{layer.out_channels}: {factors.params:,} of {layer.kernel.size:,} "
                                           f"weights, {factors.kept:.1%} of the {what} kept"))
        if not replaced:
            return PassOutput(model, notes)
        replace_nodes(model.graph, replaced)
        drop_unused_initializers(model.graph)  # the factored kernels, unless something else reads them
        return PassOutput(model, notes)


# --------------------------------------------------------------------------
# the layers and their statistics
# --------------------------------------------------------------------------
@dataclass(eq=False)
class ConvLayer:
    node: onnx.NodeProto
    kernel: np.ndarray  # float64 [O, I, kh, kw]
    bias: np.ndarray  # float64 [O] (zeros where the Conv has none)
    geometry: Geometry
    stats: "WindowStats | None" = None

    @property
    def where(self) -> str:
        return self.node.name or self.node.output[0]

    @property
    def out_channels(self) -> int:
        return self.kernel.shape[0]

    @property
    def in_channels(self) -> int:
        return self.kernel.shape[1]

    @property
    def taps(self) -> int:
        return self.kernel.shape[2] * self.kernel.shape[3]

    @property
    def limit(self) -> int:
        """The largest rank `rank=` may ask for."""
        return min(self.out_channels, self.in_channels)


def _layers(model, opts) -> tuple[list[ConvLayer], list[Note]]:
    weights = {t.name: t for t in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
        for sub in subgraphs(node):
            for name in outer_scope_names(sub):
                readers[name] = readers.get(name, 0) + 2  # read inside a subgraph: keep it as it is
    layers, notes = [], []
    for node in model.graph.node:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        where = node.name or node.output[0]
        tensor = weights.get(node.input[1])
        if tensor is None or node.input[1] in graph_inputs or tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        problem = _refusal(node, tensor, readers, weights, graph_inputs, opts)
        if problem:
            if problem != "small":
                notes.append(Note(where, f"left as is: {problem}"))
            continue
        kernel = numpy_helper.to_array(tensor).astype(np.float64)
        bias = np.zeros(kernel.shape[0])
        if len(node.input) > 2 and node.input[2]:
            bias = numpy_helper.to_array(weights[node.input[2]]).astype(np.float64).reshape(-1)
        layers.append(ConvLayer(node, kernel, bias, Geometry.of(node, kernel.shape[2:])))
    return layers, notes


def _refusal(node, tensor, readers, weights, graph_inputs, opts) -> str:
    """Why this Conv is not factored ("small" is not worth a note), or ''."""
    if node.name in opts.exclude:
        return "excluded"
    if len(tensor.dims) != 4:
        return f"{len(tensor.dims) - 2}-D convolution (only 2-D is factored)"
    if int(np.prod(tensor.dims)) < opts.min_elements:
        return "small"
    if attribute(node, "group", 1) != 1:
        return "grouped or depthwise Conv (its channels are already split)"
    if tensor.dims[2] * tensor.dims[3] == 1 and not opts.pointwise:
        return "1x1 kernel (give pointwise=true to factor it as two 1x1 Convs)"
    if readers.get(node.input[1], 0) > 1:
        return "its kernel is shared with other nodes"
    if len(node.input) > 2 and node.input[2] and (node.input[2] in graph_inputs or node.input[2] not in weights):
        return "its bias is not a constant"
    return ""


@dataclass(eq=False)
class WindowStats:
    """Mean and covariance of the windows a Conv reads, summed in float64 over calibration samples."""

    gram: Gram  # over rows [window, 1]
    count: int = 0

    def moments(self) -> tuple[np.ndarray, np.ndarray]:
        total = self.gram.total()
        mean = total[:-1, -1] / self.count
        covariance = total[:-1, :-1] / self.count - np.outer(mean, mean)
        return mean, covariance


def _observe(model, layers, context, opts, notes) -> None:
    """Fill `layer.stats` of the layers whose input can be observed; Convs reading one input through
    one geometry share them."""
    tappable = main_graph_tensors(model)
    shared: dict[tuple, WindowStats] = {}
    for layer in layers:
        if layer.node.input[0] not in tappable:
            notes.append(Note(layer.where, "plain HOSVD: the Conv's input cannot be observed"))
            continue
        key = (layer.node.input[0], layer.geometry)
        if key not in shared:
            shared[key] = WindowStats(Gram(layer.in_channels * layer.taps + 1))
        layer.stats = shared[key]
    names = sorted({name for name, _ in shared})
    samples = islice(iter(context.data), opts.max_samples)
    for sample, values in enumerate(stream_tensors(model, names, samples, context.progress)):
        for (name, geometry), stats in shared.items():
            x = np.asarray(values[name])
            if x.dtype != np.float32 or x.ndim != 4:
                raise OnnxShrinkError(f"tucker: Conv input '{name}' has shape {x.shape} and type {x.dtype}, "
                                      "not a float32 [N, C, H, W]")
            for item, image in enumerate(x):
                rows = windows(image, geometry, opts.max_positions, seed=(sample, item))
                stats.gram.add(np.hstack([rows, np.ones((len(rows), 1), rows.dtype)]))
                stats.count += len(rows)


def windows(x: np.ndarray, geometry: Geometry, max_positions: int, seed) -> np.ndarray:
    """[n, C * kh * kw] windows of `x` [C, H, W] at the Conv's output positions (n of them drawn at
    random where there are more than `max_positions`), laid out as the kernel's [I, kh, kw]."""
    patches, positions = geometry.patches(x, max_positions, seed)  # [C, n, kh, kw]
    return patches.transpose(1, 0, 2, 3).reshape(len(positions), -1)


# --------------------------------------------------------------------------
# the factorization
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Factors:
    reduce: np.ndarray | None  # A [r_in, I, 1, 1], None where it would be the identity
    core: np.ndarray  # C [r_out, r_in, kh, kw]
    expand: np.ndarray | None  # U_out [O, r_out, 1, 1], None where it would be the identity
    bias: np.ndarray  # [O], on the last Conv
    kept: float  # fraction of the output variance (or of the kernel's energy, plain) kept

    @property
    def r_in(self) -> int:
        return self.core.shape[1]

    @property
    def r_out(self) -> int:
        return self.core.shape[0]

    @property
    def params(self) -> int:
        return sum(f.size for f in (self.reduce, self.core, self.expand) if f is not None)


def factor(layer: ConvLayer, opts) -> Factors | None:
    """The factors `opts` ask for, or None where no allowed ranks save `min_saving`."""
    out_ch, in_ch, taps = layer.out_channels, layer.in_channels, layer.taps
    fit = _Fit(layer, opts.damping)

    def params(r_in: int, r_out: int) -> int:
        return (in_ch * r_in if r_in < in_ch else 0) + taps * r_in * r_out + (r_out * out_ch if r_out < out_ch else 0)

    if opts.ratio and opts.ratio > 1 - opts.min_saving:  # the budget itself saves too little
        return None
    if taps == 1:  # a 1x1 kernel: no input reduction, only the output mode
        candidates = [in_ch]
    elif opts.rank:
        candidates = [opts.rank]
    elif opts.energy:
        candidates = [fit.input_rank(opts.energy)]
    else:
        budget = opts.ratio * layer.kernel.size
        proportional = _proportional_rank(in_ch, out_ch, taps, budget)
        candidates = sorted({min(in_ch, max(1, round(proportional * s))) for s in _SPLITS} | {in_ch})
    best = None
    for r_in in candidates:
        spectrum = fit.output_spectrum(r_in)
        if opts.rank:
            r_out = opts.rank
        elif opts.energy:
            share = np.cumsum(spectrum) / max(float(np.sum(spectrum)), 1e-300)
            r_out = int(np.searchsorted(share, opts.energy - 1e-12) + 1)
        else:  # the largest r_out that the budget leaves
            r_out = max(r for r in range(out_ch + 1) if r == 0 or params(r_in, r) <= opts.ratio * layer.kernel.size)
        r_out = min(r_out, out_ch)
        if r_out < 1 or params(r_in, r_out) > (1 - opts.min_saving) * layer.kernel.size:
            continue
        error = fit.variance - float(np.sum(spectrum[:r_out]))
        if best is None or error < best[0]:
            best = (error, r_in, r_out)
    if best is None:
        return None
    return fit.factors(best[1], best[2])


def _proportional_rank(in_ch: int, out_ch: int, taps: int, budget: float) -> int:
    """The r_in of the largest ranks in proportion to I and O (r_out = r_in O / I) whose three factors fit `budget`."""
    # taps (O/I) r^2 + 2 O r - budget = 0
    a, b = taps * out_ch / in_ch, 2 * out_ch
    return max(1, int((-b + np.sqrt(b * b + 4 * a * budget)) / (2 * a)))


class _Fit:
    """The output-fitting problem of one Conv: the input-mode bases, and for a chosen r_in the
    least-squares core map F and the spectrum of its outputs."""

    def __init__(self, layer: ConvLayer, damping: float):
        self.layer = layer
        out_ch, in_ch, taps = layer.out_channels, layer.in_channels, layer.taps
        self.matrix = layer.kernel.reshape(out_ch, in_ch * taps)  # W [O, I kh kw], the windows' layout
        if layer.stats is not None:
            self.mean, covariance = layer.stats.moments()
            covariance = covariance + damping * max(np.mean(np.diag(covariance)), 1e-30) * np.eye(len(covariance))
        else:  # plain: isotropic, centred inputs make every formula below plain HOSVD
            self.mean, covariance = np.zeros(in_ch * taps), np.eye(in_ch * taps)
        self.covariance = covariance
        self.variance = float(np.einsum("oi,ij,oj->", self.matrix, covariance, self.matrix))  # tr Cov(y)
        blocks = covariance.reshape(in_ch, taps, in_ch, taps)
        channels = np.einsum("itjt->ij", blocks) / taps  # S_c: the channel covariance, averaged over taps
        self.lower = scipy.linalg.cholesky(channels, lower=True)
        unfolded = layer.kernel.transpose(0, 2, 3, 1).reshape(-1, in_ch)  # W_(in)^T [O kh kw, I]
        _, self.input_singular, vt = np.linalg.svd(unfolded @ self.lower, full_matrices=False)
        self.input_basis = vt.T  # whitened input directions, best first
        self._cache: dict[int, tuple] = {}

    def input_rank(self, energy: float) -> int:
        share = np.cumsum(self.input_singular ** 2) / max(float(np.sum(self.input_singular ** 2)), 1e-300)
        return int(np.searchsorted(share, energy - 1e-12) + 1)

    def _reduction(self, r_in: int) -> np.ndarray | None:
        """A [r_in, I] (None: the identity, for r_in = I)."""
        if r_in >= self.layer.in_channels:
            return None
        # A = V_r^T L^-1, as the solve L^T A^T = V_r
        return scipy.linalg.solve_triangular(self.lower.T, self.input_basis[:, :r_in], lower=False).T

    def _solve(self, r_in: int) -> tuple:
        """(A, F [O, r_in taps], eigenvalues of F Cov(q) F^T descending, its eigenvectors)."""
        if r_in in self._cache:
            return self._cache[r_in]
        layer, taps = self.layer, self.layer.taps
        reduce = self._reduction(r_in)
        if reduce is None:  # q = p: F = W
            fitted = self.matrix
            output_cov = self.matrix @ self.covariance @ self.matrix.T
        else:
            in_ch = layer.in_channels
            # Cov(p, q) = S_p (A (x) I)^T and Cov(q) = (A (x) I) S_p (A (x) I)^T, contracted on the channel axis
            cross = np.tensordot(self.covariance.reshape(-1, in_ch, taps), reduce, axes=([1], [1]))  # [D, taps, r]
            cross = cross.transpose(0, 2, 1).reshape(-1, r_in * taps)  # [D, r taps]
            q_cov = np.tensordot(reduce, cross.reshape(in_ch, taps, -1), axes=([1], [0]))  # [r, taps, r taps]
            q_cov = q_cov.reshape(r_in * taps, r_in * taps)
            yq = self.matrix @ cross  # Cov(y, q) [O, r taps]
            fitted = scipy.linalg.solve(q_cov, yq.T, assume_a="pos").T  # F = Cov(y, q) Cov(q)^-1
            output_cov = yq @ fitted.T  # F Cov(q) F^T
        values, vectors = np.linalg.eigh((output_cov + output_cov.T) / 2)
        order = np.argsort(values)[::-1]
        self._cache[r_in] = (reduce, fitted, np.clip(values[order], 0, None), vectors[:, order])
        return self._cache[r_in]

    def output_spectrum(self, r_in: int) -> np.ndarray:
        return self._solve(r_in)[2]

    def factors(self, r_in: int, r_out: int) -> Factors:
        layer, taps = self.layer, self.layer.taps
        (kh, kw), out_ch, in_ch = layer.kernel.shape[2:], layer.out_channels, layer.in_channels
        reduce, fitted, values, vectors = self._solve(r_in)
        if r_out < out_ch:
            expand = vectors[:, :r_out]
            core = expand.T @ fitted  # C = U_out^T F
        else:  # keep all output channels: the core is F itself
            expand, core = None, fitted
        q_mean = self.mean.reshape(in_ch, taps) if reduce is None else reduce @ self.mean.reshape(in_ch, taps)
        fitted_mean = (core if expand is None else expand @ core) @ q_mean.reshape(-1)
        bias = layer.bias + self.matrix @ self.mean - fitted_mean  # b' = mean(y) - U C mean(q)
        kept = float(np.sum(values[:r_out]) / max(self.variance, 1e-300))
        return Factors(None if reduce is None else reduce[:, :, None, None].astype(np.float32),
                       core.reshape(-1, r_in, kh, kw).astype(np.float32),
                       None if expand is None else expand[:, :, None, None].astype(np.float32),
                       bias.astype(np.float32), min(kept, 1.0))


# --------------------------------------------------------------------------
# the rewrite
# --------------------------------------------------------------------------
def _factored_convs(layer: ConvLayer, factors: Factors, graph, taken) -> list[onnx.NodeProto]:
    node = layer.node
    base = node.name or node.output[0]
    kept = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in _KEPT_ATTRIBUTES}
    if "kernel_shape" in kept:
        kept["kernel_shape"] = list(factors.core.shape[2:])
    stages = [("reduce", factors.reduce, {}), ("core", factors.core, kept), ("expand", factors.expand, {})]
    stages = [stage for stage in stages if stage[1] is not None]
    bias_name = unique_name(f"{base}_tucker_bias", taken)
    graph.initializer.append(numpy_helper.from_array(factors.bias, bias_name))
    nodes, current = [], node.input[0]
    for index, (part, weight, attributes) in enumerate(stages):
        weight_name = unique_name(f"{base}_tucker_{part}_w", taken)
        graph.initializer.append(numpy_helper.from_array(weight, weight_name))
        last = index == len(stages) - 1
        # The last Conv keeps the original's name and output, and carries the bias.
        output = node.output[0] if last else unique_name(f"{base}_tucker_{part}", taken)
        inputs = [current, weight_name] + ([bias_name] if last else [])
        name = (node.name or None) if last else unique_name(f"{base}_tucker_{part}", taken)
        nodes.append(helper.make_node("Conv", inputs, [output], name=name, **attributes))
        current = output
    return nodes
