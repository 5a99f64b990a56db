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

It runs where every op between the inputs and the outputs is one it differentiates (MLPs:
Gemm, MatMul, element-wise arithmetic, the usual activations, Softmax, Reshape/Flatten) and the
inputs are real float data; elsewhere it leaves the layer-wise fit as it is, with a note naming
what stopped it. The number of steps is chosen on held-out data: it trains on the even samples
and scores the odd ones as it goes, then trains on all samples for the best number of steps, and
keeps the layer-wise fit where no step count beat it on the held-out half.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnxshrink.errors import OnnxShrinkError
from onnxshrink.graph import attribute, subgraphs
from onnxshrink.pass_base import Note

MIXUP = 1  # mixed pairs per sample per step (3 fit the digits MLP no better on held-out samples, 1.4x slower)
_CHECKS = 20  # held-out scores per training run
_MAX_WORK = 2e12  # multiply-adds allowed for both training runs together (about a minute on 2 cores)
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
    "Relu": (lambda x, n: np.maximum(x[0], 0), lambda x, y, g, n: [g * (x[0] > 0)]),
    "LeakyRelu": (lambda x, n: np.where(x[0] > 0, x[0], _leaky(n) * x[0]),
                  lambda x, y, g, n: [np.where(x[0] > 0, g, _leaky(n) * g)]),
    "Sigmoid": (lambda x, n: 1 / (1 + np.exp(-x[0])), lambda x, y, g, n: [g * y * (1 - y)]),
    "Tanh": (lambda x, n: np.tanh(x[0]), lambda x, y, g, n: [g * (1 - y * y)]),
    "Identity": (lambda x, n: x[0], lambda x, y, g, n: [g]),
    "Softmax": (lambda x, n: _softmax(x[0], attribute(n, "axis", -1)), _softmax_grad),
    "Reshape": (lambda x, n: x[0].reshape(_target_shape(x[0], x[1], n)),
                lambda x, y, g, n: [g.reshape(x[0].shape), None]),
    "Flatten": (lambda x, n: x[0].reshape(int(np.prod(x[0].shape[:attribute(n, "axis", 1)])), -1),
                lambda x, y, g, n: [g.reshape(x[0].shape)]),
}


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
        grads = dict(output_grads)
        for node in reversed(self.nodes):
            g = grads.pop(node.output[0], None)
            if g is None:
                continue
            inputs = [env[i] if i else None for i in node.input]
            for name, grad in zip(node.input, _OPS[node.op_type][1](inputs, env[node.output[0]], g, node)):
                if grad is None or not name or (name in self.constants and name not in wanted):
                    continue
                grads[name] = grads[name] + grad if name in grads else grad
        return {name: grads[name] for name in wanted if name in grads}


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
    work = 6 * steps * 2 * (1 + MIXUP) * count * sum(u.positions.size if u.positions is not None
                                                         else u.values.size for u in unknowns)
    if not unknowns or work > _MAX_WORK:
        why = "no MatMul/Gemm weight to refit" if not unknowns else f"about {work:.1e} multiply-adds is too much"
        return [Note("(graph)", f"network refit skipped: {why}")]
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
    computed = program.forward(probe, _expanded(unknowns, [u.values for u in unknowns], snap=False))
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
    held_batch = {k: v[held] for k, v in samples.items()}
    held_targets = targets(held_batch)

    def error(values, snap: bool = True) -> float:
        env = program.forward(held_batch, _expanded(unknowns, values, snap))
        return sum(float(np.sum((env[n] - t) ** 2, dtype=np.float64) / max(np.sum(t * t, dtype=np.float64), 1e-30))
                   for n, t in held_targets.items())

    before = error(start, snap=False)
    scores = _train(program, unknowns, start, samples, train, targets, steps, steps, rate, error)
    best_steps, best, _ = min(scores, key=lambda item: (item[1], item[0]))
    if best_steps == 0 or best >= before * 0.99:
        return [Note("(graph)", f"network refit: no step count beat the layer-wise fit on held-out samples "
                                f"(error {before:.3g}); layer-wise fit kept")]
    final = _train(program, unknowns, start, samples, np.arange(count), targets, best_steps, steps, rate, None)
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
    """The samples as one batch per input (float inputs only, concatenated along the first axis)."""
    stacked = {}
    for name in inputs:
        parts = [np.asarray(feed[name]) for feed in feeds]
        if parts[0].dtype.kind != "f" or parts[0].ndim == 0:
            raise _Unsupported(f"input '{name}' of type {parts[0].dtype} (mixing inputs needs float data)")
        if len({p.shape[1:] for p in parts}) != 1:
            raise _Unsupported(f"input '{name}' whose samples differ in shape")
        stacked[name] = np.concatenate(parts).astype(np.float32)
    sizes = {len(v) for v in stacked.values()}
    if len(sizes) != 1:
        raise _Unsupported("inputs with different batch sizes")
    return stacked


def _expanded(unknowns, values, snap: bool = True) -> dict:
    """The tensors the program reads, in float32: the values are kept in float64, the products need
    no more than the model itself computes with."""
    return {u.read_as: u.expand(v, snap).astype(np.float32) for u, v in zip(unknowns, values)}


def _train(program, unknowns, start, samples, rows, targets, steps, schedule, rate, error) -> list:
    """Adam from `start` on `rows` plus fresh mixup pairs each step, for `steps` of a cosine schedule
    `schedule` steps long; returns (steps, held-out error, values) at each check (only the last,
    without `error`)."""
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
    real_targets = targets(real)  # the rows themselves are the same every step; only the mixtures are new
    for step in range(1, steps + 1):
        decay = 0.5 * (1 + np.cos(np.pi * step / (schedule + 1)))  # cosine: settles as the schedule ends
        base = np.tile(rows, MIXUP)
        other = rng.choice(rows, size=base.size)
        mix = rng.uniform(0, 1, size=base.size)
        mixed = {}
        for name, x in samples.items():
            lam = mix.reshape((-1,) + (1,) * (x.ndim - 1))
            mixed[name] = lam * x[base] + (1 - lam) * x[other]
        batch = {name: np.concatenate([real[name], mixed[name]]) for name in samples}
        wanted = {n: np.concatenate([real_targets[n], t]) for n, t in targets(mixed).items()}
        env = program.forward(batch, _expanded(unknowns, values))
        output_grads = {n: (2 / max(float(np.sum(t * t, dtype=np.float64)), 1e-30)) * (env[n] - t)
                        for n, t in wanted.items()}
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
