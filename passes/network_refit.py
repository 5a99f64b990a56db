"""Refine the layers `reconstruct` refit, all together, against the original model's outputs.

Layer-wise least squares fits each layer to its own original outputs, so it cannot undo an error
that only a later layer could absorb: at 90% sparsity the digits MLP keeps 2-3 points of accuracy
lost after it. This is the fine-tuning step of Deep Compression, done on the graph: gradient
descent (Adam) on the same unknowns the layer-wise fit has (the nonzero weights, or the codebook
values of a clustered weight, and the biases; zeros stay), so that the model's outputs match the
original model's on the calibration inputs and on mixtures of pairs of them (mixup; the original
model labels any input, so the fit sees more than the few hundred samples it has). A clustered
weight's codes may change too: each nonzero weight keeps a value of its own that snaps to a value
of its codebook (see _Unknown), charged for the code length pack will spend on it.

It runs where every op between the inputs and the outputs is one it differentiates or, for index
and shape arithmetic, evaluates (MLPs, and transformer encoders as exporters write them: MatMul,
Gemm, element-wise arithmetic, the usual activations, Erf, Softmax, LayerNormalization, reductions,
Reshape/Transpose/Gather/Concat/Slice, Shape/Range/...; not Conv) and the calibration data is real;
elsewhere it leaves the layer-wise fit as it is, with a note naming what stopped it. Token inputs
(integers that index an embedding table) cannot be mixed: a step trains on its rows with 15% of
their real positions drawn at random from the table instead (_Swap), and the held-out rows are
varied the same way; positions an `attention_mask` marks as padding do not count in the error.
A step trains on all its rows while that is cheap, on a random batch of them for a large model
(_STEP_WORK). The number of steps is chosen on held-out data: it trains on the even samples and
scores the odd ones as it goes, then trains on all samples for the best number of steps, and
keeps the layer-wise fit where no step count beat it on the held-out half.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import scipy.special
from onnx import TensorProto, numpy_helper

from onnxshrink.errors import OnnxShrinkError
from onnxshrink.graph import attribute, subgraphs
from onnxshrink.pass_base import Note

MIXUP = 1  # mixed pairs per sample per step (3 fit the digits MLP no better on held-out samples, 1.4x slower)
_CHECKS = 20  # held-out scores per training run
_MAX_WORK = 2e13  # multiply-adds allowed for both training runs together (about ten minutes on 2 cores)
_STEP_WORK = 2e10  # a step trains on all its rows up to this many multiply-adds, on a random batch of them above
_TOKEN_SWAP = 0.15  # token inputs: the share of real positions an augmented row draws at random
PADDING_INPUT = "attention_mask"  # marks the positions of a sequence that are padding (0), as prune reads it
_FLOATS = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16)


# --------------------------------------------------------------------------
# the ops it differentiates: forward(inputs, node) -> output, backward(...) -> input gradients
# --------------------------------------------------------------------------
def _unbroadcast(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum a broadcast result's gradient back to an operand's shape."""
    while grad.ndim > len(shape):
        grad = grad.sum(axis=0)
    for axis, size in enumerate(shape):
        if size == 1 and grad.shape[axis] != 1:
            grad = grad.sum(axis=axis, keepdims=True)
    return grad


def _gemm(x, node):
    a, b = x[0], x[1]
    a = a.T if attribute(node, "transA", 0) else a
    b = b.T if attribute(node, "transB", 0) else b
    y = attribute(node, "alpha", 1.0) * (a @ b)
    return y + attribute(node, "beta", 1.0) * x[2] if len(x) > 2 and x[2] is not None else y


def _gemm_grad(x, y, g, node):
    alpha = attribute(node, "alpha", 1.0)
    a = x[0].T if attribute(node, "transA", 0) else x[0]
    b = x[1].T if attribute(node, "transB", 0) else x[1]
    da, db = alpha * (g @ b.T), alpha * (a.T @ g)
    grads = [da.T if attribute(node, "transA", 0) else da, db.T if attribute(node, "transB", 0) else db]
    if len(x) > 2 and x[2] is not None:
        grads.append(_unbroadcast(attribute(node, "beta", 1.0) * g, x[2].shape))
    return grads


def _matmul_grad(x, y, g, node):
    a, b = x
    if a.ndim == 1 or b.ndim == 1:
        raise _Unsupported(f"MatMul with a 1-D operand at {_where(node)}")
    return [_unbroadcast(g @ np.swapaxes(b, -1, -2), a.shape), _unbroadcast(np.swapaxes(a, -1, -2) @ g, b.shape)]


def _softmax(v, axis):
    e = np.exp(v - v.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _softmax_grad(x, y, g, node):
    axis = attribute(node, "axis", -1)
    return [y * (g - np.sum(g * y, axis=axis, keepdims=True))]


def _leaky(node):
    return attribute(node, "alpha", 0.01)


def _axes(x, node, index: int = 1):
    """The axes a Reduce/Squeeze/Unsqueeze node names: its attribute (older opsets) or its input."""
    axes = attribute(node, "axes")
    if axes is None and len(x) > index and x[index] is not None:
        axes = x[index].tolist()
    return None if axes is None else tuple(int(a) for a in axes)


def _reduced_axes(x, node, data):
    axes = _axes(x, node)
    if axes is None or not axes:
        return None if not (axes == () and attribute(node, "noop_with_empty_axes", 0)) else ()
    return tuple(a % data.ndim for a in axes)


def _reduce(fn):
    def forward(x, node):
        axes = _reduced_axes(x, node, x[0])
        if axes == ():
            return x[0]
        return fn(x[0], axis=axes, keepdims=bool(attribute(node, "keepdims", 1)))
    return forward


def _kept(g, x, node):
    """A reduction's output gradient, with the reduced axes back (size 1), broadcastable over x."""
    axes = _reduced_axes(x, node, x[0])
    if axes is None:
        axes = tuple(range(x[0].ndim))
    return g if attribute(node, "keepdims", 1) else np.expand_dims(g, axes)


def _reduce_sum_grad(x, y, g, node):
    if _reduced_axes(x, node, x[0]) == ():
        return [g]
    return [np.broadcast_to(_kept(g, x, node), x[0].shape)]


def _reduce_mean_grad(x, y, g, node):
    (grad,) = _reduce_sum_grad(x, y, g, node)
    return [grad if _reduced_axes(x, node, x[0]) == () else grad * (y.size / x[0].size)]


def _reduce_l2_grad(x, y, g, node):
    norm = y if attribute(node, "keepdims", 1) else _kept(y, x, node)
    return [_kept(g, x, node) * x[0] / np.maximum(norm, 1e-30)]


def _normalized(x, node):
    axis = attribute(node, "axis", -1) % x[0].ndim
    axes = tuple(range(axis, x[0].ndim))
    centred = x[0] - x[0].mean(axis=axes, keepdims=True)
    inverse = 1 / np.sqrt((centred * centred).mean(axis=axes, keepdims=True) + attribute(node, "epsilon", 1e-5))
    return centred * inverse, inverse, axes


def _layer_norm(x, node):
    normal, _, _ = _normalized(x, node)
    y = normal * x[1]
    return y + x[2] if len(x) > 2 and x[2] is not None else y


def _layer_norm_grad(x, y, g, node):
    normal, inverse, axes = _normalized(x, node)
    dnormal = g * x[1]
    dx = inverse * (dnormal - dnormal.mean(axis=axes, keepdims=True)
                    - normal * (dnormal * normal).mean(axis=axes, keepdims=True))
    grads = [dx, _unbroadcast(g * normal, x[1].shape)]
    if len(x) > 2 and x[2] is not None:
        grads.append(_unbroadcast(g, x[2].shape))
    return grads


def _clip(x, node):
    low = attribute(node, "min") if len(x) < 2 or x[1] is None else x[1]
    high = attribute(node, "max") if len(x) < 3 or x[2] is None else x[2]
    return np.clip(x[0], low, high)


def _gather_grad(x, y, g, node):
    if x[0].dtype.kind != "f":
        return [None, None]
    axis = attribute(node, "axis", 0) % x[0].ndim
    grad = np.zeros(x[0].shape, g.dtype)
    index = np.where(x[1] < 0, x[1] + x[0].shape[axis], x[1])
    moved = np.moveaxis(grad, axis, 0)  # a view: adds reach grad
    np.add.at(moved, index, np.moveaxis(g, tuple(range(axis, axis + index.ndim)), tuple(range(index.ndim))))
    return [grad, None]


def _concat_grad(x, y, g, node):
    axis = attribute(node, "axis") % y.ndim
    bounds = np.cumsum([part.shape[axis] for part in x])[:-1]
    return [part if part.dtype.kind == "f" else None for part in np.split(g, bounds, axis=axis)]


def _slices(x, node):
    """Slice's index tuple for the data x[0] (opset 10+: starts, ends, axes, steps as inputs)."""
    starts, ends = x[1], x[2]
    axes = x[3] if len(x) > 3 and x[3] is not None else np.arange(len(starts))
    steps = x[4] if len(x) > 4 and x[4] is not None else np.ones(len(starts), np.int64)
    index = [slice(None)] * x[0].ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[int(axis) % x[0].ndim] = slice(int(start), int(end), int(step))
    return tuple(index)


def _slice_grad(x, y, g, node):
    grad = np.zeros(x[0].shape, g.dtype)
    grad[_slices(x, node)] = g
    return [grad]


def _transpose_perm(x, node):
    return attribute(node, "perm", list(range(x[0].ndim))[::-1])


def _cast(x, node):
    to = attribute(node, "to")
    return x[0].astype(np.float32) if to in _FLOATS else x[0].astype(onnx.helper.tensor_dtype_to_np_dtype(to))


def _where_grad(x, y, g, node):
    return [None, _unbroadcast(np.where(x[0], g, 0), x[1].shape), _unbroadcast(np.where(x[0], 0, g), x[2].shape)]


def _no_gradient(x, y, g, node):
    return [None] * len(x)


_OPS = {
    "Gemm": (_gemm, _gemm_grad),
    "MatMul": (lambda x, n: x[0] @ x[1], _matmul_grad),
    "Add": (lambda x, n: x[0] + x[1],
            lambda x, y, g, n: [_unbroadcast(g, x[0].shape), _unbroadcast(g, x[1].shape)]),
    "Sub": (lambda x, n: x[0] - x[1],
            lambda x, y, g, n: [_unbroadcast(g, x[0].shape), _unbroadcast(-g, x[1].shape)]),
    "Mul": (lambda x, n: x[0] * x[1],
            lambda x, y, g, n: [_unbroadcast(g * x[1], x[0].shape), _unbroadcast(g * x[0], x[1].shape)]),
    "Div": (lambda x, n: x[0] / x[1],
            lambda x, y, g, n: [_unbroadcast(g / x[1], x[0].shape), _unbroadcast(-g * y / x[1], x[1].shape)]),
    "Neg": (lambda x, n: -x[0], lambda x, y, g, n: [-g]),
    "Sqrt": (lambda x, n: np.sqrt(x[0]), lambda x, y, g, n: [g / (2 * y)]),
    "Pow": (lambda x, n: np.power(x[0], x[1]),  # the exponent is a constant (a square in decomposed norms)
            lambda x, y, g, n: [_unbroadcast(g * x[1] * np.power(x[0], x[1] - 1), x[0].shape), None]),
    "Relu": (lambda x, n: np.maximum(x[0], 0), lambda x, y, g, n: [g * (x[0] > 0)]),
    "LeakyRelu": (lambda x, n: np.where(x[0] > 0, x[0], _leaky(n) * x[0]),
                  lambda x, y, g, n: [np.where(x[0] > 0, g, _leaky(n) * g)]),
    "Sigmoid": (lambda x, n: 1 / (1 + np.exp(-x[0])), lambda x, y, g, n: [g * y * (1 - y)]),
    "Tanh": (lambda x, n: np.tanh(x[0]), lambda x, y, g, n: [g * (1 - y * y)]),
    "Erf": (lambda x, n: scipy.special.erf(x[0]).astype(x[0].dtype),
            lambda x, y, g, n: [g * (2 / np.sqrt(np.pi)) * np.exp(-x[0] * x[0])]),
    "Clip": (_clip, lambda x, y, g, n: [g * (y == x[0])] + [None] * (len(x) - 1)),
    "Identity": (lambda x, n: x[0], lambda x, y, g, n: [g]),
    "Softmax": (lambda x, n: _softmax(x[0], attribute(n, "axis", -1)), _softmax_grad),
    "LayerNormalization": (_layer_norm, _layer_norm_grad),
    "ReduceSum": (_reduce(np.sum), _reduce_sum_grad),
    "ReduceMean": (_reduce(np.mean), _reduce_mean_grad),
    "ReduceL2": (_reduce(lambda v, axis, keepdims: np.sqrt(np.sum(v * v, axis=axis, keepdims=keepdims))),
                 _reduce_l2_grad),
    "Reshape": (lambda x, n: x[0].reshape(_target_shape(x[0], x[1], n)),
                lambda x, y, g, n: [g.reshape(x[0].shape), None]),
    "Flatten": (lambda x, n: x[0].reshape(int(np.prod(x[0].shape[:attribute(n, "axis", 1)])), -1),
                lambda x, y, g, n: [g.reshape(x[0].shape)]),
    "Unsqueeze": (lambda x, n: np.expand_dims(x[0], tuple(a % (x[0].ndim + len(_axes(x, n))) for a in _axes(x, n))),
                  lambda x, y, g, n: [g.reshape(x[0].shape), None]),
    "Squeeze": (lambda x, n: np.squeeze(x[0], axis=_axes(x, n)),
                lambda x, y, g, n: [g.reshape(x[0].shape), None]),
    "Transpose": (lambda x, n: np.transpose(x[0], _transpose_perm(x, n)),
                  lambda x, y, g, n: [np.transpose(g, np.argsort(_transpose_perm(x, n)))]),
    "Gather": (lambda x, n: np.take(x[0], x[1], axis=attribute(n, "axis", 0)), _gather_grad),
    "Concat": (lambda x, n: np.concatenate(x, axis=attribute(n, "axis")), _concat_grad),
    "Slice": (lambda x, n: x[0][_slices(x, n)], lambda x, y, g, n: _slice_grad(x, y, g, n) + [None] * (len(x) - 1)),
    "Expand": (lambda x, n: x[0] * np.ones([int(v) for v in x[1]], x[0].dtype),
               lambda x, y, g, n: [_unbroadcast(g, x[0].shape), None]),
    "Where": (lambda x, n: np.where(x[0], x[1], x[2]), _where_grad),
    "Cast": (_cast, lambda x, y, g, n: [g if x[0].dtype.kind == "f" else None]),
    # index and shape arithmetic: no gradient flows through them
    "Shape": (lambda x, n: np.array(x[0].shape[attribute(n, "start", 0):attribute(n, "end", x[0].ndim)],
                                    np.int64), _no_gradient),
    "Range": (lambda x, n: np.arange(x[0], x[1], x[2]).astype(np.result_type(x[0], x[1], x[2])), _no_gradient),
    "Equal": (lambda x, n: np.equal(x[0], x[1]), _no_gradient),
    "ConstantOfShape": (lambda x, n: np.full([int(v) for v in x[0]], _fill(n)), _no_gradient),
}


def _fill(node):
    value = attribute(node, "value")
    return numpy_helper.to_array(value).reshape(-1)[0] if value is not None else np.float32(0)


def _target_shape(x, shape, node):
    shape = [int(s) for s in shape]
    if not attribute(node, "allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return shape


class _Unsupported(Exception):
    pass


def _where(node) -> str:
    return node.name or node.output[0]


# --------------------------------------------------------------------------
# the model as a program over numpy arrays
# --------------------------------------------------------------------------
@dataclass
class _Program:
    nodes: list  # the nodes that depend on the inputs, in graph order
    constants: dict  # every other tensor they read
    inputs: list[str]
    outputs: list[str]

    def forward(self, feeds: dict, values: dict) -> dict:
        env = {**self.constants, **values, **feeds}
        for node in self.nodes:
            compute = _OPS[node.op_type][0]
            env[node.output[0]] = compute([env[i] if i else None for i in node.input], node)
        return env

    def backward(self, env: dict, output_grads: dict, wanted: set) -> dict:
        carries = set(wanted)  # the tensors computed from a wanted one: only their gradients are needed
        for node in self.nodes:
            if any(i in carries for i in node.input):
                carries.add(node.output[0])
        grads = dict(output_grads)
        for node in reversed(self.nodes):
            g = grads.pop(node.output[0], None)
            if g is None or node.output[0] not in carries:
                continue
            inputs = [env[i] if i else None for i in node.input]
            for name, grad in zip(node.input, _OPS[node.op_type][1](inputs, env[node.output[0]], g, node)):
                if grad is None or name not in carries:
                    continue
                grads[name] = grads[name] + grad if name in grads else grad
        return {name: grads[name] for name in wanted if name in grads}

    def multiply_adds(self, env: dict) -> int:
        """What the MatMul/Gemm nodes cost in the forward pass that gave `env`."""
        total = 0
        for node in self.nodes:
            if node.op_type in ("MatMul", "Gemm"):
                a = env[node.input[0]]
                reduced = a.shape[0] if node.op_type == "Gemm" and attribute(node, "transA", 0) else a.shape[-1]
                total += int(env[node.output[0]].size) * int(reduced)
        return total


def _program(model: onnx.ModelProto, sample: dict) -> _Program:
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [v.name for v in graph.input if v.name not in initializers]
    live = set(inputs)
    nodes, constant_reads = [], set()
    for node in graph.node:
        if next(subgraphs(node), None) is not None:  # an If or Loop may read the inputs through its body
            raise _Unsupported(f"{node.op_type} (a subgraph) at {_where(node)}")
        if not any(i in live for i in node.input):
            continue
        if node.domain not in ("", "ai.onnx") or node.op_type not in _OPS or len(node.output) != 1:
            raise _Unsupported(f"{node.op_type} at {_where(node)}")
        if node.op_type == "Softmax" and attribute(node, "axis", -1) not in (-1,) and \
                _opset(model) < 13:  # before opset 13 Softmax flattens from `axis`: not differentiated here
            raise _Unsupported(f"opset {_opset(model)} Softmax at {_where(node)}")
        nodes.append(node)
        live.add(node.output[0])
        constant_reads.update(i for i in node.input if i and i not in live)
    outputs = [v.name for v in graph.output]
    if not all(name in live for name in outputs):
        raise _Unsupported("an output that does not depend on the inputs")
    return _Program(nodes, _constant_values(model, constant_reads, sample), inputs, outputs)


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _constant_values(model, names: set, sample: dict) -> dict:
    """The values of tensors the program reads but does not compute: initializers, and the outputs
    of constant subgraphs (a clustered weight's decoder) evaluated by onnxruntime."""
    from onnxshrink.runtime import make_session

    values = {t.name: numpy_helper.to_array(t).astype(np.float32) if t.data_type in _FLOATS else numpy_helper.to_array(t)
              for t in model.graph.initializer if t.name in names}
    computed = sorted(names - set(values))
    if computed:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.output[:]
        probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in computed)
        for name, value in zip(computed, make_session(probe, threads=1).run(computed, sample)):
            values[name] = value.astype(np.float32) if value.dtype.kind == "f" else value
    return values


# --------------------------------------------------------------------------
# the unknowns: the layers' free weights or codebook values, and their biases
# --------------------------------------------------------------------------
@dataclass
class _Unknown:
    """One tensor the fit changes, held as its free values; `expand` gives the tensor the program
    reads, `collect` turns that tensor's gradient into the free values' gradient.

    A codebook whose codes can be rewritten (`size` > 0) also carries each nonzero weight's own
    value after the codebook's (`values` = codebook + latent weights): every step snaps a weight
    to the nearest nonzero value of its codebook row, and its gradient passes straight through
    the snap to its own value, so weights may change code (quantization-aware training; zeros and
    the number of bits stay)."""

    tensor: str  # the initializer written back
    read_as: str  # the tensor the program reads (the decoded weight, for a codebook)
    values: np.ndarray  # free values, float64
    shape: tuple  # the tensor's (a codebook's, not counting latent weights)
    free: np.ndarray  # mask over values: False ones stay
    positions: np.ndarray | None = None  # codebook: the flat position each weight entry reads
    size: int = 0  # codebook whose codes may change: values per codebook row
    live: np.ndarray | None = None  # ... and which weight entries (flat) have a value of their own
    penalty: float = 0.0  # ... and what a bit of code costs when snapping
    snapped: np.ndarray | None = None  # the positions of the last expand

    @property
    def book(self) -> int:
        return int(np.prod(self.shape))

    def expand(self, values: np.ndarray, snap: bool = True) -> np.ndarray:
        """The tensor read; `snap=False`: with the codes as stored (the model as it is)."""
        if self.positions is None:
            return values.reshape(self.shape)
        self.snapped = self.snap(values) if self.size and snap else self.positions
        return values[self.snapped]

    def collect(self, grad: np.ndarray) -> np.ndarray:
        if self.positions is None:
            return grad.reshape(-1) * self.free
        out = np.zeros(self.values.size)
        out[:self.book] = np.bincount(self.snapped.reshape(-1), weights=grad.reshape(-1), minlength=self.book)
        if self.size:
            out[self.book:] = grad.reshape(-1)[self.live]
        return out * self.free

    def snap(self, values: np.ndarray) -> np.ndarray:
        """Each weight with a value of its own: the position of the nonzero value of its row that is
        nearest, in squared error plus `penalty` times the mean square weight per bit of code length
        (the codes' entropy, from the last snap: pack codes frequent values in fewer bits)."""
        rows = values[:self.book].reshape(-1, self.size)
        row = self.positions.reshape(-1)[self.live] // self.size
        candidates = rows[row]
        latent = values[self.book:]
        distance = (latent[:, None] - candidates) ** 2
        if self.penalty:
            last = (self.positions if self.snapped is None else self.snapped).reshape(-1)[self.live]
            counts = np.bincount(last, minlength=self.book).reshape(-1, self.size) + 1.0
            bits = -np.log2(counts / counts.sum(axis=1, keepdims=True))
            distance += self.penalty * float(np.mean(latent ** 2)) * bits[row]
        distance[candidates == 0] = np.inf  # nonzero weights stay nonzero
        snapped = self.positions.copy().reshape(-1)
        snapped[self.live] = row * self.size + distance.argmin(axis=1)
        return snapped.reshape(self.positions.shape)


def _unknowns(model: onnx.ModelProto, layers, weights: dict, penalty: float) -> list[_Unknown]:
    from .weight_sharing import code_rows

    unknowns = []
    for layer in layers:
        weight = layer.node.input[1]
        if getattr(layer, "codebook", ""):
            book = numpy_helper.to_array(weights[layer.codebook]).astype(np.float64).reshape(-1)
            stored = layer.positions.T if layer.transposed else layer.positions  # as the node reads it
            unknown = _Unknown(layer.codebook, weight, book, book.shape, book != 0, stored)
            size = code_rows(model, weight)
            if size and book.size % size == 0:
                live = (book[stored] != 0).reshape(-1)
                unknown.values = np.concatenate([book, book[stored].reshape(-1)[live]])
                unknown.free = np.concatenate([book != 0, np.ones(int(live.sum()), bool)])
                unknown.size, unknown.live, unknown.penalty = size, live, penalty
            unknowns.append(unknown)
        elif layer.node.op_type in ("MatMul", "Gemm") and weight in weights:
            values = numpy_helper.to_array(weights[weight]).astype(np.float64)
            unknowns.append(_Unknown(weight, weight, values.reshape(-1), values.shape, values.reshape(-1) != 0))
        else:
            continue
        if layer.bias is not None:
            bias = numpy_helper.to_array(weights[layer.bias]).astype(np.float64)
            unknowns.append(_Unknown(layer.bias, layer.bias, bias.reshape(-1), bias.shape,
                                     np.ones(bias.size, bool)))
    return unknowns


# --------------------------------------------------------------------------
# the fit
# --------------------------------------------------------------------------
def refine(model: onnx.ModelProto, reference: onnx.ModelProto, layers: list, weights: dict, data, real: bool,
           steps: int, rate: float, max_samples: int, penalty: float) -> list[Note]:
    """Refine `layers` (after their layer-wise fit) together; writes into `weights` (and a clustered
    weight's codes into `model`) and returns notes."""
    from onnxshrink.runtime import make_session, run_all

    from .weight_sharing import recode

    try:
        program = _program(model, data.take(1)[0])
        if not real:
            return [Note("(graph)", "network refit skipped: it needs real calibration data, not synthesized inputs")]
        feeds = data.take(max_samples)  # at most that many rows: each feed holds one or more
        samples = {k: v[:max_samples] for k, v in _stack_feeds(feeds, program.inputs).items()}
    except _Unsupported as exc:
        return [Note("(graph)", f"network refit skipped: it does not differentiate {exc}; layer-wise fit kept")]
    count = len(next(iter(samples.values())))
    if count < 8:
        return [Note("(graph)", f"network refit skipped: {count} calibration rows are too few")]
    unknowns = _unknowns(model, layers, weights, penalty)
    for unknown in unknowns:
        program.constants.pop(unknown.read_as, None)
    if not unknowns:
        return [Note("(graph)", "network refit skipped: no MatMul/Gemm weight to refit")]
    names = [o.name for o in reference.graph.output]
    if names != program.outputs:
        return [Note("(graph)", "network refit skipped: the outputs differ from the original model's")]
    dtypes = {k: feeds[0][k].dtype for k in program.inputs}
    try:  # many samples in one run: the first axis made free (an exporter may have fixed it to 1)
        teacher = make_session(_any_batch(reference, program.inputs), threads=1)
        current = make_session(_any_batch(model, program.inputs), threads=1)
        probe = {k: v[:8] for k, v in samples.items()}
        (expected,) = run_all(current, [{k: v.astype(dtypes[k]) for k, v in probe.items()}])
    except OnnxShrinkError as exc:
        return [Note("(graph)", f"network refit skipped: the model does not run on a batch of samples ({exc})")]
    try:
        computed = program.forward(probe, _expanded(unknowns, [u.values for u in unknowns], snap=False))
    except (ValueError, IndexError, TypeError, ArithmeticError) as exc:  # numpy refuses what ORT ran
        return [Note("(graph)", f"network refit skipped: its numpy program fails where onnxruntime runs "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")]
    per_row = program.multiply_adds(computed) / len(next(iter(probe.values())))
    batch_rows = int(max(8, _STEP_WORK // (6 * (1 + MIXUP) * max(per_row, 1))))  # rows a step trains on, at most
    # forward + backward over real and augmented rows, in the run on half the rows and the run on all
    work = steps * 3 * (1 + MIXUP) * per_row * (min(batch_rows, (count + 1) // 2) + min(batch_rows, count))
    if work > _MAX_WORK:
        return [Note("(graph)", f"network refit skipped: about {work:.1e} multiply-adds is too much (steps="
                                f"{int(steps * _MAX_WORK // work)} would fit)")]
    for name, value in zip(names, expected):  # the numpy program must be the model onnxruntime runs
        got = computed[name]
        if got.shape != value.shape or np.linalg.norm(got - value) > 1e-3 * max(np.linalg.norm(value), 1e-12):
            return [Note("(graph)", f"network refit skipped: its numpy program does not reproduce output "
                                    f"'{name}' as onnxruntime computes it")]

    def targets(batch):
        return dict(zip(names, (o.astype(np.float32) for o in teacher.run(None, {k: v.astype(dtypes[k])
                                                                                   for k, v in batch.items()}))))

    start = [u.values.copy() for u in unknowns]
    train, held = np.arange(0, count, 2), np.arange(1, count, 2)
    augment = _augmentation(program, samples)
    held_batch = {k: v[held] for k, v in samples.items()}
    if isinstance(augment, _Swap):  # the layer-wise fits have seen these rows; varied as training varies them,
        held_batch = augment(samples, held, np.random.default_rng(1), copies=1)  # they are new to every fit
    held_targets = targets(held_batch)

    def error(values, snap: bool = True) -> float:
        env = program.forward(held_batch, _expanded(unknowns, values, snap))
        total = 0.0
        for n, t in held_targets.items():
            weight = _real_positions(held_batch, t)
            total += float(np.sum(weight * (env[n] - t) ** 2, dtype=np.float64)
                           / max(np.sum(weight * t * t, dtype=np.float64), 1e-30))
        return total

    before = error(start, snap=False)
    scores = _train(program, unknowns, start, samples, train, targets, steps, steps, rate, error, batch_rows, augment)
    best_steps, best, _ = min(scores, key=lambda item: (item[1], item[0]))
    if best_steps == 0 or best >= before * 0.99:
        return [Note("(graph)", f"network refit: no step count beat the layer-wise fit on held-out samples "
                                f"(error {before:.3g}); layer-wise fit kept")]
    final = _train(program, unknowns, start, samples, np.arange(count), targets, best_steps, steps, rate, None,
                   batch_rows, augment)
    values = final[-1][2]
    moved = 0
    codes = {t.name: t.SerializeToString() for t in model.graph.initializer if t.data_type == TensorProto.UINT8}
    for unknown, solved in zip(unknowns, values):  # codes first: where one cannot be rewritten, all stay
        if unknown.size:
            positions = unknown.snap(solved)
            moved += int(np.sum(positions != unknown.positions))
            if not recode(model, unknown.read_as, positions):
                for tensor in model.graph.initializer:
                    if tensor.name in codes:
                        tensor.ParseFromString(codes[tensor.name])
                return [Note("(graph)", f"network refit: the codes of {unknown.read_as} could not be rewritten; "
                                        f"layer-wise fit kept")]
    for unknown, solved in zip(unknowns, values):
        stored = weights[unknown.tensor]
        dtype = np.float16 if stored.data_type == TensorProto.FLOAT16 else np.float32
        weights[unknown.tensor].CopyFrom(numpy_helper.from_array(
            solved[:unknown.book].reshape(unknown.shape).astype(dtype), unknown.tensor))
    refit = len({u.read_as for u in unknowns} & {layer.node.input[1] for layer in layers})
    recoded = f"; {moved:,} weights changed code" if any(u.size for u in unknowns) else ""
    return [Note("(graph)", f"network refit of {refit} layers ({sum(int(u.free.sum()) for u in unknowns):,} "
                            f"values) over {best_steps} steps: held-out output error {before:.3g} -> {best:.3g} "
                            f"of the original output energy (trained on half the samples; then on all){recoded}")]


def _any_batch(model: onnx.ModelProto, inputs: list[str]) -> onnx.ModelProto:
    """A copy whose inputs and outputs take any size on their first axis (intermediate shapes dropped)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.value_info[:]
    for value in list(copy.graph.input) + list(copy.graph.output):
        if value.name in inputs or value in copy.graph.output:
            dims = value.type.tensor_type.shape.dim
            if len(dims):
                dims[0].Clear()
                dims[0].dim_param = "batch"
    return copy


def _stack_feeds(feeds: list[dict], inputs: list[str]) -> dict:
    """The samples as one batch per input, concatenated along the first axis (floats as float32)."""
    stacked = {}
    for name in inputs:
        parts = [np.asarray(feed[name]) for feed in feeds]
        if parts[0].ndim == 0:
            raise _Unsupported(f"input '{name}' that is a scalar")
        if len({p.shape[1:] for p in parts}) != 1:
            raise _Unsupported(f"input '{name}' whose samples differ in shape")
        joined = np.concatenate(parts)
        if joined.dtype.kind not in "fiub":
            raise _Unsupported(f"input '{name}' of type {joined.dtype}")
        stacked[name] = joined.astype(np.float32) if joined.dtype.kind == "f" else joined
    sizes = {len(v) for v in stacked.values()}
    if len(sizes) != 1:
        raise _Unsupported("inputs with different batch sizes")
    return stacked


def _real_positions(batch: dict, output: np.ndarray) -> np.ndarray | float:
    """Weights over an output's entries: 0 where the padding input marks its [batch, sequence] position
    as padding (the original model's values there feed nothing), else 1 (the float: every entry counts)."""
    mask = batch.get(PADDING_INPUT)
    if mask is None or mask.ndim != 2 or output.shape[:2] != mask.shape:
        return 1.0
    return (mask != 0).reshape(mask.shape + (1,) * (output.ndim - 2)).astype(np.float32)


# --------------------------------------------------------------------------
# more inputs than the calibration rows: the original model labels any input
# --------------------------------------------------------------------------
def _augmentation(program: _Program, samples: dict):
    """How a step makes inputs beyond its rows: mixtures of pairs of rows where every input is float
    (mixup); where inputs are token ids (integers a Gather reads from a constant table), the rows with
    a share of their real positions drawn at random from the table; else none."""
    if all(x.dtype.kind == "f" for x in samples.values()):
        return _mixup
    tables = {}
    for node in program.nodes:
        if node.op_type == "Gather" and node.input[1] in samples and node.input[0] in program.constants \
                and samples[node.input[1]].dtype.kind in "iu" and attribute(node, "axis", 0) == 0:
            tables[node.input[1]] = min(tables.get(node.input[1], 1 << 62), len(program.constants[node.input[0]]))
    if not tables:
        return None
    return _Swap(tables)


def _mixup(samples: dict, rows: np.ndarray, rng) -> dict:
    base = np.tile(rows, MIXUP)
    other = rng.choice(rows, size=base.size)
    mix = rng.uniform(0, 1, size=base.size)
    mixed = {}
    for name, x in samples.items():
        lam = mix.reshape((-1,) + (1,) * (x.ndim - 1))
        mixed[name] = lam * x[base] + (1 - lam) * x[other]
    return mixed


@dataclass
class _Swap:
    """Token rows with a share of their real positions drawn at random from the embedding table. They
    take the place of the rows (1 + MIXUP copies each): a transformer learns a few hundred sentences by
    heart in a few dozen steps, and held-out rows are compared the same way (see refine)."""

    tables: dict  # token input -> rows of the table it indexes

    def __call__(self, samples: dict, rows: np.ndarray, rng, copies: int = 1 + MIXUP) -> dict:
        swapped = {name: np.tile(x[rows], (copies,) + (1,) * (x.ndim - 1)) for name, x in samples.items()}
        mask = swapped.get(PADDING_INPUT)
        for name, size in self.tables.items():
            ids = swapped[name]
            real = mask != 0 if mask is not None and mask.shape == ids.shape else np.ones(ids.shape, bool)
            chosen = real & (rng.random(ids.shape) < _TOKEN_SWAP)
            ids[chosen] = rng.integers(0, size, int(chosen.sum()))
        return swapped


def _expanded(unknowns, values, snap: bool = True) -> dict:
    """The tensors the program reads, in float32: the values are kept in float64, the products need
    no more than the model itself computes with."""
    return {u.read_as: u.expand(v, snap).astype(np.float32) for u, v in zip(unknowns, values)}


def _train(program, unknowns, start, samples, rows, targets, steps, schedule, rate, error, batch_rows,
           augment) -> list:
    """Adam from `start` on `rows` (all of them each step, or `batch_rows` drawn at random) plus as
    many mixtures, or on token-swapped copies of them, for `steps` of a cosine schedule `schedule`
    steps long; returns (steps, held-out error, values) at each check (only the last, without `error`)."""
    rng = np.random.default_rng(0)
    for unknown in unknowns:
        unknown.snapped = None  # code frequencies start from the codes as stored
    values = [v.copy() for v in start]
    scale = [max(float(np.sqrt(np.mean(v[u.free] ** 2))) if u.free.any() else 0.0, 1e-8)
             for u, v in zip(unknowns, start)]
    first = [np.zeros_like(v) for v in values]
    second = [np.zeros_like(v) for v in values]
    checks = [(0, error(values, False), None)] if error is not None else []  # step 0: the codes as stored
    every = max(1, schedule // _CHECKS)
    real = {name: x[rows] for name, x in samples.items()}
    # the rows themselves are the same every step (swapped tokens make new ones of them all)
    real_targets = targets(real) if not isinstance(augment, _Swap) else {}
    for step in range(1, steps + 1):
        decay = 0.5 * (1 + np.cos(np.pi * step / (schedule + 1)))  # cosine: settles as the schedule ends
        chosen, batch, wanted = rows, real, real_targets
        if batch_rows < len(rows):
            pick = np.sort(rng.choice(len(rows), batch_rows, replace=False))
            chosen = rows[pick]
            batch = {name: x[pick] for name, x in real.items()}
            wanted = {name: t[pick] for name, t in real_targets.items()}
        if isinstance(augment, _Swap):
            batch = augment(samples, chosen, rng)
            wanted = targets(batch)
        elif augment is not None:
            extra = augment(samples, chosen, rng)
            batch = {name: np.concatenate([batch[name], extra[name]]) for name in samples}
            wanted = {n: np.concatenate([wanted[n], t]) for n, t in targets(extra).items()}
        env = program.forward(batch, _expanded(unknowns, values))
        output_grads = {}
        for n, t in wanted.items():
            weight = _real_positions(batch, t)
            output_grads[n] = (2 / max(float(np.sum(weight * t * t, dtype=np.float64)), 1e-30)) * weight * (env[n] - t)
        grads = program.backward(env, output_grads, {u.read_as for u in unknowns})
        for i, unknown in enumerate(unknowns):
            grad = unknown.collect(grads[unknown.read_as].astype(np.float64)) if unknown.read_as in grads else 0.0
            first[i] = 0.9 * first[i] + 0.1 * grad
            second[i] = 0.999 * second[i] + 0.001 * grad * grad
            update = (first[i] / (1 - 0.9 ** step)) / (np.sqrt(second[i] / (1 - 0.999 ** step)) + 1e-30)
            values[i] = values[i] - decay * rate * scale[i] * update * unknown.free
        if error is not None and step % every == 0:
            checks.append((step, error(values), None))
    if error is None:
        checks.append((steps, None, values))
    return checks
