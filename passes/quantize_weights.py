"""`quantize-weights`: weight-only block-wise quantization of MatMul and Gemm weights.

A weight W[K, N] (the constant B of a MatMul, or of a Gemm read through transB) is cut, per output
column n, into blocks of `block` consecutive inputs along the reduction axis K; each block gets one
float32 scale (and with symmetric=false a zero point) and its weights become `bits`-bit codes.
Activations stay float: the file shrinks about 32/bits-fold for these weights and the outputs move
little, which suits transformer-style models whose size is in their MatMul weights.

Codes come from rounding to nearest (rtn), in a block range chosen by least squared error, or
from GPTQ (Frantar et al. 2022): rows of W (one input feature each) are quantized one at a time
and each row's rounding error is spread over the rows not yet quantized, weighted by the inverse
Hessian H = sum x^T x of the layer's inputs (streamed from the calibration data), which keeps the
layer's *output* close rather than each weight. Two choices matter on real models:
* act_order (default): rows go in descending order of H's diagonal, so the inputs that carry the
  most signal are quantized while most rows are still free to absorb their error; the block
  scales are then chosen up front from W ("static groups", as in the GPTQ reference code), so
  each stored block stays contiguous along K. act_order=false is the paper's index order, each
  block's scale chosen from its updated weights when the block is reached.
* damping (default 0.1 of H's mean diagonal, the paper uses 0.01): H from a few hundred
  calibration tokens is a noisy estimate, and GPTQ fitted to it tightly fits the calibration
  data more than new inputs; the ridge trades some of that fit for held-out accuracy.
On all-MiniLM-L6-v2, 4-bit block 32 (MatMul weights 0.156x float32), 48 calibration sentences,
sentence_embedding cosine on 16 held-out sentences, and in brackets the mean over the 4 disjoint
16-sentence held-out folds of models/sentences.txt: rtn 0.9751 [0.9734]; GPTQ in index order,
damping 0.01: 0.9870 [0.9862]; damping 0.1: 0.9888 [0.9880]; act_order and damping 0.1 (the
defaults): 0.9896 [0.9890]. At 3 bits 0.951 -> 0.961, at 2 bits 0.79 -> 0.85 (held-out split).
Measured on top of the defaults and left out (fold means): damping 0.01/0.05/0.2/0.3 (0.9865/
0.9889/0.9891/0.9886), damping relative to each diagonal entry or H's small eigenvalues shrunk (<= 0.9890),
damping chosen per layer by cross-validation over the calibration samples (0.9887), block scales
chosen under the Hessian metric (<= 0.9890), coordinate-descent refinement of the codes (0.9891),
a least-squares refit of the scales (0.9893, 6x slower), true-sequential Hessians from the
quantized layers' outputs (0.9892) and targets that also undo the upstream layers' error
(GPTAQ-style: 0.9895; with a bias correction 0.9898) at 5-10x the time. What is left is mainly
H's estimation noise: the held-out cosine grows with the calibration set (12, 24, 48 sentences:
0.9858, 0.9875, 0.9890; 48 + 64 sentences written for the measurement: 0.9919). Zero points
(symmetric=false) give 0.9907 at 0.160x.

Forms, i.e. how the codes are stored and computed:
* nbits    com.microsoft::MatMulNBits, onnxruntime's fused kernel. Which widths its CPU kernel takes
           is asked of the installed runtime (onnxruntime 1.32: 2, 4 and 8 bits; 3, 5, 6, 7 fail to load).
* dql      DequantizeLinear with block_size (opset 21; older models are upgraded) in front of the
           original MatMul/Gemm: portable ONNX. Codes live in an int4/uint4 container up to 4 bits
           (2- and 3-bit codes take 4 bits there) and in int8/uint8 above.
* library  ai.onnxshrink::DequantizePacked (our op library) in front of the MatMul/Gemm: codes packed
           at exactly `bits` bits, so 2/3-bit files really are smaller; dequantized on every run.
* auto     nbits where the runtime's kernel takes the width and the node fits it, else library for
           2/3 bits when the op library is installed, else dql.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from itertools import islice

import numpy as np
import onnx
import scipy.linalg
from onnx import TensorProto, helper, numpy_helper

from onnxshrink import ops
from onnxshrink.activations import Gram, main_graph_tensors, stream_tensors
from onnxshrink.errors import OnnxShrinkError, UsageError
from onnxshrink.graph import (all_names, attribute, constants_to_initializers, opset_version, outer_scope_names,
                              subgraphs, unique_name, walk_nodes)
from onnxshrink.options import PassOptions, option
from onnxshrink.packing import pack_codes
from onnxshrink.pass_base import Note, Pass, PassContext, PassOutput
from onnxshrink.registry import register_pass
from onnxshrink.runtime import make_session

MS_DOMAIN = "com.microsoft"
DQL_OPSET = 21  # first opset whose DequantizeLinear takes block_size and int4
INT4_IR = 10  # first IR version with int4/uint4 tensors
DAMPING = 0.1  # GPTQ damping: this fraction of the Hessian's mean diagonal is added to it (see the docstring)
LAZY_ROWS = 128  # GPTQ updates the rows past a batch of this many in one matmul
CLIP_RATIOS = np.linspace(1.0, 0.5, 11)  # block ranges tried, full first so that ties keep it
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass
class Quantized:
    """Codes of one weight W[K, N] and what turns them back into floats."""

    codes: np.ndarray  # uint8 [K, N], 0 .. 2**bits - 1
    scales: np.ndarray  # float32 [n_blocks, N]; may be negative (see _block_params)
    zero_points: np.ndarray | None  # uint8 [n_blocks, N]; None: 2**(bits-1) (symmetric)
    bits: int
    block: int

    def zero_grid(self) -> np.ndarray:
        if self.zero_points is not None:
            return self.zero_points
        return np.full(self.scales.shape, 1 << (self.bits - 1), np.uint8)

    def dequantize(self) -> np.ndarray:
        """float32 [K, N] as the runtimes compute it: integer subtraction, then one float32 multiply."""
        rows = np.arange(self.codes.shape[0]) // self.block
        diff = self.codes.astype(np.int32) - self.zero_grid().astype(np.int32)[rows]
        return diff.astype(np.float32) * self.scales[rows]


@dataclass
class _Weight:
    """One float initializer and the MatMul/Gemm nodes that read it as B."""

    name: str
    consumers: list
    stored_kn: bool  # laid out [K, N] (MatMul, Gemm transB=0); else [N, K] (Gemm transB=1)
    form: str = ""


@register_pass("quantize-weights")
class QuantizeWeights(Pass):
    summary = "Weight-only block-wise quantization (2-8 bits, rtn or GPTQ) of MatMul/Gemm weights."
    # Class-wide: true because method=gptq reads calibration data; an instance says what its own
    # options need (rtn reads none; only form=library, or auto at 2/3 bits, writes ai.onnxshrink ops).
    # The runtime registers the op library for any model that imports ai.onnxshrink, so a wrong
    # guess here costs nothing but a warning.
    needs_data = True
    needs_library = False

    @dataclass(frozen=True)
    class Options(PassOptions):
        bits: int = option(4, "bits per weight code", low=2, high=8)
        block: int = option(32, "weights per scale: consecutive inputs along the reduction axis of one output column",
                            choices=(16, 32, 64, 128, 256))
        method: str = option("rtn", "rtn: round to nearest; gptq: GPTQ, rounding errors compensated using calibration data",
                             choices=("rtn", "gptq"))
        symmetric: bool = option(True, "signed codes and no zero point; false: a zero point per block")
        form: str = option("auto", "nbits: com.microsoft MatMulNBits; dql: opset-21 DequantizeLinear (portable); "
                           "library: ai.onnxshrink DequantizePacked (exact bit packing); auto: nbits where onnxruntime's "
                           "CPU kernel takes the width, else library for 2/3 bits if installed, else dql",
                           choices=("auto", "dql", "nbits", "library"))
        accuracy_level: int = option(4, "MatMulNBits accuracy_level: 0 computes in float32; 4 lets onnxruntime "
                                     "quantize activations to int8 (faster, about 0.5% more output error)", low=0, high=4)
        include: tuple[str, ...] = option((), "only these op types (MatMul, Gemm) or node names (empty: all)")
        exclude: tuple[str, ...] = option((), "op types or node names whose weights stay float")
        min_elements: int = option(4096, "weights with fewer elements stay float", low=0)
        max_samples: int = option(128, "calibration samples GPTQ reads at most", low=1)
        act_order: bool = option(True, "GPTQ: quantize inputs in descending order of their Hessian diagonal, block scales "
                                 "fixed up front; false: in index order, each block's scale from its updated weights")
        damping: float = option(DAMPING, "GPTQ: this fraction of the Hessian's mean diagonal is added to it; more "
                                "trusts the calibration data less", low=0.001, high=10)

    def __init__(self, options: PassOptions | None = None, **values):
        super().__init__(options, **values)
        opts = self.options
        self.needs_data = opts.method == "gptq"
        self.needs_library = opts.form == "library" or (opts.form == "auto" and opts.bits in (2, 3) and ops.has_library())

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassOutput:
        opts = self.options
        if opset_version(model) is None:
            raise OnnxShrinkError("quantize-weights: the model imports no default-domain opset")
        if opts.form == "nbits" and not nbits_runs(opts.bits, opts.block):
            widths = ", ".join(str(b) for b in range(2, 9) if nbits_runs(b, opts.block))
            raise UsageError(f"quantize-weights: onnxruntime's CPU MatMulNBits takes bits {widths}, not {opts.bits}; "
                             "use form=library or form=dql")
        if opts.form == "library":
            ops.library_path()  # raises the one-line "not installed" error
        if opts.method == "gptq" and context.data is None:
            raise OnnxShrinkError("quantize-weights method=gptq needs calibration data (--calib)")
        _refuse_quantized_or_half(model.graph)
        checked = _passes_checker(model)  # an input the checker rejects cannot come out accepted
        # Constant nodes feeding MatMul/Gemm B become initializers, so one kind of weight is handled.
        constants_to_initializers(model.graph, only={n.input[1] for n in model.graph.node
                                                     if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1})

        notes: list[Note] = []
        weights = self._plan(model, notes)
        if any(w.form == "dql" for w in weights) and opset_version(model) < DQL_OPSET:
            upgraded = _upgrade(model, opts.form == "dql")
            if upgraded is None:  # auto: the weights meant for dql stay float
                for w in weights:
                    if w.form == "dql":
                        notes.append(Note(_where(w.consumers[0]), f"kept float: DequantizeLinear needs opset {DQL_OPSET} "
                                          f"and converting this opset-{opset_version(model)} model failed"))
                weights = [w for w in weights if w.form != "dql"]
            else:
                model, notes = upgraded, []
                weights = self._plan(model, notes)  # the converter may rebuild nodes: plan on its output
        if not weights:
            if not notes:
                notes.append(Note("(graph)", "no MatMul/Gemm with a constant float32 weight"))
            return PassOutput(model, notes)

        hessians = self._hessians(model, weights, context, notes) if opts.method == "gptq" else {}
        rewriter = _Rewriter(model, opts)
        factor_of: tuple = ((), None)  # the last Hessian factored: readers of one input (Q, K, V) come together
        for weight in context.progress(weights, desc="quantize", unit="weight"):
            matrix = numpy_helper.to_array(rewriter.initializers[weight.name]).astype(np.float64)
            matrix = matrix if weight.stored_kn else matrix.T
            method, factor = "rtn", None
            if weight.name in hessians:
                keys, parts = hessians[weight.name]
                if factor_of[0] != keys:
                    try:
                        factor_of = (keys, hessian_factor(sum(parts.values()), opts.act_order, opts.damping))
                    except np.linalg.LinAlgError:
                        factor_of = (keys, None)
                factor = factor_of[1]
                if factor is None:
                    notes.append(Note(_where(weight.consumers[0]), "GPTQ: Hessian not positive definite even damped; rtn instead"))
            if factor is not None:
                quantized, method = gptq(matrix, factor, opts.bits, opts.block, opts.symmetric), "gptq"
            else:
                quantized = rtn(matrix, opts.bits, opts.block, opts.symmetric)
            stored = rewriter.emit(weight, quantized)
            shared = f" (shared by {len(weight.consumers)} nodes)" if len(weight.consumers) > 1 else ""
            notes.append(Note(_where(weight.consumers[0]), f"{opts.bits}-bit {method}, block {opts.block}, {weight.form}: "
                              f"{matrix.size * 4} -> {stored} B{shared}"))
        rewriter.finish()
        _verify(model, checked)
        return PassOutput(model, notes)

    # ----------------------------------------------------------------- planning

    def _selected(self, node: onnx.NodeProto) -> bool:
        opts = self.options
        if opts.include and node.op_type not in opts.include and node.name not in opts.include:
            return False
        return node.op_type not in opts.exclude and node.name not in opts.exclude

    def _plan(self, model: onnx.ModelProto, notes: list[Note]) -> list[_Weight]:
        """The weights to quantize and the form of each; a note for every MatMul/Gemm left float."""
        opts, graph = self.options, model.graph
        initializers = {t.name: t for t in graph.initializer}
        overridable = {i.name for i in graph.input}  # old exporters list weights as inputs too
        for node in graph.node:
            for sub in subgraphs(node):
                for inner in walk_nodes(sub):
                    if inner.op_type in ("MatMul", "Gemm") and inner.domain in _DEFAULT_DOMAINS:
                        notes.append(Note(_where(inner), "kept float: in a subgraph (If/Loop/Scan body)"))
        weights: dict[str, _Weight] = {}
        for node in graph.node:
            if node.op_type not in ("MatMul", "Gemm") or node.domain not in _DEFAULT_DOMAINS or not self._selected(node):
                continue
            name, where = node.input[1], _where(node)
            tensor = initializers.get(name)
            if tensor is None:
                notes.append(Note(where, "kept float: B is computed, not a constant weight"))
            elif name in overridable:
                notes.append(Note(where, f"kept float: weight '{name}' is also a graph input (callers may override it)"))
            elif tensor.data_type != TensorProto.FLOAT:
                notes.append(Note(where, f"kept float: weight is {TensorProto.DataType.Name(tensor.data_type).lower()}, not float32"))
            elif len(tensor.dims) != 2:
                notes.append(Note(where, f"kept float: weight is {len(tensor.dims)}-D, not 2-D"))
            elif int(np.prod(tensor.dims)) < opts.min_elements:
                notes.append(Note(where, f"kept float: {int(np.prod(tensor.dims))} elements < min_elements {opts.min_elements}"))
            else:
                stored_kn = not (node.op_type == "Gemm" and attribute(node, "transB", 0))
                weights.setdefault(name, _Weight(name, [], stored_kn)).consumers.append(node)

        readers = _readers(graph)
        kept = []
        for weight in weights.values():
            problem = self._sharing_problem(weight, readers[weight.name], graph)
            if problem is None:
                weight.form, problem = self._form(weight)
            if problem is None:
                kept.append(weight)
            else:
                notes.extend(Note(_where(node), f"kept float: {problem}") for node in weight.consumers)
        return kept

    def _sharing_problem(self, weight: _Weight, readers: list, graph: onnx.GraphProto) -> str | None:
        """Why the weight cannot be replaced for every reader, or None."""
        ours = {id(node) for node in weight.consumers}
        for node, index in readers:
            if node is None:
                return f"weight '{weight.name}' is also read inside a subgraph"
            if id(node) not in ours or index != 1:
                return f"weight '{weight.name}' is also read by {node.op_type} '{_where(node)}'"
        if weight.name in {o.name for o in graph.output}:
            return f"weight '{weight.name}' is also a graph output"
        orientations = {not (n.op_type == "Gemm" and attribute(n, "transB", 0)) for n in weight.consumers}
        if len(orientations) > 1:
            return f"weight '{weight.name}' is read both transposed and not"
        return None

    def _form(self, weight: _Weight) -> tuple[str, str | None]:
        opts = self.options
        fits = all(_fits_nbits(node) for node in weight.consumers)
        if opts.form == "auto":
            if fits and nbits_runs(opts.bits, opts.block):
                return "nbits", None
            if opts.bits in (2, 3) and ops.has_library():
                return "library", None
            return "dql", None
        if opts.form == "nbits" and not fits:
            return "", "MatMulNBits cannot express Gemm alpha/beta/transA; use form=dql or library"
        return opts.form, None

    # ----------------------------------------------------------------- GPTQ statistics

    def _hessians(self, model: onnx.ModelProto, weights: list[_Weight], context: PassContext,
                  notes: list[Note]) -> dict[str, tuple]:
        """weight -> the inputs its readers see, as (tensor, transposed) keys; and key -> sum x^T x."""
        tappable = main_graph_tensors(model)
        initializers = {t.name: t for t in model.graph.initializer}
        layer_inputs: dict[str, tuple] = {}
        sums: dict[tuple[str, bool], Gram] = {}
        for weight in weights:
            keys = tuple(sorted({(node.input[0], node.op_type == "Gemm" and bool(attribute(node, "transA", 0)))
                                 for node in weight.consumers}))
            if not all(name in tappable for name, _ in keys):
                notes.append(Note(_where(weight.consumers[0]), "GPTQ: the layer input cannot be observed (a constant); rtn instead"))
                continue
            layer_inputs[weight.name] = keys
            dims = initializers[weight.name].dims
            for key in keys:
                sums.setdefault(key, Gram(dims[0] if weight.stored_kn else dims[1]))
        if sums:
            names = sorted({name for name, _ in sums})
            samples = islice(iter(context.data), self.options.max_samples)
            for values in stream_tensors(model, names, samples, context.progress):
                for (name, transposed), gram in sums.items():
                    x = np.asarray(values[name])
                    gram.add((x.T if transposed else x).reshape(-1, gram.size))
        return {weight: (keys, {key: sums[key].total() for key in keys}) for weight, keys in layer_inputs.items()}


# --------------------------------------------------------------------- quantizers


def _block_params(group: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scales (float32) and zero points (uint8) of blocks `group[..., rows, N]`, one per column.

    The range is the block's own, shrunk by the ratio in CLIP_RATIOS that gives the least squared
    error: clipping a few large weights buys a finer step for all the others (on MiniLM, held-out
    cosine: 2-bit GPTQ goes from 0.83 to 0.85 with it, 3-bit rtn from 0.91 to 0.92)."""
    half, top = 1 << (bits - 1), (1 << bits) - 1
    if symmetric:
        # The weight of largest magnitude maps to the most negative code -2**(bits-1), so every
        # level is used (the scale is negative when that weight is positive). Dividing the largest
        # |w| by 2**(bits-1) - 1 instead leaves one level unused: on MiniLM that triples the 2-bit
        # weight error and adds a quarter at 4 bits.
        index = np.abs(group).argmax(axis=-2)[..., None, :]
        extreme = np.take_along_axis(group, index, axis=-2)[..., 0, :]
        zeros = np.full(extreme.shape, half, np.uint8)
    else:
        # 0 stays inside the range, so zero weights (and K padding) are exact.
        low = np.minimum(group.min(axis=-2), 0.0)
        high = np.maximum(group.max(axis=-2), 0.0)
    best_error = best_scales = best_zeros = None
    for ratio in CLIP_RATIOS:
        if symmetric:
            scales = (-extreme * ratio / half).astype(np.float32)
        else:
            scales = ((high - low) * ratio / top).astype(np.float32)
        scales[scales == 0] = 1.0  # an all-zero block: any scale represents it
        if not symmetric:
            zeros = np.clip(np.rint(-low * ratio / scales), 0, top).astype(np.uint8)
        codes = _round(group, scales[..., None, :], zeros[..., None, :], bits)
        error = (((codes - zeros[..., None, :].astype(np.float64)) * scales[..., None, :] - group) ** 2).sum(axis=-2)
        if best_error is None:
            best_error, best_scales, best_zeros = error, scales, zeros
        else:
            better = error < best_error
            best_error = np.where(better, error, best_error)
            best_scales = np.where(better, scales, best_scales)
            best_zeros = np.where(better, zeros, best_zeros)
    return best_scales, best_zeros


def _round(values: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int) -> np.ndarray:
    codes = np.rint(values / scales.astype(np.float64)) + zeros
    return np.clip(codes, 0, (1 << bits) - 1).astype(np.uint8)


def rtn(matrix: np.ndarray, bits: int, block: int, symmetric: bool) -> Quantized:
    """Round-to-nearest block-wise codes of W[K, N], blocks along K (the last one zero-padded), each
    block's range chosen by least squared error (see _block_params)."""
    k, n = matrix.shape
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n))
    padded[:k] = matrix
    groups = padded.reshape(blocks, block, n)
    scales, zeros = _block_params(groups, bits, symmetric)
    codes = _round(groups, scales[:, None, :], zeros[:, None, :], bits).reshape(-1, n)[:k]
    return Quantized(codes, scales, None if symmetric else zeros, bits, block)


@dataclass
class HessianFactor:
    """What GPTQ needs of H[K, K]: the order inputs are quantized in, the upper U with
    U^T U = (P (H + damping) P^T)^-1 for that order's permutation P, and the dead inputs."""

    upper: np.ndarray  # float64 [K, K], rows and columns in `order`
    dead: np.ndarray  # bool [K], by input index
    order: np.ndarray  # int [K]: order[i] is the input quantized i-th


def hessian_factor(hessian: np.ndarray, act_order: bool = True, damping: float = DAMPING) -> HessianFactor:
    """Factor H[K, K] for `gptq`: with act_order, inputs in descending order of H's diagonal.

    Inputs that never fire (H diagonal 0) get diagonal 1: their weights are zeroed, so any value works.
    The damping starts at `damping` times the mean diagonal and grows tenfold while H is not positive definite."""
    diagonal = np.array(np.diagonal(hessian), np.float64)
    dead = diagonal == 0
    order = np.argsort(-diagonal, kind="stable") if act_order else np.arange(len(diagonal))
    # With H permuted to `order` and J the order reversal, chol(J H J) = M gives H = R R^T for the
    # upper R = J M J, so U = R^-1 is the upper factor of H^-1: one Cholesky and one triangular inverse.
    reversed_order = order[::-1]
    reversed_h = np.array(np.asarray(hessian, np.float64)[np.ix_(reversed_order, reversed_order)], order="F")
    reversed_diagonal = np.einsum("ii->i", reversed_h)  # a writable view
    reversed_diagonal[reversed_diagonal == 0] = 1.0
    damp = damping * float(np.mean(reversed_diagonal))
    added = 0.0
    for _ in range(4):
        reversed_diagonal += damp - added
        added = damp
        factor, info = scipy.linalg.lapack.dpotrf(reversed_h, lower=1, clean=1)
        if info == 0:
            inverse, info = scipy.linalg.lapack.dtrtri(factor, lower=1)
            if info == 0:
                return HessianFactor(np.ascontiguousarray(inverse[::-1, ::-1]), dead, order)
        damp *= 10
    raise np.linalg.LinAlgError("Hessian is not positive definite")


def gptq(matrix: np.ndarray, factor: HessianFactor, bits: int, block: int, symmetric: bool) -> Quantized:
    """GPTQ codes of W[K, N] given `hessian_factor` of its layer-input Hessian (Frantar et al. 2022).

    Rows (input features) are quantized in `factor.order`. With U the upper Cholesky factor of H^-1
    in that order, the error of the i-th row quantized, e = (w_i - q_i) / U[i, i], is compensated by
    w_j -= U[i, j] e on every later row j: the least-squares optimal update of the rows left. The
    updates are applied lazily, at three levels: row by row inside a chunk of `block` rows, by one
    matmul to the rest of the current batch of LAZY_ROWS rows when a chunk is done, and by one to
    the rows past the batch when the batch is done.

    Block scales: in index order, a block's scale is chosen when the block is reached, from its
    updated weights. In any other order (act-order) a block's rows are spread over the whole pass,
    so the scales are chosen up front from W itself ("static groups"): the stored blocks stay
    contiguous along K, as every form needs."""
    upper, dead, order = factor.upper, factor.dead, factor.order
    w = np.array(matrix, np.float64)
    w[dead] = 0.0
    k, n = w.shape
    blocks = -(-k // block)
    in_order = bool(np.all(order == np.arange(k)))
    if in_order:
        scales = np.empty((blocks, n), np.float32)
        zeros = np.empty((blocks, n), np.uint8)
    else:
        padded = np.zeros((blocks * block, n))
        padded[:k] = w
        scales, zeros = _block_params(padded.reshape(blocks, block, n), bits, symmetric)
        w = w[order]
    row_blocks = order // block  # the scale block of the i-th row quantized
    codes = np.empty((k, n), np.uint8)  # in quantization order
    step = max(LAZY_ROWS, block)  # a multiple of block: every chunk lies inside one batch
    for batch_start in range(0, k, step):
        batch_stop = min(batch_start + step, k)
        errors = np.empty((batch_stop - batch_start, n))
        for start in range(batch_start, batch_stop, block):
            stop = min(start + block, k)
            rows = w[start:stop]  # a view: updated in place
            if in_order:
                b = start // block
                scales[b], zeros[b] = _block_params(rows, bits, symmetric)
            for i in range(stop - start):
                row = start + i
                b = row_blocks[row]
                codes[row] = _round(rows[i], scales[b], zeros[b], bits)
                dequantized = (codes[row].astype(np.int32) - zeros[b]).astype(np.float32) * scales[b]
                error = errors[row - batch_start] = (rows[i] - dequantized) / upper[row, row]
                rows[i + 1:] -= np.outer(upper[row, row + 1:stop], error)
            w[stop:batch_stop] -= upper[start:stop, stop:batch_stop].T @ errors[start - batch_start:stop - batch_start]
        w[batch_stop:] -= upper[batch_start:batch_stop, batch_stop:].T @ errors
    if not in_order:
        codes[order] = codes.copy()
    return Quantized(codes, scales, None if symmetric else zeros, bits, block)


# --------------------------------------------------------------------- graph rewriting


class _Rewriter:
    """Replaces weights by their packed forms; nodes are spliced in when `finish` runs."""

    def __init__(self, model: onnx.ModelProto, opts):
        self.model, self.opts = model, opts
        self.graph = model.graph
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.names = all_names(model)
        self.before: dict[int, list] = {}  # id(node) -> nodes to put in front of it
        self.instead: dict[int, list] = {}  # id(node) -> nodes that replace it
        self.removed: set[str] = set()
        self.domains: set[str] = set()

    def emit(self, weight: _Weight, q: Quantized) -> int:
        """Rewrite one weight's readers; returns the bytes the packed weight takes."""
        tensors = getattr(self, f"_{weight.form}")(weight, q)
        self.graph.initializer.extend(tensors)
        self.removed.add(weight.name)
        return sum(len(t.raw_data) if t.raw_data else numpy_helper.to_array(t).nbytes for t in tensors)

    def _new(self, base: str) -> str:
        return unique_name(base, self.names)

    def _nbits(self, weight: _Weight, q: Quantized) -> list:
        k, n = q.codes.shape
        blocks = q.scales.shape[0]
        # B[N, blocks, block*bits/8]: each output column's codes along K, LSB-first, the last block
        # padded with its zero point (the kernel reads only K of them).
        columns = np.empty((n, blocks * q.block), np.uint8)
        columns[:, :k] = q.codes.T
        columns[:, k:] = q.zero_grid()[-1][:, None]
        packed = pack_codes(columns, q.bits).reshape(n, blocks, q.block * q.bits // 8)
        b_name, s_name = self._new(f"{weight.name}_q{q.bits}"), self._new(f"{weight.name}_scales")
        tensors = [numpy_helper.from_array(packed, b_name), numpy_helper.from_array(np.ascontiguousarray(q.scales.T), s_name)]
        inputs = [b_name, s_name]
        if q.zero_points is not None:
            # Zero points: [N, ceil(blocks*bits/8)], each column's row packed like B and byte-padded.
            zp = np.stack([pack_codes(column, q.bits) for column in q.zero_points.T])
            z_name = self._new(f"{weight.name}_zero_points")
            tensors.append(numpy_helper.from_array(zp, z_name))
            inputs.append(z_name)
        for node in weight.consumers:
            self.instead[id(node)] = self._matmul_nbits(node, inputs, k, n, q)
        self.domains.add(MS_DOMAIN)
        return tensors

    def _matmul_nbits(self, node: onnx.NodeProto, packed: list, k: int, n: int, q: Quantized) -> list:
        inputs = [node.input[0], *packed]
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else ""
        output, tail = node.output[0], []
        if bias:
            tensor = self.initializers.get(bias)
            if tensor is not None and list(tensor.dims) == [n]:
                inputs += [""] * (5 - len(inputs)) + [bias]  # zero_points, g_idx unused
            else:  # a bias MatMulNBits cannot take ([M, N], scalar, computed): added after it
                output = self._new(f"{node.output[0]}_matmul")
                tail = [helper.make_node("Add", [output, bias], [node.output[0]], name=self._new(f"{_where(node)}_bias"))]
        fused = helper.make_node("MatMulNBits", inputs, [output], name=node.name or self._new("MatMulNBits"),
                                 domain=MS_DOMAIN, K=k, N=n, bits=q.bits, block_size=q.block,
                                 accuracy_level=self.opts.accuracy_level)
        return [fused, *tail]

    def _dql(self, weight: _Weight, q: Quantized) -> list:
        signed = q.zero_points is None
        small = q.bits <= 4
        dtype = {(True, True): TensorProto.INT4, (True, False): TensorProto.INT8,
                 (False, True): TensorProto.UINT4, (False, False): TensorProto.UINT8}[(signed, small)]
        values = q.codes.astype(np.int16) - (1 << (q.bits - 1)) if signed else q.codes
        axis = 0 if weight.stored_kn else 1
        orient = (lambda a: a) if weight.stored_kn else (lambda a: np.ascontiguousarray(a.T))
        q_name, s_name = self._new(f"{weight.name}_q{q.bits}"), self._new(f"{weight.name}_scales")
        tensors = [_integer_tensor(q_name, dtype, orient(values)), numpy_helper.from_array(orient(q.scales), s_name)]
        inputs = [q_name, s_name]
        if not signed:
            z_name = self._new(f"{weight.name}_zero_points")
            tensors.append(_integer_tensor(z_name, dtype, orient(q.zero_points)))
            inputs.append(z_name)
        # The dequantized weight takes the initializer's name: its readers stay as they are.
        node = helper.make_node("DequantizeLinear", inputs, [weight.name], name=self._new(f"{weight.name}_dequantize"),
                                axis=axis, block_size=q.block)
        self._in_front(weight.consumers[0], [node])
        return tensors

    def _library(self, weight: _Weight, q: Quantized) -> list:
        # DequantizePacked blocks run along the last axis, so the codes are stored as W^T[N, K].
        k, n = q.codes.shape
        c_name, s_name = self._new(f"{weight.name}_q{q.bits}"), self._new(f"{weight.name}_scales")
        tensors = [numpy_helper.from_array(pack_codes(q.codes.T, q.bits), c_name),
                   numpy_helper.from_array(np.ascontiguousarray(q.scales.T), s_name)]
        inputs = [c_name, s_name]
        if q.zero_points is not None:  # symmetric codes use the op's implicit zero point 2**(bits-1)
            z_name = self._new(f"{weight.name}_zero_points")
            tensors.append(numpy_helper.from_array(np.ascontiguousarray(q.zero_points.T), z_name))
            inputs.append(z_name)
        transposed = weight.name if not weight.stored_kn else self._new(f"{weight.name}_nk")
        nodes = [helper.make_node("DequantizePacked", inputs, [transposed], name=self._new(f"{weight.name}_dequantize"),
                                  domain=ops.DOMAIN, bits=q.bits, block_size=q.block, shape=[n, k])]
        if weight.stored_kn:
            if all(node.op_type == "Gemm" for node in weight.consumers):
                for node in weight.consumers:  # Gemm reads W^T itself
                    _set_attr(node, "transB", 1)
                    node.input[1] = transposed
            else:  # a MatMul needs W[K, N] back: one Transpose, under the old name
                nodes.append(helper.make_node("Transpose", [transposed], [weight.name], perm=[1, 0],
                                              name=self._new(f"{weight.name}_transpose")))
        self._in_front(weight.consumers[0], nodes)
        self.domains.add(ops.DOMAIN)
        return tensors

    def _in_front(self, node: onnx.NodeProto, nodes: list) -> None:
        self.before.setdefault(id(node), []).extend(nodes)

    def finish(self) -> None:
        graph, model = self.graph, self.model
        rebuilt = []
        for node in graph.node:
            rebuilt.extend(self.before.get(id(node), []))
            rebuilt.extend(self.instead.get(id(node), [node]))
        del graph.node[:]
        graph.node.extend(rebuilt)
        # Readers of a removed weight are all rewritten (or read a node output of the same name).
        kept = [t for t in graph.initializer if t.name not in self.removed]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        produced = {name for node in graph.node for name in node.output}
        stale = [v for v in graph.value_info if v.name in self.removed and v.name not in produced]
        for value in stale:
            graph.value_info.remove(value)
        for domain in sorted(self.domains):
            if opset_version(model, domain) is None:
                model.opset_import.append(helper.make_opsetid(domain, 1))
        if any(n.op_type == "DequantizeLinear" for n in graph.node):
            model.ir_version = max(model.ir_version, INT4_IR)


# --------------------------------------------------------------------- helpers


@lru_cache(maxsize=None)
def nbits_runs(bits: int, block: int) -> bool:
    """Whether the installed onnxruntime's CPU MatMulNBits kernel loads at this width and block."""
    k, n = block, 1
    packed = np.zeros((n, 1, block * bits // 8), np.uint8)
    node = helper.make_node("MatMulNBits", ["a", "b", "s"], ["y"], domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=block)
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(np.ones((n, 1), np.float32), "s")])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)])
    try:
        make_session(probe)
        return True
    except OnnxShrinkError:
        return False


def _integer_tensor(name: str, dtype: int, values: np.ndarray) -> onnx.TensorProto:
    if dtype in (TensorProto.INT4, TensorProto.UINT4):
        # Two 4-bit values a byte, the first in the low nibble: the same LSB-first stream as pack_codes.
        nibbles = (np.asarray(values).astype(np.int16) & 0xF).astype(np.uint8)
        return helper.make_tensor(name, dtype, values.shape, pack_codes(nibbles, 4).tobytes(), raw=True)
    return numpy_helper.from_array(values.astype(np.int8 if dtype == TensorProto.INT8 else np.uint8), name)


def _fits_nbits(node: onnx.NodeProto) -> bool:
    """MatMulNBits computes A @ W + bias: a Gemm with alpha, beta or transA set does not fit."""
    if node.op_type != "Gemm":
        return True
    has_bias = len(node.input) > 2 and bool(node.input[2])
    return (attribute(node, "alpha", 1.0) == 1.0 and not attribute(node, "transA", 0)
            and (not has_bias or attribute(node, "beta", 1.0) == 1.0))



def _set_attr(node: onnx.NodeProto, name: str, value) -> None:
    for attr in node.attribute:
        if attr.name == name:
            node.attribute.remove(attr)
            break
    node.attribute.append(helper.make_attribute(name, value))


def _where(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def _readers(graph: onnx.GraphProto) -> dict[str, list]:
    """tensor name -> (node, input index) of every main-graph reader; (None, -1) for a subgraph capture."""
    readers: dict[str, list] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name:
                readers.setdefault(name, []).append((node, index))
        for sub in subgraphs(node):
            for name in outer_scope_names(sub):
                readers.setdefault(name, []).append((None, -1))
    return readers


def _refuse_quantized_or_half(graph: onnx.GraphProto) -> None:
    """A model whose MatMul/Gemm weights are all quantized or float16 already is a mistake to run on."""
    initializers = {t.name: t for t in graph.initializer}
    constant = {n.output[0]: next((a.t for a in n.attribute if a.name == "value"), None)
                for n in graph.node if n.op_type == "Constant" and n.output}
    producers = {name: node for node in graph.node for name in node.output}
    weight_types = []
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm") and node.domain in _DEFAULT_DOMAINS and len(node.input) > 1:
            name = node.input[1]
            source = producers.get(name)
            if source is not None and source.op_type == "Cast":  # fp16 stores weights float16 behind a Cast
                name = source.input[0]
                source = producers.get(name)
            tensor = initializers[name] if name in initializers else constant.get(name)
            if tensor is not None:
                weight_types.append(tensor.data_type)
            elif source is not None and source.op_type in ("DequantizeLinear", "DequantizePacked"):
                weight_types.append("quantized")
    if TensorProto.FLOAT in weight_types:
        return
    fused = sum(1 for n in graph.node if n.op_type == "MatMulNBits")
    if fused or "quantized" in weight_types:
        raise OnnxShrinkError("quantize-weights: the model's MatMul/Gemm weights are quantized already "
                              f"({fused or weight_types.count('quantized')} quantized, none float32); run it on the float model")
    if TensorProto.FLOAT16 in weight_types:
        raise OnnxShrinkError("quantize-weights: the MatMul/Gemm weights are float16; run quantize-weights before fp16")


def _upgrade(model: onnx.ModelProto, required: bool) -> onnx.ModelProto | None:
    """The model converted to opset 21; None (or, when `required`, an error) if the converter fails."""
    from onnx import version_converter

    version = opset_version(model)
    try:
        upgraded = version_converter.convert_version(model, DQL_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as exc:  # the converter raises several types for ops it cannot adapt
        if not required:
            return None
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise OnnxShrinkError(f"quantize-weights form=dql needs opset {DQL_OPSET}; converting this opset-{version} "
                              f"model failed: {reason}") from None
    upgraded.ir_version = max(upgraded.ir_version, INT4_IR)
    return upgraded


def _passes_checker(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model)
        return True
    except Exception:  # ValidationError and friends
        return False


def _verify(model: onnx.ModelProto, check: bool) -> None:
    """Never hand on a model that the checker rejects (when it accepted the input) or onnxruntime cannot load."""
    if check:
        try:
            onnx.checker.check_model(model)
        except Exception as exc:  # ValidationError and friends
            raise OnnxShrinkError(f"quantize-weights produced a model that fails the ONNX checker: "
                                  f"{str(exc).splitlines()[0][:300]}") from None
    try:
        make_session(model)
    except OnnxShrinkError as exc:
        raise OnnxShrinkError(f"quantize-weights produced a model onnxruntime rejects ({exc})") from None
