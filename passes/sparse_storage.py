"""`store-sparse`: mostly-zero weights stored as their nonzero values plus a bitmask.

Stored form. A float initializer W of n elements becomes two initializers and a chain of
stock ONNX ops (opset 11) whose output is named W, so consumers are untouched:

    W.values  W's dtype, [1 + nonzeros]: a 0, then the nonzero values in row-major order
    W.bits    uint8 [ceil(n/8), 1]: bit j of byte b is set when element 8b+j is nonzero
    BitShift(bits, [0..7]) -> Mod 2 -> Reshape [-1] -> Slice to n (when n % 8) -> Cast int32 = mask
    CumSum(mask) * mask -> Gather(values) -> Reshape to W's shape

A nonzero element's index into `values` is the count of nonzeros up to and including it; a
zero's index is 0, the stored 0. "Zero" means all bits clear (+0.0): a -0.0 is kept as a
value, so decoding is bit-exact.

Why this form. At 90% zeros float32 costs 0.1 * 4 + 1/8 = 0.525 bytes a weight, 0.13x dense.
ONNX's own `sparse_initializer` (SparseTensorProto) loads in onnxruntime 1.32, but the checker
requires int64 indices: 12 bytes a nonzero, 0.30x dense measured for a 90%-zero 256x256 float32
MatMul (the target is 0.25x), and `check_model(full_check=True)` fails on it (shape inference
does not see sparse initializers).

Load. Every input of the chain is a constant, so onnxruntime's constant folding (optimization
level basic and above, the default) evaluates it once while the session is created: the model
saved through SessionOptions.optimized_model_filepath holds only the consumers and a dense W,
and run time equals the dense model's. With optimizations disabled the chain runs at every call.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.graph import all_names, opset_version, tensor_elements, unique_name, walk_graphs
from onnxshrink.options import PassOptions, option
from onnxshrink.pass_base import Note, Pass, PassContext, PassOutput
from onnxshrink.registry import register_pass

_FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
_MIN_OPSET = 11  # BitShift, CumSum, Slice with inputs
_DECODE_OPS = ("Reshape", "Gather", "Mul", "CumSum", "Cast", "Slice", "Reshape", "Mod", "BitShift")


@register_pass("store-sparse")
class StoreSparse(Pass):
    summary = ("Store mostly-zero weights as nonzero values + a bitmask, rebuilt by stock ops that "
               "onnxruntime folds at load; outputs unchanged.")

    @dataclass(frozen=True)
    class Options(PassOptions):
        min_elements: int = option(1024, "pack only initializers with at least this many elements", low=1)
        min_zeros: float = option(0.5, "pack only initializers with at least this fraction of exact zeros",
                                  low=0.0, high=1.0)

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassOutput:
        return PassOutput(model, pack_sparse(model, self.options.min_elements, self.options.min_zeros))


def pack_sparse(model: onnx.ModelProto, min_elements: int, min_zeros: float) -> list[Note]:
    """Pack the main graph's qualifying float initializers in place; a note for each packed or refused one."""
    graph = model.graph
    already = {name for packed in find_packed(graph) for name in (packed.values, packed.bits)}
    opset = opset_version(model) or 0
    taken = all_names(model)
    shared = _SharedConstants(taken)
    notes, packed, new_initializers, decode_nodes = [], set(), [], []
    for tensor in graph.initializer:
        if tensor.name in already or tensor.data_type not in _FLOATS or tensor_elements(tensor) < min_elements:
            continue
        if tensor.data_location == TensorProto.EXTERNAL:
            notes.append(Note(tensor.name, "left dense: its data is in an external file that was not loaded"))
            continue
        array = numpy_helper.to_array(tensor)
        nonzero = _nonzero(array)
        zeros = 1.0 - float(np.mean(nonzero))
        if zeros < min_zeros:
            if float(np.mean(array == 0)) >= min_zeros:
                notes.append(Note(tensor.name, "left dense: most of its zeros are -0.0, which is kept as a value "
                                               "(bit-exact decoding); prune by assigning +0.0"))
            continue
        refusal = _refusal(tensor, model, opset)
        if refusal:
            notes.append(Note(tensor.name, f"left dense: {refusal}"))
            continue
        initializers, nodes = _encode(tensor.name, array, nonzero, shared, taken)
        before = tensor.ByteSize()
        after = sum(t.ByteSize() for t in initializers) + sum(n.ByteSize() for n in nodes)
        if after >= before:
            notes.append(Note(tensor.name, f"left dense: packing would not shrink it ({before} -> {after} bytes)"))
            continue
        packed.add(tensor.name)
        new_initializers += initializers
        decode_nodes += nodes
        notes.append(Note(tensor.name, f"stored sparse: {zeros:.1%} zeros, "
                                       f"{before} -> {after} bytes ({after / before:.3f}x)"))
    for g in walk_graphs(graph):
        if g is not graph:  # subgraph weights are left alone: say so where packing would have paid
            notes += [Note(t.name, "left dense: inside a subgraph") for t in g.initializer
                      if t.data_type in _FLOATS and tensor_elements(t) >= min_elements
                      and t.data_location != TensorProto.EXTERNAL
                      and 1.0 - float(np.mean(_nonzero(numpy_helper.to_array(t)))) >= min_zeros]
    if not packed:
        return notes
    keep = [t for t in graph.initializer if t.name not in packed]
    del graph.initializer[:]
    read = {name for node in decode_nodes for name in node.input}
    graph.initializer.extend(keep + [t for t in shared.tensors if t.name in read] + new_initializers)
    nodes = decode_nodes + list(graph.node)  # decode first: it reads only initializers
    del graph.node[:]
    graph.node.extend(nodes)
    return notes


def unpack_sparse(model: onnx.ModelProto) -> int:
    """Turn every packed weight of the main graph back into a dense initializer, in place; returns how many."""
    graph = model.graph
    found = find_packed(graph)
    if not found:
        return 0
    initializers = {t.name: t for t in graph.initializer}
    removed_nodes = {id(node) for packed in found for node in packed.nodes}
    maybe_unused = {name for packed in found for name in (packed.values, packed.bits, *packed.constants)}
    dense = [numpy_helper.from_array(packed.decode(initializers), packed.name) for packed in found]
    kept_nodes = [node for node in graph.node if id(node) not in removed_nodes]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    still_read = _readers(graph)
    kept = [t for t in graph.initializer if t.name not in maybe_unused or still_read[t.name]]
    del graph.initializer[:]
    graph.initializer.extend(kept + dense)
    return len(found)


@dataclass
class Packed:
    """One decode chain found in a graph."""

    name: str  # the weight it rebuilds
    values: str
    bits: str
    shape: str
    nodes: list[onnx.NodeProto]
    constants: list[str]  # the chain's small initializers, possibly shared with other chains

    def decode(self, initializers: dict) -> np.ndarray:
        values = numpy_helper.to_array(initializers[self.values])
        bits = numpy_helper.to_array(initializers[self.bits])
        shape = tuple(int(d) for d in numpy_helper.to_array(initializers[self.shape]))
        mask = np.unpackbits(bits.reshape(-1), bitorder="little")[:int(np.prod(shape))].astype(bool)
        dense = np.zeros(mask.size, values.dtype)
        dense[mask] = values[1:]
        return dense.reshape(shape)


def find_packed(graph: onnx.GraphProto) -> list[Packed]:
    """The decode chains of the main graph: the shape `_encode` writes, built from initializers,
    with intermediates no other node reads, and a bitmask that agrees with the stored values."""
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {t.name: t for t in graph.initializer}
    readers = _readers(graph)
    found = []
    for node in graph.node:
        chain = _chain_ending_at(node, producer)
        if chain is None:
            continue
        outputs = {out for n in chain for out in n.output}
        inputs = [name for n in chain for name in n.input]
        chain_readers = Counter(inputs)
        if any(name not in outputs and name not in initializers for name in inputs):
            continue
        if any(readers[out] != chain_readers[out] for n in chain[1:] for out in n.output):
            continue  # something else reads an intermediate: not ours to remove
        gather, bitshift = chain[1], chain[-1]
        values, bits, shape = gather.input[0], bitshift.input[0], chain[0].input[1]
        packed = Packed(node.output[0], values, bits, shape, chain,
                        [name for name in inputs if name in initializers and name not in (values, bits)])
        if _consistent(packed, initializers, bitshift):
            found.append(packed)
    return found


def _chain_ending_at(last: onnx.NodeProto, producer: dict) -> list[onnx.NodeProto] | None:
    """Walk back from a Reshape through the decode ops (Slice optional); None where the ops differ."""
    chain, node = [], last
    for op in _DECODE_OPS:
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type != op:
            if op == "Slice":
                continue  # no Slice when n is a multiple of 8
            return None
        chain.append(node)
        follow = 1 if op == "Gather" else 0
        node = producer.get(node.input[follow]) if op != "BitShift" and len(node.input) > follow else None
    mul, cumsum, cast = chain[2], chain[3], chain[4]
    return chain if mul.input[1] == cumsum.input[0] == cast.output[0] else None


def _consistent(packed: Packed, initializers: dict, bitshift: onnx.NodeProto) -> bool:
    values, bits = initializers[packed.values], initializers[packed.bits]
    shifts = numpy_helper.to_array(initializers[bitshift.input[1]])
    if bits.data_type != TensorProto.UINT8 or len(values.dims) != 1 or not np.array_equal(shifts, np.arange(8)):
        return False
    shape = numpy_helper.to_array(initializers[packed.shape])
    n = int(np.prod(shape))
    bit_array = numpy_helper.to_array(bits).reshape(-1)
    ones = int(np.unpackbits(bit_array, bitorder="little")[:n].sum())
    return bit_array.size == -(-n // 8) and ones + 1 == values.dims[0]


class _SharedConstants:
    """The small tensors every chain reads the same way, stored once per packing run."""

    def __init__(self, taken: set[str]):
        arrays = {"shifts": np.arange(8, dtype=np.uint8), "two": np.array(2, np.uint8),
                  "flat": np.array([-1], np.int64), "axis": np.array(0, np.int64), "start": np.array([0], np.int64)}
        self.names = {key: unique_name(f"sparse_decode.{key}", taken) for key in arrays}
        self.tensors = [numpy_helper.from_array(array, self.names[key]) for key, array in arrays.items()]


def _encode(name: str, array: np.ndarray, mask: np.ndarray, shared: _SharedConstants, taken: set[str]):
    """The initializers and decode nodes that rebuild `array` (nonzero where `mask`) under `name`."""
    flat = array.reshape(-1)
    values = numpy_helper.from_array(np.concatenate([np.zeros(1, flat.dtype), flat[mask]]),
                                     unique_name(f"{name}.values", taken))
    bits = numpy_helper.from_array(np.packbits(mask, bitorder="little").reshape(-1, 1),
                                   unique_name(f"{name}.bits", taken))
    shape = numpy_helper.from_array(np.array(array.shape, np.int64), unique_name(f"{name}.shape", taken))
    initializers = [values, bits, shape]
    nodes = []

    def step(op, inputs, output=None, **attributes):
        node_name = unique_name(f"{name}/decode/{op}", taken)  # node and tensor names live apart: one name serves both
        nodes.append(helper.make_node(op, inputs, [output or node_name], name=node_name, **attributes))
        return output or node_name

    s = shared.names
    # onnxruntime keeps every intermediate until folding ends, so the wide ones are kept few and
    # narrow: uint8 up to the mask, int32 indices where they fit.
    bit = step("BitShift", [bits.name, s["shifts"]], direction="RIGHT")  # [bytes, 8]
    bit = step("Mod", [bit, s["two"]])
    bit = step("Reshape", [bit, s["flat"]])
    if flat.size % 8:
        end = numpy_helper.from_array(np.array([flat.size], np.int64), unique_name(f"{name}.length", taken))
        initializers.append(end)
        bit = step("Slice", [bit, s["start"], end.name])
    mask_int = step("Cast", [bit], to=TensorProto.INT32 if flat.size < 2**31 else TensorProto.INT64)
    index = step("Mul", [step("CumSum", [mask_int, s["axis"]]), mask_int])
    step("Reshape", [step("Gather", [values.name, index]), shape.name], output=name)
    return initializers, nodes


def _refusal(tensor: onnx.TensorProto, model: onnx.ModelProto, opset: int) -> str | None:
    """Why a qualifying initializer must stay dense, or None."""
    if any(i.name == tensor.name for i in model.graph.input):
        return "also a graph input, so it can be replaced at run time"
    if opset < _MIN_OPSET:
        return f"the decode ops need opset {_MIN_OPSET}, the model imports {opset}; upgrade it first"
    if model.ir_version < 4:
        return f"IR version {model.ir_version} requires every initializer to be a graph input"
    return None


def _nonzero(array: np.ndarray) -> np.ndarray:
    """True where an element has any bit set: -0.0 and NaN are values, only +0.0 is a zero."""
    flat = np.ascontiguousarray(array).reshape(-1)
    return flat.view(f"u{flat.dtype.itemsize}") != 0


def _readers(graph: onnx.GraphProto) -> Counter:
    """How often each name is read, by nodes of the graph and its subgraphs and as a graph output."""
    readers = Counter(name for g in walk_graphs(graph) for node in g.node for name in node.input if name)
    readers.update(o.name for o in graph.output)
    return readers
