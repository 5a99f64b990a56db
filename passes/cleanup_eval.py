"""Evaluating one node on constant inputs, for `cleanup`'s constant folding.

Integer, boolean and data-movement ops run in numpy, where the result is exact and matches
onnxruntime bit for bit. Everything else (float math, where onnxruntime's kernels may round
differently from numpy) runs in onnxruntime itself on a one-node model, so a folded value is the
value onnxruntime would have computed.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxshrink.graph import attribute


class NotFoldable(Exception):
    """This node cannot (or should not) be evaluated here."""


# Ops whose result changes from run to run, or that stand for training-time behaviour.
NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                    "Bernoulli"}
_SUPPORTED_KINDS = "biuf"  # bool, int, uint, float (float16/32/64)


def evaluate(node: onnx.NodeProto, values: list, opset: int, opsets: dict[str, int], ir_version: int) -> list:
    """Outputs of `node` given its inputs' values (None for an absent optional input)."""
    if node.domain not in ("", "ai.onnx") or node.op_type in NONDETERMINISTIC:
        raise NotFoldable(node.op_type)
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        raise NotFoldable("subgraph")
    for value in values:
        if value is not None and value.dtype.kind not in _SUPPORTED_KINDS:
            raise NotFoldable(f"dtype {value.dtype}")
    kernel = _NUMPY.get(node.op_type)
    if kernel is not None:
        exact = all(v is None or v.dtype.kind in "biu" for v in values) or node.op_type in _EXACT_ON_FLOATS
        if exact and _same_float_types(values):
            try:
                result = kernel(node, values, opset)
            except NotFoldable:
                raise
            except (ValueError, IndexError, TypeError, OverflowError, ZeroDivisionError, FloatingPointError) as exc:
                raise NotFoldable(f"{node.op_type}: {exc}") from None
            return [np.asarray(r) for r in (result if isinstance(result, list) else [result])]
    return _run_in_onnxruntime(node, values, opsets, ir_version)


# --------------------------------------------------------------------------
# numpy kernels (exact)
# --------------------------------------------------------------------------
def _attr(node, name, default=None):
    return attribute(node, name, default)


def _ints(value) -> list:
    if value is None:
        return None
    if value.dtype.kind not in "iu":
        raise NotFoldable("non-integer index input")
    return [int(v) for v in value.reshape(-1)]


def _identity(node, v, opset):
    return v[0]


def _cast(node, v, opset):
    to = onnx.helper.tensor_dtype_to_np_dtype(_attr(node, "to"))
    x = v[0]
    if np.dtype(to).kind not in _SUPPORTED_KINDS:
        raise NotFoldable("cast target")
    if x.dtype.kind == "f" and np.dtype(to).kind in "iub":
        raise NotFoldable("float to int cast")  # out-of-range and NaN handling is the runtime's
    if np.dtype(to).kind in "iu" and x.dtype.kind in "iu":
        info = np.iinfo(to)
        if x.size and (x.min() < info.min or x.max() > info.max):
            raise NotFoldable("integer cast out of range")
    return x.astype(to)


def _reshape(node, v, opset):
    x, shape = v[0], _ints(v[1]) if opset >= 5 else list(_attr(node, "shape"))
    allowzero = _attr(node, "allowzero", 0)
    target = [x.shape[i] if s == 0 and not allowzero else s for i, s in enumerate(shape)]
    return x.reshape(target)


def _unsqueeze(node, v, opset):
    x = v[0]
    axes = _ints(v[1]) if opset >= 13 else list(_attr(node, "axes"))
    rank = x.ndim + len(axes)
    for axis in sorted(a + rank if a < 0 else a for a in axes):
        x = np.expand_dims(x, axis)
    return x


def _squeeze(node, v, opset):
    x = v[0]
    axes = (_ints(v[1]) if len(v) > 1 and v[1] is not None else None) if opset >= 13 else _attr(node, "axes")
    if axes is None:
        return np.squeeze(x)
    axes = tuple(a + x.ndim if a < 0 else a for a in axes)
    if any(x.shape[a] != 1 for a in axes):
        raise NotFoldable("squeeze of a dimension that is not 1")
    return np.squeeze(x, axis=axes)


def _flatten(node, v, opset):
    x = v[0]
    axis = _attr(node, "axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(int(np.prod(x.shape[:axis])), -1) if x.size else x.reshape(int(np.prod(x.shape[:axis])),
                                                                                 int(np.prod(x.shape[axis:])))


def _concat(node, v, opset):
    axis = _attr(node, "axis", 1 if opset < 4 else None)
    if axis is None:
        raise NotFoldable("concat without axis")
    return np.concatenate([x for x in v if x is not None], axis=axis)


def _gather(node, v, opset):
    data, indices = v[0], v[1]
    axis = _attr(node, "axis", 0)
    axis = axis + data.ndim if axis < 0 else axis
    if indices.dtype.kind not in "iu":
        raise NotFoldable("gather indices")
    size = data.shape[axis]
    if indices.size and (indices.min() < -size or indices.max() >= size):
        raise NotFoldable("gather index out of range")
    return np.take(data, np.where(indices < 0, indices + size, indices), axis=axis)


def _slice(node, v, opset):
    x = v[0]
    if opset < 10:
        starts, ends = list(_attr(node, "starts")), list(_attr(node, "ends"))
        axes = _attr(node, "axes")
        axes = list(axes) if axes is not None else list(range(len(starts)))
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(v[1]), _ints(v[2])
        axes = _ints(v[3]) if len(v) > 3 and v[3] is not None else list(range(len(starts)))
        steps = _ints(v[4]) if len(v) > 4 and v[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        if step == 0:
            raise NotFoldable("slice step 0")
        axis = axis + x.ndim if axis < 0 else axis
        big = 2**62
        index[axis] = slice(max(min(start, big), -big), max(min(end, big), -big), step)
    return x[tuple(index)]


def _transpose(node, v, opset):
    perm = _attr(node, "perm")
    return np.transpose(v[0], perm if perm is not None else None)


def _shape(node, v, opset):
    dims = np.array(v[0].shape, dtype=np.int64)
    rank = len(dims)
    start, end = _attr(node, "start", 0), _attr(node, "end", rank)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    return dims[start:end]


def _size(node, v, opset):
    return np.array(v[0].size, dtype=np.int64)


def _expand(node, v, opset):
    shape = _ints(v[1])
    out_shape = np.broadcast_shapes(v[0].shape, tuple(shape))
    return np.broadcast_to(v[0], out_shape).copy()


def _tile(node, v, opset):
    return np.tile(v[0], _ints(v[1]))


def _constant_of_shape(node, v, opset):
    value = _attr(node, "value")
    fill = numpy_helper.to_array(value).reshape(-1)[0] if value is not None else np.float32(0)
    shape = _ints(v[0])
    return np.full(shape, fill, dtype=fill.dtype)


def _range(node, v, opset):
    start, limit, delta = (x.reshape(()) for x in v[:3])
    if delta == 0:
        raise NotFoldable("range delta 0")
    count = max(int(np.ceil((limit - start) / delta)), 0)
    return (start + np.arange(count, dtype=start.dtype) * delta).astype(start.dtype)


def _binary(fn):
    def kernel(node, v, opset):
        return fn(v[0], v[1])
    return kernel


def _div(node, v, opset):
    a, b = v
    if a.dtype.kind in "iu":
        if np.any(b == 0):
            raise NotFoldable("integer division by zero")
        q = np.abs(a) // np.abs(b)
        return np.where((a < 0) != (b < 0), -q, q).astype(np.result_type(a, b))  # truncation toward zero
    return a / b


def _mod(node, v, opset):
    a, b = v
    if np.any(b == 0):
        raise NotFoldable("mod by zero")
    return np.fmod(a, b) if _attr(node, "fmod", 0) else np.mod(a, b)


def _variadic(fn):
    def kernel(node, v, opset):
        values = [x for x in v if x is not None]
        out = values[0]
        for x in values[1:]:
            out = fn(out, x)
        return out
    return kernel


def _where(node, v, opset):
    return np.where(v[0], v[1], v[2])


def _not(node, v, opset):
    return np.logical_not(v[0])


def _reduce(fn):
    def kernel(node, v, opset):
        x = v[0]
        since = 13 if node.op_type == "ReduceSum" else 18
        axes = (_ints(v[1]) if len(v) > 1 and v[1] is not None else None) if opset >= since else _attr(node, "axes")
        keep = bool(_attr(node, "keepdims", 1))
        if not axes:
            if _attr(node, "noop_with_empty_axes", 0):
                return x
            axes = None
        else:
            axes = tuple(a + x.ndim if a < 0 else a for a in axes)
        return fn(x, axis=axes, keepdims=keep)
    return kernel


def _split(node, v, opset):
    x = v[0]
    axis = _attr(node, "axis", 0)
    axis = axis + x.ndim if axis < 0 else axis
    sizes = _ints(v[1]) if opset >= 13 and len(v) > 1 and v[1] is not None else _attr(node, "split")
    count = len(node.output)
    if sizes is None:
        dim = x.shape[axis]
        chunk = -(-dim // _attr(node, "num_outputs", count))
        sizes = [min(chunk, dim - k * chunk) for k in range(count)]
    bounds = np.cumsum([0] + list(sizes))
    if bounds[-1] != x.shape[axis] or len(sizes) != count:
        raise NotFoldable("split sizes")
    return [np.take(x, np.arange(bounds[k], bounds[k + 1]), axis=axis) for k in range(count)]


def _clip(node, v, opset):
    x = v[0]
    if opset < 11:
        low, high = _attr(node, "min", None), _attr(node, "max", None)
    else:
        low = v[1] if len(v) > 1 and v[1] is not None else None
        high = v[2] if len(v) > 2 and v[2] is not None else None
    if low is not None:
        x = np.maximum(x, np.asarray(low, dtype=x.dtype))
    if high is not None:
        x = np.minimum(x, np.asarray(high, dtype=x.dtype))
    return x


_NUMPY = {
    "Identity": _identity, "Cast": _cast, "Reshape": _reshape, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze,
    "Flatten": _flatten, "Concat": _concat, "Gather": _gather, "Slice": _slice, "Transpose": _transpose,
    "Shape": _shape, "Size": _size, "Expand": _expand, "Tile": _tile, "ConstantOfShape": _constant_of_shape,
    "Range": _range, "Add": _binary(np.add), "Sub": _binary(np.subtract), "Mul": _binary(np.multiply), "Div": _div,
    "Mod": _mod, "Neg": lambda n, v, o: np.negative(v[0]), "Abs": lambda n, v, o: np.abs(v[0]),
    "Equal": _binary(np.equal), "Less": _binary(np.less), "Greater": _binary(np.greater),
    "LessOrEqual": _binary(np.less_equal), "GreaterOrEqual": _binary(np.greater_equal), "Not": _not,
    "And": _binary(np.logical_and), "Or": _binary(np.logical_or), "Xor": _binary(np.logical_xor), "Where": _where,
    "Max": _variadic(np.maximum), "Min": _variadic(np.minimum), "Sum": _variadic(np.add),
    "ReduceProd": _reduce(np.prod), "ReduceSum": _reduce(np.sum), "ReduceMax": _reduce(np.max),
    "ReduceMin": _reduce(np.min), "Split": _split, "Sign": lambda n, v, o: np.sign(v[0]).astype(v[0].dtype),
    "Relu": lambda n, v, o: np.maximum(v[0], np.zeros((), v[0].dtype)), "Clip": _clip,
    "Floor": lambda n, v, o: np.floor(v[0]), "Ceil": lambda n, v, o: np.ceil(v[0]),
}
# Ops whose float results numpy computes exactly as onnxruntime does: data movement, comparisons,
# and single correctly-rounded IEEE operations on same-typed operands.
_EXACT_ON_FLOATS = {"Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Concat", "Gather", "Slice",
                    "Transpose", "Shape", "Size", "Expand", "Tile", "ConstantOfShape", "Neg", "Abs", "Equal", "Less",
                    "Greater", "LessOrEqual", "GreaterOrEqual", "Where", "Max", "Min", "Split", "Relu", "Clip",
                    "Floor", "Ceil", "Sign", "Cast", "Add", "Sub", "Mul", "Div"}


def _same_float_types(values) -> bool:
    kinds = {v.dtype for v in values if v is not None and v.dtype.kind == "f"}
    return len(kinds) <= 1


# --------------------------------------------------------------------------
# onnxruntime for the rest
# --------------------------------------------------------------------------
def _run_in_onnxruntime(node: onnx.NodeProto, values: list, opsets: dict[str, int], ir_version: int) -> list:
    import onnxruntime as ort

    inputs, feeds, renamed = [], {}, []
    for index, (name, value) in enumerate(zip(node.input, values)):
        if name == "":
            renamed.append("")
            continue
        if value is None:
            raise NotFoldable("input without a value")
        local = f"in{index}"
        renamed.append(local)
        if local not in feeds:
            inputs.append(onnx.helper.make_tensor_value_info(local, onnx.helper.np_dtype_to_tensor_dtype(value.dtype),
                                                             list(value.shape)))
            feeds[local] = value
    outputs = [f"out{k}" if name else "" for k, name in enumerate(node.output)]
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    del copy.input[:]
    copy.input.extend(renamed)
    del copy.output[:]
    copy.output.extend(outputs)
    graph = onnx.helper.make_graph([copy], "fold", inputs, [onnx.ValueInfoProto(name=o) for o in outputs if o])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()])
    model.ir_version = ir_version
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        results = session.run(None, feeds)
    except Exception as exc:  # onnxruntime raises its own exception types for unsupported nodes
        raise NotFoldable(f"onnxruntime: {str(exc).splitlines()[0][:120]}") from None
    out, it = [], iter(results)
    for name in node.output:
        value = next(it) if name else None
        if name and not isinstance(value, np.ndarray):
            raise NotFoldable("not a tensor (sequence, map or optional)")
        out.append(value)
    return out
