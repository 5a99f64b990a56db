"""Shapes for `cleanup`: each tensor's dimensions as integers or symbols, and the values of small
shape tensors (the output of Shape, Gather, Concat, ... chains) as lists of the same.

A symbol stands for one unknown size. Two dimensions are treated as equal only when they are the
same symbol: a dimension read from the same tensor, a graph input's named dimension (the ONNX IR
spec binds a dim_param to one value across the model's inputs), or an expression built from equal
symbols. Declared shapes of outputs and value_info are never used: they are hints an exporter can
get wrong. Graph inputs' fixed sizes are facts (onnxruntime rejects a feed that breaks them).

onnx's own shape inference fills in sizes for ops without a rule here; where it and a rule here
disagree, the dimension becomes unknown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from onnxshrink.graph import attribute, subgraphs

_BIG = 2**62  # Slice ends at or past this mean "to the end"


class Sym:
    """An unknown dimension; equal only to a symbol with the same key."""

    __slots__ = ("key",)

    def __init__(self, key):
        self.key = key

    def __eq__(self, other):
        return isinstance(other, Sym) and other.key == self.key

    def __hash__(self):
        return hash(self.key)

    def __repr__(self):
        return f"Sym{self.key!r}"


Dim = "int | Sym"
Shape = "tuple | None"  # tuple of Dim, or None when even the rank is unknown


def fresh(name: str, axis: int) -> Sym:
    """Dimension `axis` of tensor `name`: known to equal only itself."""
    return Sym(("dim", name, axis))


def broadcast_dim(dims: list) -> object:
    """The broadcast of several sizes: a size of 1 gives way; distinct symbols give a symbol that
    stands for "whichever of these is not 1" (equal to any broadcast of the same set)."""
    rest = [d for d in dims if d != 1]
    if not rest:
        return 1
    ints = {d for d in rest if isinstance(d, int)}
    if len(ints) > 1:
        return None  # would fail at run time; say nothing
    if ints:
        return ints.pop()
    keys: set = set()
    for d in rest:
        keys |= d.key[1] if d.key[0] == "bcast" else {d.key}
    if len(keys) == 1:
        return Sym(next(iter(keys)))
    return Sym(("bcast", frozenset(keys)))


def broadcast(shapes: list) -> Shape:
    if any(s is None for s in shapes):
        return None
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for axis in range(rank):
        dims = [s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0]
        dim = broadcast_dim(dims)
        if dim is None:
            return None
        out.append(dim)
    return tuple(out)


def _factors(dim) -> tuple[int, tuple] | None:
    """A size as (integer coefficient, sorted tuple of atomic symbol keys): their product."""
    if isinstance(dim, bool) or dim is None:
        return None
    if isinstance(dim, (int, np.integer)):
        return int(dim), ()
    if dim.key[0] == "prod":
        return dim.key[1], dim.key[2]
    return 1, (dim.key,)


def product(dims) -> object:
    """The product of sizes as one size: an int, a symbol, or a product symbol (equal to any product
    of the same factors), or None when a factor is unknown."""
    coeff, keys = 1, []
    for dim in dims:
        factors = _factors(dim)
        if factors is None:
            return None
        coeff *= factors[0]
        keys.extend(factors[1])
    return _from_factors(coeff, keys)


def _from_factors(coeff: int, keys) -> object:
    keys = tuple(sorted(keys, key=repr))
    if not keys:
        return coeff
    if coeff == 0:
        return 0
    if coeff == 1 and len(keys) == 1:
        return Sym(keys[0])
    return Sym(("prod", coeff, keys))


def quotient(total, part) -> object:
    """total / part when it divides exactly as products (common factors cancel), else None."""
    a, b = _factors(total), _factors(part)
    if a is None or b is None or b[0] == 0 or a[0] % b[0]:
        return None
    remaining = list(a[1])
    for key in b[1]:
        if key not in remaining:
            return None
        remaining.remove(key)
    return _from_factors(a[0] // b[0], remaining)


@dataclass(frozen=True)
class Partial:
    """A rank-0 or rank-1 integer (or bool/float) tensor whose elements are ints, symbols or None."""

    items: tuple
    rank: int  # 0 or 1
    elem_type: int

    @property
    def known(self) -> bool:
        return all(isinstance(i, (int, bool, float, np.integer, np.bool_)) and not isinstance(i, Sym) for i in self.items)

    def array(self) -> np.ndarray:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.elem_type)
        values = np.array(list(self.items), dtype=dtype)
        return values.reshape(()) if self.rank == 0 else values


_INT_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
              onnx.TensorProto.UINT64, onnx.TensorProto.UINT32, onnx.TensorProto.UINT16, onnx.TensorProto.UINT8}
_PARTIAL_TYPES = _INT_TYPES | {onnx.TensorProto.BOOL}


def partial_from_array(value: np.ndarray) -> Partial | None:
    if value.ndim > 1 or value.size > 64 or value.dtype.kind not in "iub":
        return None
    elem = onnx.helper.np_dtype_to_tensor_dtype(value.dtype)
    items = tuple(bool(v) if value.dtype.kind == "b" else int(v) for v in value.reshape(-1))
    return Partial(items, value.ndim, elem)


# --------------------------------------------------------------------------
# What a rule sees of a node's inputs
# --------------------------------------------------------------------------
class Inputs:
    """Accessors over one node's inputs, backed by the rewriter's scope."""

    def __init__(self, node: onnx.NodeProto, shape_of: Callable, const_of: Callable, partial_of: Callable,
                 type_of: Callable, opset: int):
        self.node, self.opset = node, opset
        self._shape_of, self._const_of, self._partial_of, self._type_of = shape_of, const_of, partial_of, type_of

    def __len__(self):
        return len(self.node.input)

    def has(self, i: int) -> bool:
        return i < len(self.node.input) and self.node.input[i] != ""

    def shape(self, i: int) -> Shape:
        return self._shape_of(self.node.input[i]) if self.has(i) else None

    def const(self, i: int):
        return self._const_of(self.node.input[i]) if self.has(i) else None

    def partial(self, i: int) -> Partial | None:
        return self._partial_of(self.node.input[i]) if self.has(i) else None

    def elem_type(self, i: int) -> int:
        return self._type_of(self.node.input[i]) if self.has(i) else 0

    def ints(self, i: int) -> list | None:
        """Input i as a list of Python ints, when it is a constant."""
        value = self.const(i)
        if value is None or value.dtype.kind not in "iu":
            return None
        return [int(v) for v in value.reshape(-1)]

    def attr(self, name: str, default=None):
        return attribute(self.node, name, default)


def _axes(inputs: Inputs, index: int, since: int) -> list | None:
    """Axes given as an attribute before opset `since` and as input `index` from then on."""
    if inputs.opset < since:
        axes = inputs.attr("axes")
        return list(axes) if axes is not None else None
    if not inputs.has(index):
        return None
    return inputs.ints(index)


def _norm(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# --------------------------------------------------------------------------
# Shape rules: node -> list of output shapes (None where unknown)
# --------------------------------------------------------------------------
_SAME_AS_INPUT0 = {
    "Relu", "Sigmoid", "Tanh", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Erf",
    "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Not", "IsNaN", "IsInf",
    "Sign", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Softplus", "Softsign", "Gelu", "Mish", "Clip",
    "Cast", "CastLike", "Identity", "Dropout", "Softmax", "LogSoftmax", "Hardmax", "LayerNormalization",
    "BatchNormalization", "InstanceNormalization", "LpNormalization", "LRN", "MeanVarianceNormalization", "PRelu",
    "QuantizeLinear", "DequantizeLinear", "Celu", "ThresholdedRelu", "Trilu", "CumSum", "Shrink", "BitwiseNot",
    "GroupNormalization", "RMSNormalization", "Swish",
}
_BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Sum", "Mean", "Equal", "Less", "Greater",
              "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Where", "BitShift", "BitwiseAnd", "BitwiseOr",
              "BitwiseXor"}


def _first_only(shapes: list, count: int) -> list:
    return shapes + [None] * (count - len(shapes))


def infer(node: onnx.NodeProto, inputs: Inputs, output_partial: Callable[[int], Partial | None]) -> list:
    """Output shapes of `node` by the rules below; [] or Nones where there is no rule."""
    op = node.op_type
    count = len(node.output)
    if node.domain not in ("", "ai.onnx"):
        rule = _CONTRIB_RULES.get(op) if node.domain == "com.microsoft" else None
        if rule is None:
            return [None] * count
        try:
            return _first_only(_as_list(rule(inputs, output_partial)), count)
        except (ValueError, IndexError, TypeError, ZeroDivisionError):
            return [None] * count
    if op in _SAME_AS_INPUT0:
        if op == "LayerNormalization" and count > 1:
            return _first_only([inputs.shape(0)], count)
        if op in ("Dropout", "BatchNormalization"):
            return _first_only([inputs.shape(0)], count)
        return [inputs.shape(0)] + [None] * (count - 1)
    if op in _BROADCAST:
        return [broadcast([inputs.shape(i) for i in range(len(inputs)) if inputs.has(i)])]
    rule = _RULES.get(op)
    if rule is None:
        return [None] * count
    try:
        result = rule(inputs, output_partial)
    except (ValueError, IndexError, TypeError, ZeroDivisionError):
        return [None] * count
    if not isinstance(result, list):
        result = [result]
    return _first_only(result, count)


def _matmul(inputs, _):
    a, b = inputs.shape(0), inputs.shape(1)
    if a is None or b is None or not a or not b:
        return None
    a1, b1 = len(a) == 1, len(b) == 1
    a2 = (1,) + a if a1 else a
    b2 = b + (1,) if b1 else b
    batch = broadcast([a2[:-2], b2[:-2]])
    if batch is None:
        return None
    out = batch + (a2[-2], b2[-1])
    if a1:
        out = out[:-2] + out[-1:]
    if b1:
        out = out[:-1]
    return out


def _gemm(inputs, _):
    a, b = inputs.shape(0), inputs.shape(1)
    if a is None or b is None or len(a) != 2 or len(b) != 2:
        return None
    m = a[1] if inputs.attr("transA", 0) else a[0]
    n = b[0] if inputs.attr("transB", 0) else b[1]
    return (m, n)


def _transpose(inputs, _):
    x = inputs.shape(0)
    if x is None:
        return None
    perm = inputs.attr("perm")
    perm = list(perm) if perm is not None else list(range(len(x)))[::-1]
    return tuple(x[p] for p in perm)


def _reshape_dims(x: Shape, target: Partial | None, allowzero: int, name: str):
    if target is None or target.rank != 1:
        return None
    out = []
    for axis, item in enumerate(target.items):
        if isinstance(item, Sym):
            out.append(item)
        elif item is None:
            out.append(None)
        elif item == 0 and not allowzero:
            if x is None or axis >= len(x):
                return None
            out.append(x[axis])
        elif item == -1:
            out.append(-1)
        elif item >= 0:
            out.append(int(item))
        else:
            return None
    if -1 in out:
        rest = [d for d in out if not (isinstance(d, int) and d == -1)]
        if x is not None and None not in rest:
            out[out.index(-1)] = quotient(product(x), product(rest))
        else:
            out[out.index(-1)] = None
    return tuple(d if d is not None else fresh(name, axis) for axis, d in enumerate(out))


def _reshape(inputs, _):
    return _reshape_dims(inputs.shape(0), inputs.partial(1), inputs.attr("allowzero", 0), inputs.node.output[0])


def _flatten(inputs, _):
    x = inputs.shape(0)
    if x is None:
        return None
    axis = _norm(inputs.attr("axis", 1), len(x))
    return (product(x[:axis]), product(x[axis:]))


def _squeeze(inputs, _):
    x = inputs.shape(0)
    if x is None:
        return None
    axes = _axes(inputs, 1, 13)
    if axes is None:
        if inputs.has(1) or (inputs.opset < 13 and inputs.attr("axes") is not None):
            return None
        if any(not isinstance(d, int) for d in x):
            return None
        return tuple(d for d in x if d != 1)
    axes = {_norm(a, len(x)) for a in axes}
    return tuple(d for i, d in enumerate(x) if i not in axes)


def _unsqueeze(inputs, _):
    x = inputs.shape(0)
    axes = _axes(inputs, 1, 13)
    if x is None or axes is None:
        return None
    rank = len(x) + len(axes)
    axes = sorted(_norm(a, rank) for a in axes)
    out, source = [], iter(x)
    for i in range(rank):
        out.append(1 if i in axes else next(source))
    return tuple(out)


def _concat(inputs, _):
    shapes = [inputs.shape(i) for i in range(len(inputs)) if inputs.has(i)]
    if not shapes or any(s is None for s in shapes) or len({len(s) for s in shapes}) != 1:
        return None
    rank = len(shapes[0])
    axis = _norm(inputs.attr("axis"), rank)
    out = []
    for i in range(rank):
        dims = [s[i] for s in shapes]
        if i == axis:
            out.append(sum(dims) if all(isinstance(d, int) for d in dims) else fresh(inputs.node.output[0], i))
        else:
            ints = [d for d in dims if isinstance(d, int)]
            out.append(ints[0] if ints else dims[0])
    return tuple(out)


def _split(inputs, _):
    x = inputs.shape(0)
    node = inputs.node
    if x is None:
        return None
    axis = _norm(inputs.attr("axis", 0), len(x))
    sizes = inputs.ints(1) if inputs.opset >= 13 and inputs.has(1) else (
        list(inputs.attr("split")) if inputs.attr("split") is not None else None)
    count = len(node.output)
    if sizes is None and isinstance(x[axis], int):
        num = inputs.attr("num_outputs", count)
        chunk = -(-x[axis] // num)
        sizes = [chunk] * (x[axis] // chunk) + ([x[axis] % chunk] if x[axis] % chunk else [])
        if len(sizes) != count:
            return None
    out = []
    for k in range(count):
        dim = sizes[k] if sizes is not None else fresh(node.output[k], axis)
        out.append(x[:axis] + (dim,) + x[axis + 1:])
    return out


def _slice_params(inputs: Inputs, rank: int):
    if inputs.opset < 10:
        starts, ends = inputs.attr("starts"), inputs.attr("ends")
        axes, steps = inputs.attr("axes"), None
        starts = list(starts) if starts is not None else None
        ends = list(ends) if ends is not None else None
        axes = list(axes) if axes is not None else None
    else:
        starts, ends = inputs.ints(1), inputs.ints(2)
        axes = inputs.ints(3) if inputs.has(3) else None
        steps = inputs.ints(4) if inputs.has(4) else None
        if (inputs.has(3) and axes is None) or (inputs.has(4) and steps is None):
            return None
    if starts is None or ends is None:
        return None
    axes = list(range(len(starts))) if axes is None else [_norm(a, rank) for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    return starts, ends, axes, steps


def slice_length(dim: int, start: int, end: int, step: int) -> int:
    """Elements numpy (and ONNX Slice) selects from a dimension of size `dim`."""
    return len(range(*slice(start, end, step).indices(dim)))


def _slice(inputs, _):
    x = inputs.shape(0)
    if x is None:
        return None
    params = _slice_params(inputs, len(x))
    if params is None:
        return None
    out = list(x)
    for start, end, axis, step in zip(*params):
        dim = x[axis]
        if isinstance(dim, int):
            out[axis] = slice_length(dim, max(min(start, _BIG), -_BIG), max(min(end, _BIG), -_BIG), step)
        elif step == 1 and (start == 0 or start <= -_BIG) and end >= _BIG:
            out[axis] = dim
        else:
            out[axis] = fresh(inputs.node.output[0], axis)
    return tuple(out)


def _gather(inputs, _):
    data, indices = inputs.shape(0), inputs.shape(1)
    if data is None or indices is None:
        return None
    axis = _norm(inputs.attr("axis", 0), len(data))
    return data[:axis] + indices + data[axis + 1:]


def _expand(inputs, _):
    x, target = inputs.shape(0), inputs.partial(1)
    if x is None or target is None or target.rank != 1:
        return None
    dims = tuple(d if d is not None else fresh(inputs.node.output[0], i) for i, d in enumerate(target.items))
    if any(isinstance(d, int) and d < 0 for d in dims):
        return None
    out = broadcast([x, dims])
    if out is None:
        return None
    # A fresh target dim may be 1, so the result keeps x's size there; name it anew.
    offset = len(out) - len(dims)
    return tuple(d if not (i >= offset and target.items[i - offset] is None) else fresh(inputs.node.output[0], i)
                 for i, d in enumerate(out))


def _tile(inputs, _):
    x, repeats = inputs.shape(0), inputs.ints(1)
    if x is None or repeats is None or len(repeats) != len(x):
        return None
    return tuple(d if r == 1 else (d * r if isinstance(d, int) else fresh(inputs.node.output[0], i))
                 for i, (d, r) in enumerate(zip(x, repeats)))


def _pad(inputs, _):
    x = inputs.shape(0)
    if x is None:
        return None
    pads = list(inputs.attr("pads")) if inputs.opset < 11 and inputs.attr("pads") is not None else inputs.ints(1)
    if pads is None:
        return None
    axes = inputs.ints(3) if inputs.opset >= 18 and inputs.has(3) else list(range(len(x)))
    if axes is None or len(pads) != 2 * len(axes):
        return None
    out = list(x)
    for k, axis in enumerate(_norm(a, len(x)) for a in axes):
        before, after = pads[k], pads[k + len(axes)]
        if before == 0 and after == 0:
            continue
        out[axis] = x[axis] + before + after if isinstance(x[axis], int) else fresh(inputs.node.output[0], axis)
    return tuple(out)


def _pool_like(inputs, _, channels_from_weight: bool):
    x = inputs.shape(0)
    if x is None or len(x) < 3:
        return None
    name = inputs.node.output[0]
    spatial = len(x) - 2
    if channels_from_weight:
        w = inputs.shape(1)
        if w is None:
            return None
        kernel = inputs.attr("kernel_shape") or w[2:]
        channels = w[0]
    else:
        kernel = inputs.attr("kernel_shape")
        channels = x[1]
    if kernel is None or len(kernel) != spatial:
        return (x[0], channels) + tuple(fresh(name, 2 + i) for i in range(spatial))
    strides = list(inputs.attr("strides") or [1] * spatial)
    dilations = list(inputs.attr("dilations") or [1] * spatial)
    pads = list(inputs.attr("pads") or [0] * (2 * spatial))
    auto_pad = inputs.attr("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    ceil = inputs.attr("ceil_mode", 0)
    out = [x[0], channels]
    for i in range(spatial):
        dim, k = x[2 + i], kernel[i]
        if not isinstance(k, int):
            out.append(fresh(name, 2 + i))
            continue
        effective = (k - 1) * dilations[i] + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(dim if strides[i] == 1 else (-(-dim // strides[i]) if isinstance(dim, int) else fresh(name, 2 + i)))
        elif isinstance(dim, int):
            total = dim + (0 if auto_pad == "VALID" else pads[i] + pads[i + spatial]) - effective
            if total < 0:
                return None
            out.append((-(-total // strides[i]) if ceil else total // strides[i]) + 1)
        elif auto_pad != "VALID" and strides[i] == 1 and pads[i] + pads[i + spatial] == effective - 1:
            out.append(dim)
        else:
            out.append(fresh(name, 2 + i))
    return tuple(out)


def _global_pool(inputs, _):
    x = inputs.shape(0)
    return None if x is None or len(x) < 2 else x[:2] + (1,) * (len(x) - 2)


def _reduce(inputs, _):
    x = inputs.shape(0)
    if x is None:
        return None
    op = inputs.node.op_type
    since = 13 if op == "ReduceSum" else 18
    axes = _axes(inputs, 1, since)
    if axes is None and ((inputs.opset >= since and inputs.has(1)) or inputs.attr("axes") is not None):
        return None
    keep = inputs.attr("keepdims", 1)
    if not axes:
        if inputs.attr("noop_with_empty_axes", 0):
            return x
        axes = list(range(len(x)))
    axes = {_norm(a, len(x)) for a in axes}
    return tuple((1 if i in axes else d) for i, d in enumerate(x) if keep or i not in axes)


def _argmax(inputs, _):
    x = inputs.shape(0)
    if x is None:
        return None
    axis = _norm(inputs.attr("axis", 0), len(x))
    keep = inputs.attr("keepdims", 1)
    return tuple((1 if i == axis else d) for i, d in enumerate(x) if keep or i != axis)


def _shape(inputs, output_partial):
    part = output_partial(0)
    return (len(part.items),) if part is not None else None


def _size(inputs, _):
    return ()


def _constant_of_shape(inputs, _):
    target = inputs.partial(0)
    if target is None or target.rank != 1:
        return None
    return tuple(d if d is not None else fresh(inputs.node.output[0], i) for i, d in enumerate(target.items))


def _constant(inputs, _):
    value = inputs.attr("value")
    if value is not None:
        return tuple(value.dims)
    for name in ("value_float", "value_int", "value_string"):
        if inputs.attr(name) is not None:
            return ()
    for name in ("value_floats", "value_ints", "value_strings"):
        if inputs.attr(name) is not None:
            return (len(inputs.attr(name)),)
    return None


def _rnn(inputs, _):
    x = inputs.shape(0)
    if x is None or len(x) != 3:
        return None
    hidden = inputs.attr("hidden_size")
    direction = inputs.attr("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    dirs = 2 if direction == "bidirectional" else 1
    if hidden is None:
        return None
    if inputs.attr("layout", 0):
        batch, seq = x[0], x[1]
        return [(batch, seq, dirs, hidden), (batch, dirs, hidden), (batch, dirs, hidden)]
    seq, batch = x[0], x[1]
    return [(seq, dirs, batch, hidden), (dirs, batch, hidden), (dirs, batch, hidden)]


def _resize(inputs, _):
    x = inputs.shape(0)
    if x is None:
        return None
    node = inputs.node
    sizes_index, scales_index = (3, 2) if inputs.opset >= 11 else (None, 1)
    if sizes_index is not None and inputs.has(sizes_index):
        sizes = inputs.ints(sizes_index)
        if sizes is not None and len(sizes) == len(x) and inputs.attr("axes") is None:
            return tuple(sizes)
        return None
    scales = inputs.const(scales_index) if inputs.has(scales_index) else None
    if node.op_type == "Upsample" and inputs.opset < 9:
        scales = inputs.attr("scales")
        scales = np.array(scales, np.float32) if scales is not None else None
    if scales is None or scales.size != len(x) or inputs.attr("axes") is not None:
        return None
    out = []
    for i, (d, s) in enumerate(zip(x, scales.reshape(-1))):
        if s == 1:
            out.append(d)
        elif isinstance(d, int):
            out.append(int(np.floor(d * np.float32(s))))
        else:
            out.append(fresh(node.output[0], i))
    return tuple(out)


def _topk(inputs, _):
    x, k = inputs.shape(0), (inputs.ints(1) if inputs.opset >= 10 else [inputs.attr("k")])
    if x is None or not k:
        return None
    axis = _norm(inputs.attr("axis", -1), len(x))
    out = x[:axis] + (k[0],) + x[axis + 1:]
    return [out, out]


def _gather_elements(inputs, _):
    return inputs.shape(1)


def _depth_to_space(inputs, _):
    x = inputs.shape(0)
    b = inputs.attr("blocksize")
    if x is None or len(x) != 4 or not all(isinstance(d, int) for d in x[1:]):
        return None
    if inputs.node.op_type == "DepthToSpace":
        return (x[0], x[1] // (b * b), x[2] * b, x[3] * b)
    return (x[0], x[1] * b * b, x[2] // b, x[3] // b)


def _dynamic_quantize_linear(inputs, _):
    return [inputs.shape(0), (), ()]


_RULES: dict[str, Callable] = {
    "DynamicQuantizeLinear": _dynamic_quantize_linear, "MatMulInteger": _matmul,
    "ConvInteger": lambda i, p: _pool_like(i, p, True),
    "MatMul": _matmul, "Gemm": _gemm, "Transpose": _transpose, "Reshape": _reshape, "Flatten": _flatten,
    "Squeeze": _squeeze, "Unsqueeze": _unsqueeze, "Concat": _concat, "Split": _split, "Slice": _slice,
    "Gather": _gather, "Expand": _expand, "Tile": _tile, "Pad": _pad,
    "Conv": lambda i, p: _pool_like(i, p, True), "MaxPool": lambda i, p: _pool_like(i, p, False),
    "AveragePool": lambda i, p: _pool_like(i, p, False), "LpPool": lambda i, p: _pool_like(i, p, False),
    "GlobalAveragePool": _global_pool, "GlobalMaxPool": _global_pool, "GlobalLpPool": _global_pool,
    "ReduceSum": _reduce, "ReduceMean": _reduce, "ReduceMax": _reduce, "ReduceMin": _reduce, "ReduceProd": _reduce,
    "ReduceL1": _reduce, "ReduceL2": _reduce, "ReduceLogSum": _reduce, "ReduceLogSumExp": _reduce,
    "ReduceSumSquare": _reduce, "ArgMax": _argmax, "ArgMin": _argmax, "Shape": _shape, "Size": _size,
    "ConstantOfShape": _constant_of_shape, "Constant": _constant, "LSTM": _rnn, "GRU": _rnn, "RNN": _rnn,
    "Resize": _resize, "Upsample": _resize, "TopK": _topk, "GatherElements": _gather_elements,
    "DepthToSpace": _depth_to_space, "SpaceToDepth": _depth_to_space,
}


def _as_list(result) -> list:
    return result if isinstance(result, list) else [result]


def _same_as_input0(inputs, _):
    return inputs.shape(0)


# onnxruntime's contrib ops (com.microsoft) that exporters and quantizers write into files, where the
# output shape follows the standard op they stand for.
_CONTRIB_RULES: dict[str, Callable] = {
    "DynamicQuantizeLSTM": _rnn, "DynamicQuantizeMatMul": _matmul, "MatMulIntegerToFloat": _matmul,
    "MatMulInteger16": _matmul, "FusedConv": lambda i, p: _pool_like(i, p, True), "QuickGelu": _same_as_input0,
    "FastGelu": _same_as_input0, "BiasGelu": _same_as_input0, "Gelu": _same_as_input0,
}


# --------------------------------------------------------------------------
# Values of small shape tensors
# --------------------------------------------------------------------------
def _elementwise(op: str, a, b, elem_type: int):
    """One element of a binary op on partial values: an int/bool, a symbol, or None."""
    if a is None or b is None:
        return None
    sa, sb = isinstance(a, Sym), isinstance(b, Sym)
    if not sa and not sb:
        if op == "Add":
            return a + b
        if op == "Sub":
            return a - b
        if op == "Mul":
            return a * b
        if op == "Div":
            if b == 0:
                return None
            if elem_type in _INT_TYPES:
                q = abs(a) // abs(b)
                return q if (a >= 0) == (b >= 0) else -q  # integer Div truncates toward zero
            return None
        if op == "Max":
            return max(a, b)
        if op == "Min":
            return min(a, b)
        if op == "Equal":
            return a == b
        if op == "Less":
            return a < b
        if op == "Greater":
            return a > b
        if op == "LessOrEqual":
            return a <= b
        if op == "GreaterOrEqual":
            return a >= b
        if op == "And":
            return bool(a) and bool(b)
        if op == "Or":
            return bool(a) or bool(b)
        return None
    if op == "Equal" and sa and sb and a == b:
        return True
    if op in ("Add", "Sub") and sa and not sb and b == 0:
        return a
    if op == "Add" and sb and not sa and a == 0:
        return b
    if op == "Mul":
        return product([a, b])
    if op == "Div" and elem_type in _INT_TYPES and not sb:
        return quotient(a, b)  # exact division only: then truncation does not matter
    if op in ("Max", "Min") and sa and sb and a == b:
        return a
    if op == "Sub" and sa and sb and a == b:
        return 0
    return None


_PARTIAL_BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "Equal", "Less", "Greater", "LessOrEqual",
                   "GreaterOrEqual", "And", "Or"}
_COMPARISONS = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or"}


def _pair(a: Partial, b: Partial):
    if a.rank == 1 and b.rank == 1 and len(a.items) != len(b.items):
        if len(a.items) == 1:
            return a.items * len(b.items), b.items, 1
        if len(b.items) == 1:
            return a.items, b.items * len(a.items), 1
        return None
    rank = max(a.rank, b.rank)
    n = max(len(a.items), len(b.items))
    items_a = a.items * n if len(a.items) == 1 else a.items
    items_b = b.items * n if len(b.items) == 1 else b.items
    return items_a, items_b, rank


def propagate(node: onnx.NodeProto, inputs: Inputs, shape_of_output0: Callable[[], Shape]) -> list:
    """Partial values of `node`'s outputs (only rank-0/1 int-like results), or Nones."""
    op = node.op_type
    none = [None] * len(node.output)
    if node.domain not in ("", "ai.onnx") or not node.output:
        return none
    try:
        result = _propagate(op, node, inputs)
    except (ValueError, IndexError, TypeError, KeyError, OverflowError):
        return none
    if result is None:
        return none
    return [result] + none[1:]


def _propagate(op, node, inputs: Inputs) -> Partial | None:
    if op == "Shape":
        x = inputs.shape(0)
        if x is None:
            return None
        rank = len(x)
        start = _norm(inputs.attr("start", 0), rank)
        end = inputs.attr("end")
        end = rank if end is None else _norm(end, rank)
        start, end = min(max(start, 0), rank), min(max(end, 0), rank)
        return Partial(tuple(x[start:end]), 1, onnx.TensorProto.INT64)
    if op == "Size":
        x = inputs.shape(0)
        if x is not None and all(isinstance(d, int) for d in x):
            return Partial((int(np.prod(x)) if x else 1,), 0, onnx.TensorProto.INT64)
        return None
    if op == "Identity":
        return inputs.partial(0)
    if op == "Cast":
        source = inputs.partial(0)
        to = inputs.attr("to")
        if source is None:
            return None
        if to in _INT_TYPES and source.elem_type in _INT_TYPES:
            return Partial(source.items, source.rank, to)
        if to == onnx.TensorProto.BOOL:
            items = tuple(None if isinstance(i, Sym) or i is None else bool(i) for i in source.items)
            return Partial(items, source.rank, to)
        if to in _INT_TYPES and source.elem_type == onnx.TensorProto.BOOL:
            return Partial(tuple(None if i is None else int(i) for i in source.items), source.rank, to)
        return None
    if op == "Gather":
        data, indices = inputs.partial(0), inputs.const(1)
        if data is None or data.rank != 1 or indices is None or indices.ndim > 1 or inputs.attr("axis", 0) not in (0, -1):
            return None
        n = len(data.items)
        picked = tuple(data.items[int(i) + n if int(i) < 0 else int(i)] for i in indices.reshape(-1))
        return Partial(picked, indices.ndim, data.elem_type)
    if op in ("Unsqueeze", "Squeeze", "Reshape", "Flatten"):
        data = inputs.partial(0)
        if data is None:
            return None
        x = inputs.shape(0)
        out = None
        if op == "Unsqueeze":
            out = _unsqueeze(inputs, None)
        elif op == "Squeeze":
            out = _squeeze(inputs, None)
        elif op == "Reshape":
            target = inputs.ints(1)
            out = (len(data.items),) if target is not None and len(target) == 1 else (() if target == [] else None)
        if out is None or len(out) > 1 or x is None:
            return None
        return Partial(data.items, len(out), data.elem_type)
    if op == "Concat":
        parts = [inputs.partial(i) for i in range(len(inputs)) if inputs.has(i)]
        if not parts or any(p is None or p.rank != 1 for p in parts):
            return None
        return Partial(tuple(i for p in parts for i in p.items), 1, parts[0].elem_type)
    if op == "Slice":
        data = inputs.partial(0)
        if data is None or data.rank != 1:
            return None
        params = _slice_params(inputs, 1)
        if params is None:
            return None
        (start,), (end,), _, (step,) = params
        return Partial(tuple(data.items[slice(max(min(start, _BIG), -_BIG), max(min(end, _BIG), -_BIG), step)]), 1,
                       data.elem_type)
    if op in _PARTIAL_BINARY:
        a, b = inputs.partial(0), inputs.partial(1)
        if a is None or b is None:
            return None
        pair = _pair(a, b)
        if pair is None:
            return None
        items_a, items_b, rank = pair
        elem = onnx.TensorProto.BOOL if op in _COMPARISONS else a.elem_type
        if op not in _COMPARISONS and a.elem_type not in _INT_TYPES:
            return None
        items = tuple(_elementwise(op, x, y, a.elem_type) for x, y in zip(items_a, items_b))
        return Partial(items, rank, elem)
    if op == "Not":
        a = inputs.partial(0)
        if a is None:
            return None
        return Partial(tuple(None if i is None or isinstance(i, Sym) else (not i) for i in a.items), a.rank,
                       onnx.TensorProto.BOOL)
    if op == "Where":
        cond, a, b = inputs.partial(0), inputs.partial(1), inputs.partial(2)
        if cond is None or a is None or b is None:
            return None
        n = max(len(cond.items), len(a.items), len(b.items))
        def stretch(p):
            return p.items * n if len(p.items) == 1 else p.items
        items = tuple(None if c is None or isinstance(c, Sym) else (x if c else y)
                      for c, x, y in zip(stretch(cond), stretch(a), stretch(b)))
        return Partial(items, max(cond.rank, a.rank, b.rank), a.elem_type)
    if op == "ConstantOfShape":
        return None
    if op in ("ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin"):
        data = inputs.partial(0)
        if data is None or data.rank != 1 or not data.known:
            return None
        values = np.array(data.items, dtype=np.int64)
        value = {"ReduceProd": np.prod, "ReduceSum": np.sum, "ReduceMax": np.max, "ReduceMin": np.min}[op](values)
        keep = inputs.attr("keepdims", 1)
        return Partial((int(value),), 1 if keep else 0, data.elem_type)
    return None


# --------------------------------------------------------------------------
# onnx's shape inference, on declared input shapes only
# --------------------------------------------------------------------------
def onnx_inferred(model: onnx.ModelProto, input_shapes: dict | None = None) -> dict:
    """name -> (elem_type, dims) from onnx shape inference, where dims are ints or None (unknown), or
    dims None for an unknown rank. Run on a copy without large initializer data, without value_info and
    without declared output shapes, so that nothing but the graph inputs' declared shapes feeds it;
    `input_shapes` (input name -> sizes, e.g. a feed's) replaces those of the inputs it names."""
    skeleton = onnx.ModelProto()
    skeleton.ir_version = max(model.ir_version, 4)
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph = skeleton.graph
    graph.CopyFrom(_skeleton_graph(model.graph, main=True))
    for value in graph.input:
        if input_shapes and value.name in input_shapes and value.type.HasField("tensor_type"):
            shape = value.type.tensor_type.shape
            del shape.dim[:]
            for size in input_shapes[value.name]:
                shape.dim.add().dim_value = int(size)
    declared_inputs = {i.name for i in graph.input}
    for tensor in model.graph.initializer:
        if tensor.name in declared_inputs:
            continue
        if len(tensor.dims) and int(np.prod(tensor.dims)) > 64 or tensor.data_location == onnx.TensorProto.EXTERNAL:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        else:
            graph.initializer.append(tensor)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # onnx raises several types (InferenceError, ValidationError, RuntimeError) on odd graphs
        return {}
    result: dict = {}
    _collect(inferred.graph, result)
    return result


def _skeleton_graph(graph: onnx.GraphProto, loop_body: bool = False, main: bool = False) -> onnx.GraphProto:
    out = onnx.GraphProto()
    out.name = graph.name
    for value in graph.input:
        entry = out.input.add()
        entry.CopyFrom(value)
        if loop_body and entry.type.HasField("tensor_type"):
            entry.type.tensor_type.ClearField("shape")  # carried shapes may change between iterations
    for value in graph.output:
        entry = out.output.add()
        entry.name = value.name
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            entry.type.tensor_type.elem_type = value.type.tensor_type.elem_type
    for node in graph.node:
        copy = out.node.add()
        copy.op_type, copy.domain, copy.name = node.op_type, node.domain, node.name
        copy.input.extend(node.input)
        copy.output.extend(node.output)
        for attr in node.attribute:
            entry = copy.attribute.add()
            if attr.type == onnx.AttributeProto.GRAPH:
                entry.name, entry.type = attr.name, attr.type
                entry.g.CopyFrom(_skeleton_graph(attr.g, node.op_type in ("Loop", "Scan")))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                entry.name, entry.type = attr.name, attr.type
                for sub in attr.graphs:
                    entry.graphs.add().CopyFrom(_skeleton_graph(sub, node.op_type in ("Loop", "Scan")))
            else:
                entry.CopyFrom(attr)
    if not main:  # the caller turns the main graph's large initializers into typed inputs
        out.initializer.extend(graph.initializer)
    return out


def _collect(graph: onnx.GraphProto, result: dict) -> None:
    for value in list(graph.value_info) + list(graph.output) + list(graph.input):
        if not value.type.HasField("tensor_type"):
            continue
        tensor_type = value.type.tensor_type
        dims = None
        if tensor_type.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim)
        previous = result.get(value.name)
        if previous is None or (previous[1] is None and dims is not None):
            result[value.name] = (tensor_type.elem_type, dims)
    for node in graph.node:
        for sub in subgraphs(node):
            _collect(sub, result)
