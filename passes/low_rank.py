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

`rank=auto` with `ratio=R` spends one budget, R times the parameters of all the layers it may
factor, where it hurts least. Each layer's spectrum gives its own output error e(r) at every
rank; how much that error moves the model's outputs is measured once per layer (its weight alone
replaced by its rank at ratio R, the drift 1 - cosine of the outputs on calibration samples, run
over the layer's downstream region only), giving a sensitivity s = drift / e. The ranks then
minimize the summed s e(r) within the budget (a Lagrange multiplier searched by bisection, each
layer choosing its best rank, or none, for it).
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
                              replace_nodes, unique_name)
from onnxshrink.options import PassOptions, option
from onnxshrink.pass_base import Note, Pass, PassContext, PassOutput
from onnxshrink.registry import register_pass


@register_pass("svd")
class LowRank(Pass):
    summary = "Factor MatMul/Gemm weights into two thin ones by (activation-aware) truncated SVD where it saves."
    needs_data = True

    @dataclass(frozen=True)
    class Options(PassOptions):
        rank: str = option("", "a fixed rank, or auto: with ratio=, one parameter budget for all the layers, "
                               "spent by measured sensitivity (empty: use energy or ratio)")
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
            if self.auto:
                if not self.ratio or self.energy:
                    raise UsageError("rank=auto spends a budget: give it with ratio= alone (e.g. svd(rank=auto,ratio=0.5))")
                return
            if self.rank and (not self.rank.isdigit() or int(self.rank) < 1):
                raise UsageError(f"option 'rank' takes a positive integer or auto, got '{self.rank}'")
            given = [name for name in ("rank", "energy", "ratio") if getattr(self, name)]
            if len(given) != 1:
                raise UsageError("give exactly one of rank=, energy= or ratio= (e.g. svd(energy=0.95))")

        @property
        def auto(self) -> bool:
            return self.rank.lower() == "auto"

        @property
        def fixed_rank(self) -> int:
            return 0 if self.auto or not self.rank else int(self.rank)

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
        spectra = [_Spectrum.of(matrix, grams.get(node.input[0]), opts.damping) for node, matrix in layers]
        if opts.auto:
            ranks = _auto_ranks(model, layers, spectra, context, opts, notes)
        else:
            ranks = [_rank(spectrum, opts) for spectrum in spectra]
        taken = all_names(model)
        replaced = {}
        for (node, matrix), spectrum, r in zip(layers, spectra, ranks):
            where = node.name or node.output[0]
            if r is None:
                why = "the budget is spent better elsewhere" if opts.auto else f"no rank of {matrix.shape} saves " \
                                                                                f"{opts.min_saving:.0%}"
                notes.append(Note(where, f"left as is: {why}"))
                continue
            left, right, kept = spectrum.factors(r)
            replaced[id(node)] = _factored_nodes(node, left, right, model.graph, taken)
            k, n = matrix.shape
            notes.append(Note(where, f"rank {left.shape[1]} of {min(k, n)}: {left.size + right.size:,} of {k * n:,} "
                                     f"weights, {kept:.1%} energy kept" + (" (of the outputs)" if grams else "")))
        if not replaced:
            return PassOutput(model, notes)
        replace_nodes(model.graph, replaced)
        drop_unused_initializers(model.graph)  # the factored weights, unless something else reads them
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


@dataclass
class _Spectrum:
    """A weight's (activation-aware) SVD: rank r keeps energy[r - 1] of the (output) energy."""

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    lower: np.ndarray | None  # L of the damped input Gram, None for plain SVD
    k: int
    n: int

    @classmethod
    def of(cls, matrix: np.ndarray, gram: np.ndarray | None, damping: float) -> "_Spectrum":
        k, n = matrix.shape
        lower = None
        if gram is not None:
            damped = gram + damping * np.mean(np.diag(gram)) * np.eye(k) + 1e-12 * np.eye(k)
            lower = scipy.linalg.cholesky(damped, lower=True)  # H = L L^T
            u, s, vt = np.linalg.svd(lower.T @ matrix, full_matrices=False)
        else:
            u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        return cls(u, s, vt, lower, k, n)

    @property
    def energy(self) -> np.ndarray:
        return np.cumsum(self.s ** 2) / max(float(np.sum(self.s ** 2)), 1e-300)

    def most(self, min_saving: float) -> int:
        """The largest rank that still saves `min_saving` of the layer."""
        return min(int((1 - min_saving) * self.k * self.n // (self.k + self.n)), min(self.k, self.n))

    def factors(self, r: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(W1 [K, r], W2 [r, N], energy kept)."""
        left = self.u[:, :r] * self.s[:r]
        if self.lower is not None:
            left = scipy.linalg.solve_triangular(self.lower.T, left, lower=False)  # L^-T U_r S_r
        return left.astype(np.float32), self.vt[:r].astype(np.float32), float(self.energy[r - 1])


def _rank(spectrum: _Spectrum, opts) -> int | None:
    """The rank `rank=`, `energy=` or `ratio=` asks for, or None where no allowed rank saves enough."""
    k, n = spectrum.k, spectrum.n
    most = spectrum.most(opts.min_saving)
    if opts.fixed_rank:
        r = opts.fixed_rank
        if r > min(k, n):
            raise UsageError(f"svd: rank={r} is larger than min(K, N) = {min(k, n)} of a {k}x{n} weight")
    elif opts.energy:
        r = int(np.searchsorted(spectrum.energy, opts.energy - 1e-12) + 1)
    else:
        r = int(opts.ratio * k * n // (k + n))
    r = min(r, min(k, n))
    return r if 1 <= r <= most else None


@dataclass(frozen=True)
class _Weight:
    weight: str  # what sensitivity.Downstream needs of a layer: its weight's name


def _auto_ranks(model, layers, spectra, context, opts, notes) -> list[int | None]:
    """Per-layer ranks (None: left as is) that hold `ratio` of all the layers' parameters together
    with the least predicted drift: sensitivity (measured drift per unit of the layer's own
    output error, at its uniform-budget rank) times that error, summed."""
    from .sensitivity import Downstream

    if context.data is None:
        raise OnnxShrinkError("svd(rank=auto) measures each layer's effect on the outputs: it needs calibration "
                              "data (--calib)")
    feeds = list(islice(iter(context.data), min(opts.max_samples, 8)))
    downstream = Downstream(model, [_Weight(node.input[1]) for node, _ in layers], feeds, threads=None)
    sensitivity = []
    for (node, matrix), spectrum in zip(layers, spectra):
        probe = min(max(1, int(opts.ratio * spectrum.k * spectrum.n // (spectrum.k + spectrum.n))),
                    spectrum.most(opts.min_saving))
        if probe < 1:
            sensitivity.append(0.0)
            continue
        left, right, _ = spectrum.factors(probe)
        dense = (left.astype(np.float64) @ right).astype(np.float32)
        stored = dense.T if node.op_type == "Gemm" and attribute(node, "transB", 0) else dense
        (drift,) = downstream.measure(_Weight(node.input[1]), [np.ascontiguousarray(stored)])
        sensitivity.append(drift / max(1.0 - spectrum.energy[probe - 1], 1e-12))

    # Each layer's choices: rank r (cost r (K + N), predicted drift s (1 - energy(r))) or unfactored.
    choices = []
    for spectrum, weight in zip(spectra, sensitivity):
        ranks = np.arange(1, spectrum.most(opts.min_saving) + 1)
        costs = np.append(ranks * (spectrum.k + spectrum.n), spectrum.k * spectrum.n).astype(np.float64)
        drifts = np.append(weight * (1.0 - spectrum.energy[ranks - 1]), 0.0)
        choices.append((np.append(ranks, 0), costs, drifts))
    budget = opts.ratio * sum(s.k * s.n for s in spectra)

    def pick(price: float) -> tuple[list[int], float]:
        picked = [int(np.argmin(drifts + price * costs)) for _, costs, drifts in choices]
        return picked, sum(float(c[1][i]) for c, i in zip(choices, picked))

    low, high = 0.0, 1.0
    while pick(high)[1] > budget and high < 1e12:
        high *= 4
    for _ in range(60):  # bisection on the price of a parameter
        middle = (low + high) / 2
        low, high = (middle, high) if pick(middle)[1] > budget else (low, middle)
    picked, cost = pick(high)
    ranks = [int(c[0][i]) or None for c, i in zip(choices, picked)]
    total = sum(s.k * s.n for s in spectra)
    notes.append(Note("(graph)", f"rank=auto: {cost:,.0f} of {total:,} parameters ({cost / total:.1%}; budget "
                                 f"{opts.ratio:.0%}), sensitivities measured on {len(feeds)} samples"))
    for (node, _), weight, r in zip(layers, sensitivity, ranks):
        notes.append(Note(node.name or node.output[0], f"rank=auto: sensitivity {weight:.3g} (drift per unit of "
                                                       f"the layer's output error) -> "
                                                       f"{'rank ' + str(r) if r else 'left as is'}"))
    return ranks


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
