"""Intermediate tensors of a model, streamed one calibration sample at a time.

Passes that need activations (calibration ranges, layer Hessians, input means) call
`stream_tensors` and fold each sample into running statistics, so memory stays flat in the
number of samples instead of growing with it the way keeping every activation would.
Only tensors of the main graph can be tapped; subgraph-local tensors are not visible outside.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import onnx

from .errors import OnnxShrinkError
from .graph import all_names, attribute, opset_version, outer_scope_names, subgraphs, unique_name
from .runtime import adapt_feeds, make_session

Feed = dict[str, np.ndarray]


def main_graph_tensors(model: onnx.ModelProto) -> set[str]:
    """Names that can be tapped: graph inputs and node outputs of the main graph."""
    graph = model.graph
    return {i.name for i in graph.input} | {name for node in graph.node for name in node.output if name}


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of `model` whose graph also outputs `names` (types left open; ORT infers them)."""
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    present = {o.name for o in tapped.graph.output}
    inputs = {i.name for i in tapped.graph.input}
    for name in names:
        if name not in present and name not in inputs:
            tapped.graph.output.append(onnx.ValueInfoProto(name=name))
            present.add(name)
    return tapped


def upstream_model(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A model that computes only `names` (main-graph tensors, its outputs): the nodes they depend
    on and the initializers those read. Every graph input is kept, so the same feeds fit.

    onnxruntime runs the whole graph whatever outputs are asked for; a pass that taps early
    tensors of a model many times (once per pruned layer, say) saves most of the work this way,
    and a copy of the part it needs is cheaper to build a session for than the whole model."""
    graph = model.graph
    inputs = {i.name for i in graph.input}
    wanted = list(dict.fromkeys(n for n in names if n not in inputs))
    needed = set(wanted)
    kept = []
    for node in reversed(graph.node):
        if any(output in needed for output in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
            for sub in subgraphs(node):
                needed |= outer_scope_names(sub)
    part = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name)
    part.opset_import.extend(model.opset_import)
    part.functions.extend(model.functions)
    part.graph.name = graph.name
    part.graph.node.extend(reversed(kept))
    part.graph.input.extend(graph.input)
    # Old-IR models list initializers among the graph inputs too: those must keep their values,
    # or the part would wait for a feed of them.
    part.graph.initializer.extend(t for t in graph.initializer if t.name in needed or t.name in inputs)
    part.graph.sparse_initializer.extend(t for t in graph.sparse_initializer if t.values.name in needed)
    part.graph.output.extend(onnx.ValueInfoProto(name=name) for name in wanted)
    return part


def stream_tensors(model: onnx.ModelProto, names: list[str], data: Iterable[Feed],
                   progress: Callable = lambda iterable, **_: iterable, threads: int | None = None,
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Yield, per sample, a dict name -> value of the tensors `names` (main-graph tensors only).

    Graph inputs among `names` are returned from the feed itself."""
    inputs, computed = _observable(model, names)
    present = {o.name for o in model.graph.output}
    tapped = model if present.issuperset(computed) else with_outputs(model, computed)  # a copy only when needed
    session = make_session(tapped, threads=threads) if computed else None
    for feed in progress(data, desc="calibration", unit="sample"):
        values = {n: feed[n] for n in names if n in inputs}
        if session is not None:
            feed = adapt_feeds([feed], session)[0]
            try:
                outputs = session.run(computed, feed)
            except Exception as exc:  # ORT raises its own types for kernel and feed failures
                raise OnnxShrinkError(f"onnxruntime failed on a calibration sample: {str(exc).splitlines()[0]}") from None
            values.update(zip(computed, outputs))
        yield values



def stream_extremes(model: onnx.ModelProto, names: list[str], channel_axes: dict[str, int], data: Iterable[Feed],
                    progress: Callable = lambda iterable, **_: iterable) -> Iterator[dict[str, Extremes]]:
    """Yield, per sample, name -> Extremes: min, max and (for names in `channel_axes`) the sum
    over every axis but that one, without copying the tensors out of onnxruntime.

    Float tensors of known rank are reduced inside the graph (ReduceMin/ReduceMax/ReduceSum),
    so only scalars and channel vectors cross into numpy; copying every intermediate out of
    the session and scanning it again in numpy costs about as much as running the model.
    Other tensors are tapped whole. A non-finite extreme (an inf mask, a NaN) sends that tensor
    to the whole-tensor path for this and later samples, where non-finite values are dropped."""
    inputs, computed = _observable(model, names)
    types = _float_ranks(model, computed)
    reducible = [n for n in computed if n in types and (n not in channel_axes or types[n] is not None)]
    reduced_model, fetches = _with_reductions(model, reducible, channel_axes, types)
    whole = sorted(set(computed) - set(reducible))
    fetch_names = [name for parts in fetches.values() for name in parts if name] + whole
    session = make_session(with_outputs(reduced_model, fetch_names)) if fetch_names else None
    fallback, fallback_names = None, []  # tensors whose in-graph extremes were not finite
    for feed in progress(data, desc="calibration", unit="sample"):
        summaries = {n: _summary(feed[n], channel_axes.get(n)) for n in names if n in inputs}
        if session is None:
            yield summaries
            continue
        feed = adapt_feeds([feed], session)[0]
        values = dict(zip(fetch_names, _run(session, fetch_names, feed)))
        for name in whole:
            summaries[name] = _summary(values[name], channel_axes.get(name))
        # One vectorized check, not two numpy calls per tensor (YOLOv8n: ~0.5 s per 64 samples saved).
        extremes = np.array([[values[low], values[high]] for low, high, *_ in fetches.values()], np.float64)
        finite = np.isfinite(extremes).all(axis=1) if len(extremes) else []
        flagged = [n for n, ok in zip(fetches, finite) if not ok and n not in fallback_names]
        if flagged:
            fallback_names += flagged
            fallback = make_session(with_outputs(model, fallback_names))
        for name, parts in fetches.items():
            if name not in fallback_names:
                low, high, total, size = (values[p] if p else None for p in parts)
                count = int(size) // total.size if total is not None and total.size else 0
                summaries[name] = Extremes(np.dtype(np.float32), float(low), float(high), total, count)
        if fallback is not None:
            for name, value in zip(fallback_names, _run(fallback, fallback_names, feed)):
                summaries[name] = _summary(value, channel_axes.get(name))
        yield summaries


def _observable(model: onnx.ModelProto, names: list[str]) -> tuple[set[str], list[str]]:
    """(graph input names, the other `names` in order without repeats); refuses a name that is
    not a main-graph tensor (subgraph-local tensors cannot be tapped from outside)."""
    available = main_graph_tensors(model)
    missing = [n for n in names if n not in available]
    if missing:
        raise OnnxShrinkError(f"tensor '{missing[0]}' is not a main-graph tensor and cannot be observed")
    inputs = {i.name for i in model.graph.input}
    return inputs, [n for n in dict.fromkeys(names) if n not in inputs]


class Extremes(NamedTuple):
    dtype: np.dtype
    low: float  # inf / -inf when the tensor held no finite value
    high: float
    channel_sum: np.ndarray | None  # float64, over every axis but the channel axis
    channel_count: int  # values summed per channel


def _summary(value: np.ndarray, axis: int | None) -> Extremes:
    value = np.asarray(value)
    if value.dtype != np.float32:
        return Extremes(value.dtype, math.inf, -math.inf, None, 0)
    finite = value if value.size == 0 or np.isfinite(value.min() + value.max()) else value[np.isfinite(value)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (math.inf, -math.inf)
    if axis is None or value.ndim < 2:
        return Extremes(value.dtype, low, high, None, 0)
    axis %= value.ndim
    others = tuple(a for a in range(value.ndim) if a != axis)
    return Extremes(value.dtype, low, high, value.sum(axis=others, dtype=np.float64), value.size // max(value.shape[axis], 1))


def _run(session, names: list[str], feed: Feed) -> list[np.ndarray]:
    try:
        return session.run(names, feed)
    except Exception as exc:  # ORT raises its own types for kernel and feed failures
        raise OnnxShrinkError(f"onnxruntime failed on a calibration sample: {str(exc).splitlines()[0]}") from None


def _float_ranks(model: onnx.ModelProto, names: list[str]) -> dict[str, int | None]:
    """name -> rank (None if unknown) for the `names` that shape inference says are float32."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # inference fails on some valid models (custom ops, odd shapes): tap everything whole
        return {}
    wanted, found = set(names), {}
    for info in [*inferred.value_info, *inferred.output]:
        tensor = info.type.tensor_type if info.type.HasField("tensor_type") else None
        if info.name in wanted and tensor is not None and tensor.elem_type == onnx.TensorProto.FLOAT:
            found[info.name] = len(tensor.shape.dim) if tensor.HasField("shape") else None
    return found


def _with_reductions(model, names, channel_axes, ranks) -> tuple[onnx.ModelProto, dict[str, tuple]]:
    """A copy of `model` with min/max (and channel-sum, size) nodes on `names`; name -> output names."""
    reduced = onnx.ModelProto()
    reduced.CopyFrom(model)
    graph = reduced.graph
    taken = all_names(reduced)
    opset = opset_version(reduced) or 1
    fetches = {}
    for name in names:
        low, high = unique_name(f"{name}_min", taken), unique_name(f"{name}_max", taken)
        graph.node.extend([onnx.helper.make_node("ReduceMin", [name], [low], keepdims=0, name=low),
                           onnx.helper.make_node("ReduceMax", [name], [high], keepdims=0, name=high)])
        total = size = None
        if name in channel_axes and ranks[name] >= 2:
            rank = ranks[name]
            others = [a for a in range(rank) if a != channel_axes[name] % rank]
            total, size = unique_name(f"{name}_channel_sum", taken), unique_name(f"{name}_size", taken)
            if opset >= 13:  # axes moved from an attribute to an input
                axes = unique_name(f"{name}_sum_axes", taken)
                graph.initializer.append(onnx.numpy_helper.from_array(np.array(others, np.int64), axes))
                summed = onnx.helper.make_node("ReduceSum", [name, axes], [total], keepdims=0, name=total)
            else:
                summed = onnx.helper.make_node("ReduceSum", [name], [total], axes=others, keepdims=0, name=total)
            graph.node.extend([summed, onnx.helper.make_node("Size", [name], [size], name=size)])
        fetches[name] = (low, high, total, size)
    return reduced, fetches


class Gram:
    """sum x^T y (y = x unless given) in float64 over row batches, kept until a batch is big
    enough for one efficient matmul (one sample's few rows at a time run about ten times slower)."""

    BATCH_ELEMENTS = 2**20

    def __init__(self, size: int, other_size: int | None = None):
        self.size = size
        self.sum = np.zeros((size, size if other_size is None else other_size))
        self.pending: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.rows = 0

    def add(self, rows: np.ndarray, other_rows: np.ndarray | None = None) -> None:
        self.pending.append((rows, other_rows))
        self.rows += len(rows)
        if self.rows * self.size >= self.BATCH_ELEMENTS:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            x = np.concatenate([rows for rows, _ in self.pending]).astype(np.float64)
            y = x if self.pending[0][1] is None else np.concatenate([o for _, o in self.pending]).astype(np.float64)
            self.sum += x.T @ y
            self.pending, self.rows = [], 0

    def total(self) -> np.ndarray:
        self._flush()
        return self.sum


def conv_patch_rows(value: np.ndarray, node: onnx.NodeProto, kernel: tuple[int, int]) -> np.ndarray | None:
    """The input patches a 2-D Conv (group 1) multiplies its weight with, as rows [positions, C*kh*kw]
    in the weight's own (C, kh, kw) order, so that rows @ W.reshape(O, -1).T is the Conv's output
    without bias: a Conv is a MatMul over these rows, and its input Hessian is their Gram matrix.
    None where the node is not that kind of Conv (grouped, auto_pad, not 2-D)."""
    patches = _patches(value, node, kernel) if attribute(node, "group", 1) == 1 else None
    if patches is None:
        return None
    batch, channels, taps, positions = patches.shape
    return patches.reshape(batch, channels * taps, positions).transpose(0, 2, 1).reshape(-1, channels * taps)


def depthwise_patch_rows(value: np.ndarray, node: onnx.NodeProto, kernel: tuple[int, int]) -> np.ndarray | None:
    """For a depthwise Conv (group = input channels): its patches per channel, [C, positions, kh*kw].
    Output channel o reads input channel o // (outputs per channel), and its Hessian is that
    channel's Gram matrix [kh*kw, kh*kw]."""
    value = np.asarray(value)
    if value.ndim != 4 or attribute(node, "group", 1) != value.shape[1]:
        return None
    patches = _patches(value, node, kernel)
    if patches is None:
        return None
    batch, channels, taps, positions = patches.shape
    return patches.transpose(1, 0, 3, 2).reshape(channels, batch * positions, taps)


def _patches(value: np.ndarray, node: onnx.NodeProto, kernel: tuple[int, int]) -> np.ndarray | None:
    """[batch, C, kh*kw, positions]: what each output position of a 2-D Conv reads, or None."""
    value = np.asarray(value)
    if value.ndim != 4 or attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    kh, kw = kernel
    strides = list(attribute(node, "strides", [1, 1]))
    pads = list(attribute(node, "pads", [0, 0, 0, 0]))
    dilations = list(attribute(node, "dilations", [1, 1]))
    if len(strides) != 2 or len(pads) != 4 or len(dilations) != 2:
        return None
    padded = np.pad(value, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    batch, channels, height, width = padded.shape
    rows_out = (height - dilations[0] * (kh - 1) - 1) // strides[0] + 1
    cols_out = (width - dilations[1] * (kw - 1) - 1) // strides[1] + 1
    if rows_out <= 0 or cols_out <= 0:
        return None
    patches = np.empty((batch, channels, kh, kw, rows_out, cols_out), value.dtype)
    for i in range(kh):
        for j in range(kw):
            top, left = i * dilations[0], j * dilations[1]
            patches[:, :, i, j] = padded[:, :, top:top + strides[0] * (rows_out - 1) + 1:strides[0],
                                         left:left + strides[1] * (cols_out - 1) + 1:strides[1]]
    return patches.reshape(batch, channels, kh * kw, rows_out * cols_out)


def patch_kind(node: onnx.NodeProto, dims: list[int]) -> str | None:
    """How conv_input_grams unfolds a Conv with weight dims [O, C/group, kh, kw]: "dense" (group 1),
    "depthwise" (one input channel per group), else None. Explicit pads only."""
    if node.op_type != "Conv" or len(dims) != 4 or attribute(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    group = attribute(node, "group", 1)
    if group == 1:
        return "dense"
    return "depthwise" if dims[1] == 1 and dims[0] % group == 0 else None


# Patch Gram matrices summed in one pass over the calibration data; more take another pass.
CONV_GRAM_BYTES = 512 * 2**20


def conv_input_grams(model: onnx.ModelProto, nodes: Iterable[onnx.NodeProto], data: Iterable[Feed],
                     max_samples: int, progress: Callable = lambda iterable, **_: iterable) -> dict[str, np.ndarray]:
    """weight name -> the input-patch Gram matrix of the Conv in `nodes` that reads that initializer
    ([O, C/group, kh, kw]), over the first `max_samples` feeds of `data` (iterable more than once):
    [C*kh*kw]^2 for group 1, [C, kh*kw, kh*kw] (one per input channel) for a depthwise Conv
    (patch_kind). Summed in passes over the data that each hold at most CONV_GRAM_BYTES of them: a
    3x3 Conv over 512 channels alone takes 170 MB. A Conv whose input cannot be unfolded is left out."""
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    convs = {node.input[1]: node for node in nodes}
    kernels = {key: dims[key] for key in convs}
    kinds = {key: patch_kind(convs[key], list(kernels[key])) for key in convs}

    def size(key):
        o, c, kh, kw = kernels[key]
        return (c * kh * kw) ** 2 if kinds[key] == "dense" else attribute(convs[key], "group", 1) * (kh * kw) ** 2

    batches, batch, held = [], [], 0
    for key in (k for k in convs if kinds[k]):
        if batch and held + size(key) * 8 > CONV_GRAM_BYTES:
            batches.append(batch)
            batch, held = [], 0
        batch.append(key)
        held += size(key) * 8
    batches += [batch] if batch else []
    found = {}
    for batch in batches:
        sources = list(dict.fromkeys(convs[key].input[0] for key in batch))
        grams: dict = {key: Gram(int(np.prod(kernels[key][1:]))) if kinds[key] == "dense" else 0.0 for key in batch}
        samples = itertools.islice(iter(data), max_samples)
        for values in stream_tensors(upstream_model(model, sources), sources, samples, progress):
            for key in batch:
                if grams[key] is None:
                    continue
                value, kernel = values[convs[key].input[0]], tuple(kernels[key][2:])
                if kinds[key] == "dense":
                    rows = conv_patch_rows(value, convs[key], kernel)
                    if rows is None or rows.shape[1] != grams[key].size:
                        grams[key] = None  # not a shape this Conv can be unfolded from
                    else:
                        grams[key].add(rows)
                else:
                    rows = depthwise_patch_rows(value, convs[key], kernel)
                    if rows is None:
                        grams[key] = None
                    else:
                        rows = rows.astype(np.float64)
                        grams[key] = grams[key] + np.einsum("cpk,cpl->ckl", rows, rows)
        # A depthwise sum still at 0.0 saw no sample.
        found |= {key: gram.total() if isinstance(gram, Gram) else gram for key, gram in grams.items()
                  if gram is not None and not isinstance(gram, float)}
    return found
