"""`lower`: pruned, clustered and weight-quantized MatMul/Gemm rewritten into kernels that gain from it.

Stock onnxruntime gains nothing from zeros (sparse initializers are densified at load) and has no
kernel for 3-bit or clustered weights. This pass finds, per MatMul/Gemm with a constant weight
W[K, N] (the B input; Gemm with transA=0, alpha=1, transB either way):

* pruned weights (exact zeros): ai.onnxshrink::SparseMatMul, in the format the zero pattern
  suits: `2:4` when every group of 4 consecutive k has at most 2 nonzeros, `blocked` when the
  nonzeros sit in block_k x block_n tiles (few explicit zeros stored), else `csr`;
* clustered weights (at most 256 distinct values, or per column): ai.onnxshrink::LowBitMatMul in
  codebook mode, codes of the fewest bits in {2, 3, 4, 8} that index every value, one table or one
  per column; the weights `cluster` stores as codes plus a decoder are read through the decoder
  (which then goes with the layer);
* weight-quantized layers as quantize-weights writes them (com.microsoft::MatMulNBits,
  DequantizeLinear with block_size, ai.onnxshrink::DequantizePacked in front of the MatMul/Gemm):
  ai.onnxshrink::LowBitMatMul with the same codes, scales and zero points.

`target` says what the output may use. `onnxshrink`: the ops above (needs the op library).
`ort`: stock onnxruntime, so quantized layers become MatMulNBits where the installed runtime's CPU
kernel takes the width and the node fits it, else DequantizeLinear (opset 21); pruned and
clustered weights stay dense, since no stock kernel gains from them. `portable`: standard ONNX
only, quantized layers as DequantizeLinear + MatMul/Gemm.

A layer is rewritten into one of our ops only where the cost model predicts at least `min_gain`
times the speed of what it replaces at `batch` rows of A (tokens times batch). The model is
time = max(bytes read / bandwidth, work / throughput) per kernel, with the constants in
KERNEL_COSTS measured on an AMD EPYC (Zen 3, AVX2) with benchmarks/kernels.py; a note per layer
gives the figures. Layers it predicts no gain for stay as they are, with a note.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxshrink import ops
from onnxshrink.errors import OnnxShrinkError
from onnxshrink.graph import (all_names, attribute, drop_unused_initializers, opset_version, outer_scope_names,
                              replace_nodes, subgraphs, unique_name)
from onnxshrink.options import PassOptions, option
from onnxshrink.packing import pack_codes, unpack_codes
from onnxshrink.pass_base import Note, Pass, PassContext, PassOutput
from onnxshrink.passes.quantize_weights import Quantized, nbits_runs
from onnxshrink.passes.weight_sharing import codebook_positions, decoder_of
from onnxshrink.registry import register_pass
from onnxshrink.runtime import make_session

MS_DOMAIN = "com.microsoft"
DQL_OPSET = 21  # DequantizeLinear with block_size and int4
_DEFAULT_DOMAINS = ("", "ai.onnx")
LOWBIT_WIDTHS = (2, 3, 4, 8)
MAX_SPARSE_K = 1 << 16  # csr indices are uint16
BLOCK_SHAPES = ((1, 8), (4, 8), (1, 16), (4, 4), (8, 1), (16, 1))  # (block_k, block_n) tried for `blocked`
BLOCKED_MAX_FILL = 1.25  # blocked only if it stores at most this many values per nonzero


# --------------------------------------------------------------------- formats


def csr_arrays(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SparseMatMul `csr` inputs of W[K, N]: values f32 [nnz], indices u16 [nnz] (k of each nonzero),
    offsets i32 [N + 1]; column n's nonzeros are [offsets[n], offsets[n+1]), in k order."""
    k, n = w.shape
    if k > MAX_SPARSE_K:
        raise ValueError(f"csr needs K <= {MAX_SPARSE_K}, got {k}")
    wt = np.ascontiguousarray(np.asarray(w, np.float32).T)
    mask = wt != 0
    columns, ks = np.nonzero(mask)
    offsets = np.zeros(n + 1, np.int32)
    offsets[1:] = np.cumsum(mask.sum(axis=1))
    return wt[columns, ks], ks.astype(np.uint16), offsets


def two_four_fits(w: np.ndarray) -> bool:
    """Whether every group of 4 consecutive k (per column) of W[K, N] holds at most 2 nonzeros."""
    k, n = w.shape
    padded = np.zeros((-(-k // 4) * 4, n), bool)
    padded[:k] = w != 0
    return bool((padded.reshape(-1, 4, n).sum(axis=1) <= 2).all())


def two_four_arrays(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SparseMatMul `2:4` inputs of W[K, N]: values f32 [N, G, 2] (G = ceil(K/4)) and meta u16
    [N, ceil(G/4)] whose bits [4(g%4), 4(g%4)+4) of word g/4 hold group g's two positions (2 bits
    each, first in the low bits). A group with fewer than 2 nonzeros stores zeros at positions that
    exist in K (repeating one if it must)."""
    k, n = w.shape
    groups = -(-k // 4)
    padded = np.zeros((n, groups * 4), np.float32)
    padded[:, :k] = np.asarray(w, np.float32).T
    grouped = padded.reshape(n, groups, 4)
    nonzero = grouped != 0
    if (nonzero.sum(axis=2) > 2).any():
        raise ValueError("some group of 4 consecutive k has more than 2 nonzeros")
    # Nonzero positions first (stable), then the zeros: the first two are the ones stored. A zero
    # kept in the last, partial group must point inside K: sort the positions past K last.
    inside = np.arange(4)[None, None, :] < (k - 4 * np.arange(groups))[None, :, None]
    rank = np.where(nonzero, 0, np.where(inside, 1, 2))
    order = np.argsort(rank, axis=2, kind="stable")[:, :, :2]
    values = np.take_along_axis(grouped, order, axis=2)
    # K % 4 == 1 leaves one position in the last group: the second (zero) slot repeats it.
    order = np.where(4 * np.arange(groups)[None, :, None] + order < k, order, 0)
    nibbles = (order[:, :, 0] | (order[:, :, 1] << 2)).astype(np.uint16)
    words = -(-groups // 4)
    padded_nibbles = np.zeros((n, words * 4), np.uint16)
    padded_nibbles[:, :groups] = nibbles
    shifts = (np.arange(4, dtype=np.uint16) * 4)[None, None, :]
    meta = (padded_nibbles.reshape(n, words, 4) << shifts).sum(axis=2).astype(np.uint16)
    return np.ascontiguousarray(values), meta


def blocked_arrays(w: np.ndarray, block_k: int, block_n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SparseMatMul `blocked` inputs of W[K, N]: the block_k x block_n tiles with a nonzero, per strip
    of block_n columns in k order: values f32 [tiles, block_k, block_n] (zero past K and N), indices
    u16 [tiles] (k / block_k), offsets i32 [ceil(N / block_n) + 1]."""
    k, n = w.shape
    kb, nb = -(-k // block_k), -(-n // block_n)
    if kb > MAX_SPARSE_K:
        raise ValueError(f"blocked needs ceil(K / block_k) <= {MAX_SPARSE_K}, got {kb}")
    padded = np.zeros((kb * block_k, nb * block_n), np.float32)
    padded[:k, :n] = w
    tiles = padded.reshape(kb, block_k, nb, block_n).transpose(2, 0, 1, 3)  # [strip, k-block, bk, bn]
    keep = (tiles != 0).any(axis=(2, 3))
    strips, kblocks = np.nonzero(keep)
    offsets = np.zeros(nb + 1, np.int32)
    offsets[1:] = np.cumsum(keep.sum(axis=1))
    return np.ascontiguousarray(tiles[strips, kblocks]), kblocks.astype(np.uint16), offsets


def blocked_fill(w: np.ndarray, block_k: int, block_n: int) -> float:
    """Values `blocked` stores per nonzero of W (1.0: every stored value is a nonzero)."""
    k, n = w.shape
    kb, nb = -(-k // block_k), -(-n // block_n)
    padded = np.zeros((kb * block_k, nb * block_n), bool)
    padded[:k, :n] = w != 0
    tiles = int(padded.reshape(kb, block_k, nb, block_n).any(axis=(1, 3)).sum())
    return tiles * block_k * block_n / max(int(padded.sum()), 1)


def lowbit_codes(codes: np.ndarray, bits: int, block: int) -> np.ndarray:
    """LowBitMatMul `codes` of codes[K, N] (uint8 < 2**bits): u8 [N, ceil(K/block), block*bits/8],
    each column's blocks along K packed LSB-first (MatMulNBits' layout), the last block padded."""
    k, n = codes.shape
    blocks = -(-k // block)
    columns = np.zeros((n, blocks * block), np.uint8)
    columns[:, :k] = codes.T
    return pack_codes(columns, bits).reshape(n, blocks, block * bits // 8)


def codebook_of(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(codes[K, N] uint8, table, bits) when W has at most 256 distinct values (table f32 [2**bits]),
    or else at most 256 per column (a table per column, [N, 2**bits], as `cluster(scope=channel)`
    leaves); None otherwise."""
    w = np.asarray(w, np.float32)
    table, inverse = np.unique(w, return_inverse=True)
    if table.size <= 256:
        bits = next(b for b in LOWBIT_WIDTHS if table.size <= 1 << b)
        full = np.zeros(1 << bits, np.float32)
        full[:table.size] = table
        return inverse.reshape(w.shape).astype(np.uint8), full, bits
    columns = [np.unique(column) for column in w.T]
    widest = max(len(c) for c in columns)
    if widest > 256:
        return None
    bits = next(b for b in LOWBIT_WIDTHS if widest <= 1 << b)
    if w.shape[0] * bits / 8 + (1 << bits) * 4 > 2 * w.shape[0]:  # a column's codes and table: half its floats
        return None  # (any column of K <= 256 has <= 256 values: that alone says nothing about clustering)
    tables = np.zeros((w.shape[1], 1 << bits), np.float32)
    codes = np.empty(w.shape, np.uint8)
    for n, values in enumerate(columns):
        tables[n, :len(values)] = values
        codes[:, n] = np.searchsorted(values, w[:, n])
    return codes, tables, bits


# --------------------------------------------------------------------- cost model


@dataclass(frozen=True)
class KernelCost:
    """time_ns = max(bytes / bytes_per_ns, work / work_per_ns): the slower of streaming the weights
    and computing. `work` is what the kernel's time grows with (see predicted_ns)."""

    work_per_ns: float
    bytes_per_ns: float = 0.0  # the rate it streams its weights at where measured apart; 0: BYTES_PER_NS


BYTES_PER_NS = 12.0  # DRAM read bandwidth of one core (12 GB/s measured, numpy sum of 512 MB)
# From benchmarks/kernels.py on the development machine (AMD EPYC Zen 3, AVX2, 1 thread, 4096 x
# 4096 and 768 x 3072, interleaved medians), rounded.
KERNEL_COSTS = {
    "dense": KernelCost(32.0),          # MLAS sgemm: multiply-adds per ns
    "csr-rows": KernelCost(1.5),        # nonzeros x rows per ns (a gathered activation each)
    "csr-tile": KernelCost(14.0),       # multiply-adds per ns on 16-row tiles (csr and 2:4), K <= 2048
    "csr-tile-big-k": KernelCost(9.0),  # the same when the transposed A tile (K x 16 floats) outgrows L2
    "2:4-rows": KernelCost(2.0),        # stored values x rows per ns
    "blocked": KernelCost(24.0),        # stored values x rows per ns (dense tiles: no gather)
    "lowbit-gemv": KernelCost(9.5),     # weights x ceil(rows / 4) per ns (decoding bound, any width), M < 12
    "lowbit-gemm": KernelCost(27.0),    # multiply-adds per ns, dequantization included
    # accuracy_level 4 (int8 activations, any M): (K + INT8_OUTPUT_COST) x rows x N per ns; a
    # column's fixed work per row (block scales, reductions) weighs most at small K. Measured at
    # M = 12..128: K = 384 30-36, 1536 x 384 47-51, 4096 x 4096 52-59 multiply-adds per ns. At
    # M = 1 it streams its weights at about 20 GB/s (software prefetch; 0.50 ms at 4-bit 4096 x 4096).
    "lowbit-int8": KernelCost(61.0, bytes_per_ns=20.0),
    "dequantize": KernelCost(3.0),      # weights per ns: DequantizePacked, MatMulNBits at accuracy 0
    # MatMulNBits accuracy_level 4 (onnxruntime 1.32), M <= 4: weights x rows per ns (34-40 at
    # M = 2 and 4, the same runs); at M = 1 it streams its weights at 12-15 GB/s (0.71-0.86 ms).
    "nbits-int8": KernelCost(36.0, bytes_per_ns=14.0),
    # MatMulNBits accuracy_level 4, M > 4: (K + NBITS_OUTPUT_COST) x rows x N per ns (measured at
    # M = 12..128: K = 384 34-41, 1536 x 384 42-43, 4096 x 4096 45-47 multiply-adds per ns).
    "nbits-int8-gemm": KernelCost(47.0),
}


INT8_OUTPUT_COST = 325  # multiply-add equivalents per output row and column (fits the widths above)
NBITS_OUTPUT_COST = 117
OP_OVERHEAD_NS = 3000.0  # what one call of our ops costs beyond onnxruntime's MatMul (validation, dispatch)
TILE_L2_K = 2048  # up to this K the csr tile kernel's transposed A tile (K x 16 floats) stays in L2


def _time(kind: str, bytes_read: float, work: float) -> float:
    cost = KERNEL_COSTS[kind]
    return max(bytes_read / (cost.bytes_per_ns or BYTES_PER_NS), work / cost.work_per_ns)


def int8_kernel_takes(bits: int, block: int) -> bool:
    """Whether LowBitMatMul's AVX2 int8 kernel (accuracy_level 4) takes this width and block, as
    lowbit_int8_takes_avx2 says: blocks of a multiple of 32 up to 512 that a 32-byte load of codes
    (128 codes at 2 bits, 64 at 4, 32 otherwise) divides or is divided by. Others run a portable
    loop, slower than the float32 kernel."""
    span = {2: 128, 4: 64}.get(bits, 32)
    return block % 32 == 0 and block <= 512 and (block % span == 0 or span % block == 0)


def predicted_ns(kind: str, m: int, k: int, n: int, *, nnz: int = 0, stored: int = 0, bits: int = 0,
                 block: int = 32, zero_points: bool = False, accuracy_level: int = 4) -> float:
    """Predicted time of one call on m rows for W[k, n]. kind: dense, csr, 2:4, blocked (stored:
    values kept), lowbit, nbits (MatMulNBits), dequantize-dense (a dequantize op in front of a
    dense MatMul, run every call)."""
    weights = k * n
    tile = "csr-tile" if k <= TILE_L2_K else "csr-tile-big-k"
    if kind == "dense":
        return _time("dense", 4 * weights, m * weights)
    if kind == "csr":
        if m < 4:
            return OP_OVERHEAD_NS + _time("csr-rows", 6 * nnz, m * nnz)
        return OP_OVERHEAD_NS + _time(tile, 6 * nnz, -(-m // 16) * 16 * nnz)
    if kind == "2:4":
        stored = weights // 2
        if m < 4:
            return OP_OVERHEAD_NS + _time("2:4-rows", 4 * stored + weights / 8, m * stored)
        return OP_OVERHEAD_NS + _time(tile, 4 * stored + weights / 8, -(-m // 16) * 16 * stored)
    if kind == "blocked":
        return OP_OVERHEAD_NS + _time("blocked", 4 * stored, m * stored)
    code_bytes = weights * (bits / 8 + (4 + zero_points) / block)
    if kind == "lowbit":
        if accuracy_level == 4:  # its time grows with every row (an int8 dot product each)
            return OP_OVERHEAD_NS + _time("lowbit-int8", code_bytes, m * n * (k + INT8_OUTPUT_COST))
        if m < 12:
            return OP_OVERHEAD_NS + _time("lowbit-gemv", code_bytes, -(-m // 4) * weights)
        return OP_OVERHEAD_NS + _time("lowbit-gemm", code_bytes, m * weights)
    if kind == "nbits":
        if accuracy_level < 2:
            return weights / KERNEL_COSTS["dequantize"].work_per_ns + predicted_ns("dense", m, k, n) - 4 * weights / BYTES_PER_NS
        if m <= 4:
            return _time("nbits-int8", code_bytes, m * weights)
        return _time("nbits-int8-gemm", code_bytes, m * n * (k + NBITS_OUTPUT_COST))
    if kind == "dequantize-dense":
        return weights / KERNEL_COSTS["dequantize"].work_per_ns + predicted_ns("dense", m, k, n)
    raise ValueError(f"unknown kernel kind {kind!r}")


# --------------------------------------------------------------------- the pass


@dataclass
class _Layer:
    """One MatMul/Gemm (or MatMulNBits) whose weight W[K, N] is constant, and how it is stored now."""

    node: onnx.NodeProto
    k: int
    n: int
    bias: str  # a 1-D [N] float initializer added to the output, or ""
    form: str  # dense, nbits, dql, library
    weight: np.ndarray | None = None  # dense W[K, N] (form dense)
    quantized: Quantized | None = None  # the other forms
    removed: tuple = ()  # nodes that go with the layer when it is rewritten (the dequantize chain)
    accuracy_level: int = 4


@register_pass("lower")
class Lower(Pass):
    summary = ("Rewrite pruned, clustered and weight-quantized MatMul/Gemm into SparseMatMul/LowBitMatMul "
               "(or MatMulNBits/DequantizeLinear for stock onnxruntime) where a cost model predicts a gain.")

    @dataclass(frozen=True)
    class Options(PassOptions):
        target: str = option("onnxshrink", "onnxshrink: the op library's SparseMatMul/LowBitMatMul; ort: stock onnxruntime "
                             "(MatMulNBits, DequantizeLinear); portable: standard ONNX only (DequantizeLinear)",
                             choices=("onnxshrink", "ort", "portable"))
        batch: int = option(1, "rows of A per call the cost model assumes (tokens x batch)", low=1)
        min_gain: float = option(1.1, "rewrite a layer into our ops only if the cost model predicts at least this "
                                 "speed-up over its current form (0: every layer the ops can take)", low=0.0)
        min_sparsity: float = option(0.5, "weights with a smaller fraction of exact zeros are not considered pruned",
                                     low=0.0, high=1.0)
        min_elements: int = option(16384, "weights with fewer elements stay as they are", low=0)
        exclude: tuple[str, ...] = option((), "op types or node names left as they are")

    def __init__(self, options: PassOptions | None = None, **values):
        super().__init__(options, **values)
        self.needs_library = self.options.target == "onnxshrink"

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassOutput:
        opts = self.options
        if opset_version(model) is None:
            raise OnnxShrinkError("lower: the model imports no default-domain opset")
        if opts.target == "onnxshrink":
            ops.library_path()  # raises the one-line "not installed" error
        notes: list[Note] = []
        layers = _find_layers(model, opts, notes)
        rewriter = _Rewriter(model)
        for layer in layers:
            where = _where(layer.node)
            if opts.target == "onnxshrink":
                note = self._to_library(layer, rewriter)
            else:
                note = self._to_stock(layer, rewriter, opts.target)
            notes.append(Note(where, note))
        if rewriter.changed:
            rewriter.finish()
            if opts.target != "onnxshrink" and any(n.op_type == "DequantizeLinear" and n.domain in _DEFAULT_DOMAINS
                                                   for n in model.graph.node):
                model = _ensure_dql_opset(model)
            _verify(model)
        if not notes:
            notes.append(Note("(graph)", "no MatMul/Gemm with a constant weight"))
        return PassOutput(model, notes)

    # ----------------------------------------------------------------- target onnxshrink

    def _to_library(self, layer: _Layer, rewriter: "_Rewriter") -> str:
        opts = self.options
        m, k, n = opts.batch, layer.k, layer.n
        if layer.form == "dense":
            w = layer.weight
            current = predicted_ns("dense", m, k, n)
            candidates = _dense_candidates(w, m, opts.min_sparsity)
            if not candidates:
                zeros = 1.0 - np.count_nonzero(w) / w.size
                return f"kept dense: {zeros:.1%} zeros (< min_sparsity {opts.min_sparsity}) and more than 256 distinct values"
            best = min(candidates, key=lambda c: c[1])
            label, cost, emit = best
        else:
            q = layer.quantized
            if q.bits not in LOWBIT_WIDTHS or q.block % 16:
                return f"kept as {layer.form}: LowBitMatMul takes 2/3/4/8 bits and blocks of a multiple of 16 " \
                       f"(got {q.bits} bits, block {q.block})"
            current = predicted_ns({"nbits": "nbits", "dql": "dense", "library": "dequantize-dense"}[layer.form], m, k, n,
                                   bits=q.bits, block=q.block, zero_points=q.zero_points is not None,
                                   accuracy_level=layer.accuracy_level)
            # MatMulNBits' int8 activations (accuracy_level 4) carry over: the same numerics; where
            # our int8 kernel does not take the block, float32 activations (faster, more accurate).
            int8 = layer.form == "nbits" and layer.accuracy_level == 4 and int8_kernel_takes(q.bits, q.block)
            level = 4 if int8 else 0
            cost = predicted_ns("lowbit", m, k, n, bits=q.bits, block=q.block, zero_points=q.zero_points is not None,
                                accuracy_level=level)
            label = f"LowBitMatMul {q.bits}-bit block {q.block}" + (" int8 activations" if level else "")
            emit = lambda r, lay: r.lowbit(lay, lay.quantized, level)  # noqa: E731
        gain = current / cost
        if gain < opts.min_gain:
            return f"kept {layer.form}: {label} predicted {gain:.2f}x at batch {m} (< min_gain {opts.min_gain})"
        emit(rewriter, layer)
        return f"{label}: predicted {gain:.2f}x over {layer.form} at batch {m}"

    # ----------------------------------------------------------------- targets ort / portable

    def _to_stock(self, layer: _Layer, rewriter: "_Rewriter", target: str) -> str:
        if layer.form == "dense":
            return f"kept dense: stock onnxruntime has no kernel that gains from zeros or clustered weights ({target})"
        q = layer.quantized
        if target == "ort":
            if layer.form == "nbits":
                return "kept MatMulNBits"
            if nbits_runs(q.bits, q.block) and q.block >= 16 and (q.block & (q.block - 1)) == 0:
                rewriter.nbits(layer, q)
                return f"MatMulNBits {q.bits}-bit block {q.block} (from {layer.form})"
        if layer.form == "dql":
            return "kept DequantizeLinear"
        rewriter.dql(layer, q)
        return f"DequantizeLinear {q.bits}-bit block {q.block} + {'Gemm' if layer.node.op_type == 'Gemm' else 'MatMul'} " \
               f"(from {layer.form})"


def _dense_candidates(w: np.ndarray, m: int, min_sparsity: float) -> list:
    """(label, predicted ns, emit) for every library form that can hold the float W."""
    k, n = w.shape
    nnz = int(np.count_nonzero(w))
    zeros = 1.0 - nnz / w.size
    out = []
    if zeros >= min_sparsity:
        if k <= MAX_SPARSE_K:
            out.append((f"SparseMatMul csr ({zeros:.1%} zeros)", predicted_ns("csr", m, k, n, nnz=nnz),
                        lambda r, lay: r.sparse(lay, "csr")))
        if two_four_fits(w):
            out.append((f"SparseMatMul 2:4 ({zeros:.1%} zeros)", predicted_ns("2:4", m, k, n),
                        lambda r, lay: r.sparse(lay, "2:4")))
        fills = [(blocked_fill(w, bk, bn), bk, bn) for bk, bn in BLOCK_SHAPES if -(-k // bk) <= MAX_SPARSE_K]
        if fills:
            fill, bk, bn = min(fills)
            if fill <= BLOCKED_MAX_FILL:
                out.append((f"SparseMatMul blocked {bk}x{bn} ({zeros:.1%} zeros)",
                            predicted_ns("blocked", m, k, n, stored=int(round(fill * nnz))),
                            lambda r, lay, bk=bk, bn=bn: r.sparse(lay, "blocked", bk, bn)))
    if w.size <= 1 << 24:
        book = codebook_of(w)
        if book is not None:
            bits = book[2]
            tables = "a table per column" if book[1].ndim == 2 else f"{np.unique(w).size} values"
            out.append((f"LowBitMatMul codebook {bits}-bit ({tables})",
                        predicted_ns("lowbit", m, k, n, bits=bits, block=k if k % 16 == 0 else 16 * -(-k // 16),
                                     accuracy_level=0),  # codebook mode: float32 activations
                        lambda r, lay, book=book: r.codebook(lay, *book)))
    return out


# --------------------------------------------------------------------- finding layers


def _where(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def _find_layers(model: onnx.ModelProto, opts, notes: list[Note]) -> list[_Layer]:
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    overridable = {i.name for i in graph.input}
    producers = {name: node for node in graph.node for name in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
        for sub in subgraphs(node):
            for name in outer_scope_names(sub):
                readers[name] = readers.get(name, 0) + 2  # never exclusively ours
    for out in graph.output:
        readers[out.name] = readers.get(out.name, 0) + 2

    def constant(name: str) -> np.ndarray | None:
        tensor = inits.get(name)
        if tensor is None or name in overridable:
            return None
        return numpy_helper.to_array(tensor)

    def clustered(name: str) -> tuple[np.ndarray, list] | None:
        """(W as the node reads it, its decoder's nodes) where `cluster` rebuilds weight `name`."""
        found = decoder_of(model, name)
        if found is None or name in overridable:
            return None
        decoder, codebook = found
        positions = codebook_positions(model, name, decoder, codebook)
        return numpy_helper.to_array(codebook).reshape(-1)[positions].astype(np.float32), decoder

    layers = []
    for node in graph.node:
        if node.op_type in opts.exclude or node.name in opts.exclude:
            continue
        try:
            layer = _layer_of(node, constant, producers, readers, notes, clustered)
        except _Skip as skip:
            notes.append(Note(_where(node), f"kept: {skip}"))
            continue
        if layer is None:
            continue
        if layer.k * layer.n < opts.min_elements:
            notes.append(Note(_where(node), f"kept: {layer.k * layer.n} weights < min_elements {opts.min_elements}"))
            continue
        layers.append(layer)
    return layers


class _Skip(Exception):
    """A MatMul/Gemm this pass cannot rewrite; the message says why."""


def _layer_of(node, constant, producers, readers, notes, clustered) -> _Layer | None:
    if node.domain == MS_DOMAIN and node.op_type == "MatMulNBits":
        return _nbits_layer(node, constant)
    if node.domain not in _DEFAULT_DOMAINS or node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
        return None
    transposed = False
    bias = ""
    if node.op_type == "Gemm":
        if attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0:
            raise _Skip("Gemm with transA or alpha")
        transposed = bool(attribute(node, "transB", 0))
        if len(node.input) > 2 and node.input[2]:
            c = constant(node.input[2])
            if c is None or c.dtype != np.float32 or c.ndim != 1 or attribute(node, "beta", 1.0) != 1.0:
                raise _Skip("Gemm bias is not a constant 1-D float32 [N] with beta=1")
            bias = node.input[2]
    name = node.input[1]
    w = constant(name)
    if w is not None:
        if w.dtype != np.float32 or w.ndim != 2:
            raise _Skip(f"weight is {w.dtype} {w.ndim}-D, not 2-D float32")
        if readers.get(name, 0) != 1:
            raise _Skip(f"weight '{name}' is also read elsewhere")
        w = w.T if transposed else w
        if bias and constant(bias).shape != (w.shape[1],):
            raise _Skip("Gemm bias shape is not [N]")
        return _Layer(node, w.shape[0], w.shape[1], bias, "dense", weight=np.ascontiguousarray(w))
    producer = producers.get(name)
    if producer is None:
        return None  # computed weight or graph input
    rebuilt = clustered(name)
    if rebuilt is not None:  # onnxruntime folds the decoder at load: the layer runs as a dense MatMul
        w, decoder = rebuilt
        inside = [read for step in (*decoder, node) for read in step.input]
        if any(readers.get(out, 0) != inside.count(out) for step in decoder for out in step.output):
            raise _Skip("the clustered weight or part of its decoder is also read elsewhere")
        w = w.T if transposed else w
        return _Layer(node, w.shape[0], w.shape[1], bias, "dense", weight=np.ascontiguousarray(w),
                      removed=tuple(decoder))
    if producer.op_type == "Transpose" and not transposed and list(attribute(producer, "perm", [1, 0])) == [1, 0]:
        inner = producers.get(producer.input[0])
        if inner is not None and inner.op_type == "DequantizePacked" and inner.domain == ops.DOMAIN:
            q = _library_quantized(inner, constant)
            if readers.get(name, 0) != 1 or readers.get(producer.input[0], 0) != 1:
                raise _Skip("the dequantized weight is also read elsewhere")
            return _Layer(node, q.codes.shape[0], q.codes.shape[1], bias, "library", quantized=q, removed=(producer, inner))
        return None
    if producer.op_type == "DequantizePacked" and producer.domain == ops.DOMAIN and transposed:
        q = _library_quantized(producer, constant)
        if readers.get(name, 0) != 1:
            raise _Skip("the dequantized weight is also read elsewhere")
        return _Layer(node, q.codes.shape[0], q.codes.shape[1], bias, "library", quantized=q, removed=(producer,))
    if producer.op_type == "DequantizeLinear" and producer.domain in _DEFAULT_DOMAINS:
        q = _dql_quantized(producer, constant, transposed)
        if q is None:
            return None
        if readers.get(name, 0) != 1:
            raise _Skip("the dequantized weight is also read elsewhere")
        return _Layer(node, q.codes.shape[0], q.codes.shape[1], bias, "dql", quantized=q, removed=(producer,))
    return None


def _nbits_layer(node, constant) -> _Layer:
    k, n = int(attribute(node, "K")), int(attribute(node, "N"))
    bits, block = int(attribute(node, "bits", 4)), int(attribute(node, "block_size"))
    inputs = list(node.input) + [""] * (6 - len(node.input))
    if inputs[4]:
        raise _Skip("MatMulNBits with g_idx")
    b, scales = constant(inputs[1]), constant(inputs[2])
    if b is None or scales is None:
        raise _Skip("MatMulNBits weights are not constants")
    blocks = -(-k // block)
    codes = unpack_codes(b.reshape(n, -1), bits, n * blocks * block).reshape(n, blocks * block)[:, :k]
    zero_points = None
    if inputs[3]:
        zp = constant(inputs[3])
        if zp is None or zp.dtype != np.uint8:
            raise _Skip("MatMulNBits zero points are not constant uint8")
        per_row = zp.reshape(n, -1)
        zero_points = np.stack([unpack_codes(row, bits, blocks) for row in per_row]).T
    bias = inputs[5]
    if bias and (constant(bias) is None or constant(bias).shape != (n,)):
        raise _Skip("MatMulNBits bias is not a constant [N]")
    q = Quantized(np.ascontiguousarray(codes.T), scales.astype(np.float32).reshape(n, blocks).T.copy(), zero_points,
                  bits, block)
    return _Layer(node, k, n, bias, "nbits", quantized=q, accuracy_level=int(attribute(node, "accuracy_level", 0)))


def _library_quantized(node, constant) -> Quantized:
    bits, block = int(attribute(node, "bits")), int(attribute(node, "block_size"))
    shape = list(attribute(node, "shape", []))
    if len(shape) != 2:
        raise _Skip(f"DequantizePacked shape {shape} is not 2-D")
    n, k = shape
    codes, scales = constant(node.input[0]), constant(node.input[1])
    zp = constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if codes is None or scales is None or (len(node.input) > 2 and node.input[2] and zp is None):
        raise _Skip("DequantizePacked inputs are not constants")
    codes_nk = unpack_codes(codes, bits, n * k).reshape(n, k)
    return Quantized(np.ascontiguousarray(codes_nk.T), scales.astype(np.float32).T.copy(),
                     None if zp is None else zp.T.copy(), bits, block)


def _dql_quantized(node, constant, transposed: bool) -> Quantized | None:
    """The codes of a blocked DequantizeLinear whose blocks run along K, or None if it is not one."""
    block = int(attribute(node, "block_size", 0))
    axis = int(attribute(node, "axis", 1))
    x, scale = constant(node.input[0]), constant(node.input[1])
    zp = constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if block <= 0 or x is None or scale is None or x.ndim != 2:
        return None
    if axis % 2 != (1 if transposed else 0):
        raise _Skip("DequantizeLinear blocks do not run along K")
    if transposed:
        x, scale, zp = x.T, scale.T, (None if zp is None else zp.T)
    signed = x.dtype.name in ("int4", "int8")  # onnx hands int4/uint4 over as ml_dtypes types
    values = x.astype(np.int32)
    zero = None if zp is None else zp.astype(np.int32)
    low = int(min(values.min(), zero.min() if zero is not None else 0))
    high = int(max(values.max(), zero.max() if zero is not None else 0))
    bits = next((b for b in LOWBIT_WIDTHS if (signed and -(1 << (b - 1)) <= low and high < 1 << (b - 1))
                 or (not signed and low >= 0 and high < 1 << b)), None)
    if bits is None:
        raise _Skip(f"DequantizeLinear codes span {low}..{high}, more than 8 bits")
    offset = 1 << (bits - 1) if signed else 0
    codes = (values + offset).astype(np.uint8)
    if zero is None:  # DequantizeLinear's default zero point is 0
        zero_points = None if signed else np.zeros(scale.shape, np.uint8)
    else:
        zero_points = (zero + offset).astype(np.uint8)
        if signed and (zero == 0).all():
            zero_points = None  # the default 2**(bits-1) after the shift
    return Quantized(np.ascontiguousarray(codes), scale.astype(np.float32), zero_points, bits, block)


# --------------------------------------------------------------------- rewriting


class _Rewriter:
    """Replaces layers' nodes; unused initializers are dropped when `finish` runs."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.graph = model, model.graph
        self.names = all_names(model)
        self.instead: dict[int, list] = {}  # id(node) -> nodes that replace it ([] removes it)
        self.domains: set[str] = set()
        self.changed = False

    def _init(self, base: str, array: np.ndarray) -> str:
        name = unique_name(base, self.names)
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def _replace(self, layer: _Layer, nodes: list) -> None:
        for gone in layer.removed:
            self.instead[id(gone)] = []
        self.instead[id(layer.node)] = nodes
        self.changed = True

    def _node_name(self, layer: _Layer, op: str) -> str:
        """The replaced node's own name (it goes), else a new one."""
        return layer.node.name or unique_name(f"{op}_{layer.node.output[0]}", self.names)

    def sparse(self, layer: _Layer, fmt: str, block_k: int = 1, block_n: int = 1) -> None:
        base = _where(layer.node)
        attrs = {"K": layer.k, "N": layer.n, "format": fmt}
        if fmt == "csr":
            values, indices, offsets = csr_arrays(layer.weight)
            inputs = [self._init(f"{base}_values", values), self._init(f"{base}_indices", indices),
                      self._init(f"{base}_offsets", offsets)]
        elif fmt == "2:4":
            values, meta = two_four_arrays(layer.weight)
            inputs = [self._init(f"{base}_values", values), self._init(f"{base}_meta", meta), ""]
        else:
            values, indices, offsets = blocked_arrays(layer.weight, block_k, block_n)
            inputs = [self._init(f"{base}_values", values), self._init(f"{base}_indices", indices),
                      self._init(f"{base}_offsets", offsets)]
            attrs.update(block_k=block_k, block_n=block_n)
        node = helper.make_node("SparseMatMul", [layer.node.input[0], *inputs, layer.bias], [layer.node.output[0]],
                                name=self._node_name(layer, "SparseMatMul"), domain=ops.DOMAIN, **attrs)
        self._replace(layer, [node])
        self.domains.add(ops.DOMAIN)

    def lowbit(self, layer: _Layer, q: Quantized, accuracy_level: int = 0) -> None:
        base = _where(layer.node)
        inputs = [self._init(f"{base}_codes", lowbit_codes(q.codes, q.bits, q.block)),
                  self._init(f"{base}_scales", np.ascontiguousarray(q.scales.T)),
                  self._init(f"{base}_zero_points", np.ascontiguousarray(q.zero_points.T)) if q.zero_points is not None else ""]
        attrs = {"accuracy_level": accuracy_level} if accuracy_level else {}
        node = helper.make_node("LowBitMatMul", [layer.node.input[0], *inputs, layer.bias], [layer.node.output[0]],
                                name=self._node_name(layer, "LowBitMatMul"), domain=ops.DOMAIN,
                                K=layer.k, N=layer.n, bits=q.bits, block_size=q.block, **attrs)
        self._replace(layer, [node])
        self.domains.add(ops.DOMAIN)

    def codebook(self, layer: _Layer, codes: np.ndarray, table: np.ndarray, bits: int) -> None:
        base = _where(layer.node)
        block = 16 * -(-min(layer.k, 256) // 16)  # codebook weights have no scales: any block does
        inputs = [self._init(f"{base}_codes", lowbit_codes(codes, bits, block)), "", "", layer.bias,
                  self._init(f"{base}_codebook", table)]
        node = helper.make_node("LowBitMatMul", [layer.node.input[0], *inputs], [layer.node.output[0]],
                                name=self._node_name(layer, "LowBitMatMul"), domain=ops.DOMAIN,
                                K=layer.k, N=layer.n, bits=bits, block_size=block)
        self._replace(layer, [node])
        self.domains.add(ops.DOMAIN)

    def nbits(self, layer: _Layer, q: Quantized) -> None:
        base = _where(layer.node)
        k, n = q.codes.shape
        blocks = q.scales.shape[0]
        columns = np.empty((n, blocks * q.block), np.uint8)
        columns[:, :k] = q.codes.T
        columns[:, k:] = q.zero_grid()[-1][:, None]
        packed = pack_codes(columns, q.bits).reshape(n, blocks, q.block * q.bits // 8)
        inputs = [layer.node.input[0], self._init(f"{base}_q{q.bits}", packed),
                  self._init(f"{base}_scales", np.ascontiguousarray(q.scales.T))]
        if q.zero_points is not None:
            inputs.append(self._init(f"{base}_zero_points", np.stack([pack_codes(c, q.bits) for c in q.zero_points.T])))
        if layer.bias:
            inputs += [""] * (5 - len(inputs)) + [layer.bias]
        node = helper.make_node("MatMulNBits", inputs, [layer.node.output[0]], name=self._node_name(layer, "MatMulNBits"),
                                domain=MS_DOMAIN, K=k, N=n, bits=q.bits, block_size=q.block, accuracy_level=4)
        self._replace(layer, [node])
        self.domains.add(MS_DOMAIN)

    def dql(self, layer: _Layer, q: Quantized) -> None:
        """DequantizeLinear (axis 0, W[K, N]) in front of a MatMul, or of the layer's Gemm as it was."""
        base = _where(layer.node)
        signed = q.zero_points is None
        small = q.bits <= 4
        dtype = {(True, True): TensorProto.INT4, (True, False): TensorProto.INT8,
                 (False, True): TensorProto.UINT4, (False, False): TensorProto.UINT8}[(signed, small)]
        values = q.codes.astype(np.int16) - (1 << (q.bits - 1)) if signed else q.codes
        q_name = unique_name(f"{base}_q{q.bits}", self.names)
        self.graph.initializer.append(_integer_tensor(q_name, dtype, values))
        inputs = [q_name, self._init(f"{base}_scales", q.scales)]
        if not signed:
            z_name = unique_name(f"{base}_zero_points", self.names)
            self.graph.initializer.append(_integer_tensor(z_name, dtype, q.zero_points))
            inputs.append(z_name)
        weight = unique_name(f"{base}_weight", self.names)
        deq = helper.make_node("DequantizeLinear", inputs, [weight], name=unique_name(f"{base}_dequantize", self.names),
                               axis=0, block_size=q.block)
        node = layer.node
        if node.op_type == "MatMulNBits":
            outs = [node.output[0]] if not layer.bias else [unique_name(f"{node.output[0]}_matmul", self.names)]
            mm = [helper.make_node("MatMul", [node.input[0], weight], outs, name=self._node_name(layer, "MatMul"))]
            if layer.bias:
                mm.append(helper.make_node("Add", [outs[0], layer.bias], [node.output[0]],
                                           name=unique_name(f"{base}_bias", self.names)))
        elif node.op_type == "Gemm":  # W is [K, N] now: transB off, the other attributes kept
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "transB"}
            mm = [helper.make_node("Gemm", [node.input[0], weight] + ([layer.bias] if layer.bias else []),
                                   list(node.output), name=node.name, **attrs)]
        else:
            mm = [helper.make_node("MatMul", [node.input[0], weight], list(node.output), name=node.name)]
        self._replace(layer, [deq, *mm])

    def finish(self) -> None:
        graph, model = self.graph, self.model
        replace_nodes(graph, self.instead)
        drop_unused_initializers(graph)
        produced = {name for node in graph.node for name in node.output} | {t.name for t in graph.initializer} | \
                   {i.name for i in graph.input}
        stale = [v for v in graph.value_info if v.name not in produced]
        for value in stale:
            graph.value_info.remove(value)
        for domain in sorted(self.domains):
            if opset_version(model, domain) is None:
                model.opset_import.append(helper.make_opsetid(domain, 1))
        # A domain whose last node was rewritten away is no longer imported (target=portable must
        # leave a model that loads without the op library).
        in_use = {n.domain for g in [graph] for n in _all_nodes(g)}
        for entry in list(model.opset_import):
            if entry.domain in (ops.DOMAIN, MS_DOMAIN) and entry.domain not in in_use:
                model.opset_import.remove(entry)


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for sub in subgraphs(node):
            yield from _all_nodes(sub)


def _integer_tensor(name: str, dtype: int, values: np.ndarray) -> onnx.TensorProto:
    if dtype in (TensorProto.INT4, TensorProto.UINT4):
        nibbles = (np.asarray(values).astype(np.int16) & 0xF).astype(np.uint8)  # two a byte, low nibble first
        return helper.make_tensor(name, dtype, values.shape, pack_codes(nibbles, 4).tobytes(), raw=True)
    return numpy_helper.from_array(np.asarray(values).astype(np.int8 if dtype == TensorProto.INT8 else np.uint8), name)


def _ensure_dql_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """DequantizeLinear with block_size needs opset 21 (and IR 10 for int4)."""
    version = opset_version(model)
    if version < DQL_OPSET:
        from onnx import version_converter

        try:
            model = version_converter.convert_version(model, DQL_OPSET)
        except Exception as exc:  # the converter raises several types for ops it cannot adapt
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise OnnxShrinkError(f"lower: DequantizeLinear with block_size needs opset {DQL_OPSET}; converting this "
                                  f"opset-{version} model failed: {reason}") from None
    model.ir_version = max(model.ir_version, 10)
    return model


def _verify(model: onnx.ModelProto) -> None:
    """Never hand on a model that onnxruntime cannot load."""
    try:
        make_session(model)
    except OnnxShrinkError as exc:
        raise OnnxShrinkError(f"lower produced a model onnxruntime rejects ({exc})") from None
