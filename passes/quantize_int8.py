"""`quantize-int8`: static QDQ quantization for stock onnxruntime.

Activations get QuantizeLinear/DequantizeLinear pairs with ranges calibrated from streamed
histograms; weights are stored int8 per channel behind a DequantizeLinear; biases int32.
Placement follows what onnxruntime's CPU provider fuses into integer kernels (QLinearConv,
QLinearMatMul, QLinearAdd, ...), so the result runs faster, not only smaller:

* first (`fold`), scalar or per-channel Mul/Add and BatchNorm after a Conv/Gemm go into its
  weights, and x*Clip(x+3,0,6)/6 becomes x*HardSigmoid(x): fewer float islands between kernels;
* data-movement ops (MaxPool, Reshape, Resize, ...) reuse their input's scale, which lets ORT
  drop the pair around them;
* a Relu/Clip right after a compute node is folded into the output's range (no pair between);
* graph outputs stay float, so one scale never squeezes quantities of different range together;
* a Concat whose inputs' ranges differ by more than `concat_ratio` stays float for the same reason.

Then measurement on calibration samples decides (sensitive_float.py): op types whose quantization
slows the model stay float; so do the first weighted layers where they carry most of the drift
(`front_budget`); `calibration=auto` keeps mse or minmax ranges, whichever moves the outputs less.

Only the main graph is quantized; nodes in If/Loop/Scan bodies and recurrent ops stay float.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.activations import stream_extremes, stream_tensors
from onnxshrink.errors import OnnxShrinkError
from onnxshrink.graph import (all_names, attribute, constants_to_initializers, drop_unused_initializers,
                              opset_version, replace_nodes, subgraphs, unique_name)
from onnxshrink.histogram import BINS, Histogram, calibrate
from onnxshrink.options import PassOptions, option
from onnxshrink.pass_base import Note, Pass, PassContext, PassOutput
from onnxshrink.registry import register_pass
from onnxshrink.runtime import make_session, u8s8_saturates

from .equalize import Equalize
from .sensitive_float import DriftMeter, keep_front_float, keep_sensitive_float

# op -> positions of inputs that are quantized activations (None: all inputs)
_WEIGHTED = {"Conv": (0,), "MatMul": (0, 1), "Gemm": (0,)}
_COMPUTE = {"Add": None, "Mul": None, "Concat": None, "AveragePool": (0,), "GlobalAveragePool": (0,),
            "Sigmoid": (0,), "LeakyRelu": (0,), "Softmax": (0,)}
# Ops whose output takes the input's quantization parameters (ORT removes the pair around them).
_PASSTHROUGH = {"MaxPool": (0,), "Resize": (0,), "Reshape": (0,), "Transpose": (0,), "Flatten": (0,),
                "Squeeze": (0,), "Unsqueeze": (0,), "Slice": (0,), "Split": (0,), "Gather": (0,),
                "DepthToSpace": (0,), "SpaceToDepth": (0,)}
_FUSED_ACTIVATIONS = {"Relu", "Clip"}
QUANTIZABLE = set(_WEIGHTED) | set(_COMPUTE) | set(_PASSTHROUGH) | _FUSED_ACTIVATIONS
_ALREADY_QUANTIZED = {"QuantizeLinear", "QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger",
                      "DynamicQuantizeLinear", "MatMulNBits", "DynamicQuantizeMatMul"}


@register_pass("quantize-int8")
class QuantizeInt8(Pass):
    summary = "Static int8 QDQ: calibrated activation ranges, per-channel int8 weights, placed for ORT's integer kernels."
    needs_data = True

    @dataclass(frozen=True)
    class Options(PassOptions):
        calibration: str = option("auto", "how activation ranges are chosen from the histograms; auto: mse, or "
                                          "minmax where that moves the outputs less, measured on calibration samples",
                                  choices=("auto", "minmax", "percentile", "entropy", "mse"))
        percentile: float = option(99.999, "percentile of |x| kept when calibration=percentile", low=50, high=100)
        activations: str = option("uint8", "activation type (uint8 uses x86's u8*s8 integer path)",
                                  choices=("uint8", "int8"))
        symmetric: bool = option(False, "symmetric activation ranges (zero point at the middle)")
        reduce_range: str = option("auto", "7-bit weights: x86 CPUs without VNNI saturate u8*s8 products of 8-bit "
                                   "weights in 16 bits; auto turns it on when the quantizing machine lacks VNNI",
                                   choices=("auto", "on", "off"))
        per_channel: bool = option(True, "one weight scale per output channel (needs opset 13; older models are upgraded)")
        bias_correction: bool = option(True, "shift biases by the weight rounding error times the mean layer input")
        fold: bool = option(True, "first fold scalar or per-channel Mul/Add/Sub/Div and BatchNormalization after a "
                                  "Conv/ConvTranspose/Gemm into its weights and write x*Clip(x+3,0,6)/6 as "
                                  "x*HardSigmoid(x) (cleanup's weight folds): each float op left between two "
                                  "integer kernels costs a Dequantize and a Quantize too")
        equalize: bool = option(False, "cross-layer equalization first (the `equalize` pass): evens out channel "
                                       "weight ranges across Conv/Gemm/MatMul pairs joined by Relu-like ops; "
                                       "pays off mainly with per_channel=false")
        smooth: float = option(0.0, "SmoothQuant strength alpha for MatMul inputs with outlier channels: "
                                    "moves range from activations into weights (0 = off; 0.5 is typical)", low=0, high=1)
        concat_ratio: float = option(16.0, "a Concat whose inputs' ranges differ by more than this stays float", low=1)
        include: tuple[str, ...] = option((), "only these op types or node names (empty: every supported op)")
        exclude: tuple[str, ...] = option((), "op types or node names left float")
        max_samples: int = option(256, "calibration samples used at most", low=1)
        speed_check: bool = option(True, "time the result in onnxruntime and leave float each op type whose "
                                         "quantization makes the model slower (Conv/MatMul/Gemm always quantized)")
        front_budget: float = option(0.25, "leave float the first weighted nodes (Conv/MatMul/Gemm) where measured "
                                          "on calibration samples that takes most of the drift away, up to this "
                                          "share of the model's multiply-adds (0 = off)", low=0, high=1)
        keep_float: int = option(0, "then leave float up to this many activation tensors whose quantization moves "
                                    "the outputs most, found by measurement on calibration samples (a few seconds "
                                    "each; each must remove a fifth of the remaining drift)", low=0)

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassOutput:
        opts = self.options
        _refuse_unsupported(model)
        original = model
        notes: list[Note] = _float_by_design(model)
        model = _ensure_opset(model, 13 if opts.per_channel else 10, notes)
        # The fold check and the searches below measure against the float model on 4 calibration
        # samples; its outputs there are computed once, on first use.
        meter = DriftMeter(original, context.data.take(4)) if context.data is not None else None
        if opts.fold and meter is not None:
            model = _fold_weights(model, meter, notes)
        if opts.equalize:  # before calibration, which must see the rescaled activations
            equalized = Equalize().run(model, context)
            model, notes = equalized.model, notes + equalized.notes
        graph = model.graph
        constants_to_initializers(graph)
        initializers = {t.name: t for t in graph.initializer}
        tables = _quantize_tables(model, [n for n in graph.node if self._selected(n)], initializers, opts, notes)
        initializers = {t.name: t for t in graph.initializer}
        nodes = [n for n in graph.node if self._selected(n) and n.output[0] not in tables]
        candidates = _candidate_tensors(nodes, initializers)
        if not candidates and tables:
            return PassOutput(model, notes)
        if not candidates:
            notes.append(Note("(graph)", "no quantizable nodes"))
            return PassOutput(model, notes)
        if context.data is None:
            raise OnnxShrinkError("quantize-int8 needs calibration data (--calib) to choose activation ranges")
        if opts.smooth > 0:
            inserted = _smooth(model, nodes, initializers, context, opts, notes)
            # The graph's node list was rebuilt: select again, leaving the inserted Muls float.
            nodes = [n for n in graph.node if self._selected(n) and n.name not in inserted and n.output[0] not in tables]
            initializers = {t.name: t for t in graph.initializer}
            candidates = _candidate_tensors(nodes, initializers)

        stats = _calibrate(model, candidates, nodes, initializers, context, opts.max_samples, opts.calibration)
        chosen_ids = {id(n) for n in nodes}
        positions = [i for i, n in enumerate(graph.node) if id(n) in chosen_ids]

        first_choice = "mse" if opts.calibration == "auto" else opts.calibration

        @functools.cache  # the speed check builds the fully quantized model too; build it once
        def build(left_float: frozenset = frozenset(), left_nodes: frozenset = frozenset(),
                  calibration: str = first_choice) -> tuple[onnx.ModelProto, list[Note]]:
            candidate = onnx.ModelProto()
            candidate.CopyFrom(model)
            selected = [candidate.graph.node[i] for i in positions if candidate.graph.node[i].op_type not in left_float
                        and candidate.graph.node[i].name not in left_nodes]
            built_notes: list[Note] = []
            inits = {t.name: t for t in candidate.graph.initializer}
            chosen = dataclasses.replace(opts, calibration=calibration)
            _rewrite(candidate, _plan(candidate.graph, selected, inits, stats, chosen, built_notes), stats, chosen,
                     built_notes)
            return candidate, built_notes

        left_float: frozenset = frozenset()
        if opts.speed_check:
            left_float = _slower_op_types(original, build, next(iter(context.data)), notes)
        left_nodes: frozenset = frozenset()
        if opts.front_budget > 0:
            weighted = [graph.node[i] for i in positions if graph.node[i].op_type in _WEIGHTED]
            left_nodes = keep_front_float(meter, model, lambda names: build(left_float, names)[0], weighted,
                                          opts.front_budget, notes)
        calibration = first_choice
        if opts.calibration == "auto":
            calibration = _measured_calibration(meter, lambda method: build(left_float, left_nodes, method)[0], notes)
        quantized, built_notes = build(left_float, left_nodes, calibration)
        notes += built_notes
        build.cache_clear()
        if opts.keep_float:
            quantized = keep_sensitive_float(meter, quantized, opts.keep_float, notes)
        if quantized.ByteSize() >= original.ByteSize():
            notes.append(Note("(graph)", "left unchanged: quantizing would not make the file smaller"))
            return PassOutput(original, notes)
        return PassOutput(quantized, notes)

    def _selected(self, node: onnx.NodeProto) -> bool:
        opts = self.options
        if node.domain not in ("", "ai.onnx") or node.op_type not in QUANTIZABLE:
            return False
        if opts.include and node.op_type not in opts.include and node.name not in opts.include:
            return False
        return node.op_type not in opts.exclude and node.name not in opts.exclude


def _measured_calibration(meter: DriftMeter, build, notes: list[Note]) -> str:
    """mse or minmax ranges, whichever moves the outputs less (channel-balanced drift, `meter`).

    mse clips each tensor's rare extremes to resolve its bulk better, which is right for most
    tensors but not where the extremes are the answer: YOLOv8n's class scores come from its largest
    logits, and there mse lowered confident scores by 15-25% (0.30 -> 0.24 drops a box at the 0.25
    threshold) while minmax kept them (measured). MiniLM is the other way round (sentence cosine
    0.946 with mse, 0.941 with minmax). So both are built from the same histograms and measured."""
    mse, minmax = meter(build("mse")), meter(build("minmax"))
    chosen = "minmax" if minmax < mse else "mse"
    notes.append(Note("(graph)", f"calibration: {chosen} (channel-balanced drift on {len(meter.feeds)} calibration "
                                 f"samples: mse {mse:.4f}, minmax {minmax:.4f})"))
    return chosen


# A float island stays float only if it saves at least this much: on a shared machine, 11
# interleaved runs do not resolve less (PP-OCR det gave the same type 0.96 in one run, 1.01 in
# the next, and a 0.97 bar let that noise pick what stayed float).
_CLEAR_GAIN = 0.95

# Below this (all optional types float / fully quantized) the gain is worth splitting by type; a
# smaller one is taken whole. On PP-OCR det the all-float trial reads 0.95-0.96 from run to run, and
# the six per-type timings that 0.95 started doubled quantization time (4.8 s -> 10-13 s) to pick
# between readings of 0.94-1.00, which the machine's noise decides.
_WORTH_SPLITTING = 0.9

# Op types the speed check may leave float; weighted ops are what quantization is for.
_OPTIONAL = ("Add", "Mul", "Concat", "Sigmoid", "Softmax", "LeakyRelu", "AveragePool", "GlobalAveragePool",
             "MaxPool", "Resize", "Reshape", "Transpose", "Split", "Slice")


def _slower_op_types(original, build, feed, notes: list[Note], repeats: int = 11) -> frozenset:
    """Op types whose quantization slows the model in onnxruntime (1 thread, interleaved medians).

    A short first timing settles the common case, a clear gain. Otherwise the float model, the
    quantized one and one with every optional type left float are timed together: the float
    islands between QDQ kernels are what can make int8 slower, and if removing all of them gains
    nothing, no single type will. Only when it does is each type tried alone; the ones that gain
    alone are left float unless all of them together are clearly faster. The quantized session
    is built once and kept warm: a trial costs one new session and up to `repeats` runs of each,
    fewer once the medians leave no doubt about the answer."""
    from onnxshrink.runtime import adapt_feeds, interleaved_latency

    full, _ = build()
    present = sorted({n.op_type for n in full.graph.node} & set(_OPTIONAL) & {n.op_type for n in original.graph.node})
    full_session = make_session(full, threads=1)

    def timed(*others, runs=repeats, settled=None):  # seconds of the quantized model, then of each of `others`
        sessions = [full_session] + [make_session(other, threads=1) for other in others]
        feeds = [adapt_feeds([feed], s)[0] for s in sessions]
        return interleaved_latency(sessions, feeds, repeats=runs, warmup=1, settled=settled)

    def no_doubt(with_all, without):  # the trial can neither clearly gain nor fall back to a tie
        return without >= with_all or without < 0.85 * with_all

    def trial(left_float):  # time with `left_float` float / time fully quantized
        with_all, without = timed(build(frozenset(left_float))[0], settled=lambda m: no_doubt(*m))
        return without / with_all

    full_time, float_time = timed(original, runs=3)
    all_float = 1.0
    if full_time >= 0.8 * float_time:  # not clearly faster: time it properly, beside the all-float trial
        if present:
            full_time, float_time, islands_time = timed(
                original, build(frozenset(present))[0],
                settled=lambda m: m[0] < 0.8 * m[1] or no_doubt(m[0], m[2]))
            all_float = islands_time / full_time
        else:
            full_time, float_time = timed(original)
    verdict = f"speed check: quantized runs in {full_time / float_time:.2f}x the float time"
    if full_time < 0.9 * float_time:
        notes.append(Note("(graph)", verdict))
        return frozenset()
    if all_float >= _CLEAR_GAIN:
        notes.append(Note("(graph)", f"{verdict}; leaving the optional types float ({', '.join(present) or '-'}) "
                                     f"gains nothing ({all_float:.2f}x), so none is"))
        return frozenset()
    if all_float >= _WORTH_SPLITTING:
        notes.append(Note("(graph)", f"{verdict}; left float: {', '.join(present)} (together {all_float:.2f}x; a "
                                     f"gain this small is not split by type)"))
        return frozenset(present)
    ratios = {op: trial({op}) for op in present}
    slower = {op for op, ratio in ratios.items() if ratio < _CLEAR_GAIN}
    if not slower or (len(slower) < len(present) and _CLEAR_GAIN * trial(slower) > all_float):
        slower = set(present)  # the types gain only together, or clearly more together than the subset
    detail = ", ".join(f"{op} {ratio:.2f}" for op, ratio in ratios.items())
    notes.append(Note("(graph)", f"{verdict}; left float: {', '.join(sorted(slower))} "
                                 f"(time with each type float: {detail}; all {all_float:.2f})"))
    return frozenset(slower)


def _smooth(model, nodes, initializers, context, opts, notes: list[Note]) -> set[str]:
    """SmoothQuant: X W = (X / s)(s W) per input channel, with s_j = max|X_j|^a / max|W_j|^(1-a).

    Channels with outliers hand part of their range to the weights, which quantize per channel
    anyway, so one activation scale no longer has to span the outliers. X / s is an inserted Mul
    shared by every MatMul that reads X."""
    readers: dict[str, list] = {}
    for node in nodes:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if weight is not None and weight.data_type == TensorProto.FLOAT and len(weight.dims) == 2:
            readers.setdefault(node.input[0], []).append(node)
    if not readers:
        return set()
    reach: dict[str, np.ndarray] = {}
    samples = (feed for index, feed in enumerate(context.data) if index < opts.max_samples)
    for values in stream_tensors(model, list(readers), samples, progress=context.progress):
        for name, value in values.items():
            if value.dtype == np.float32 and value.ndim >= 1:
                peak = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0).astype(np.float64)
                reach[name] = np.maximum(reach.get(name, 0), peak)
    graph = model.graph
    names = all_names(model)
    inserted = {}
    for tensor, matmuls in readers.items():
        weights = [numpy_helper.to_array(initializers[m.input[1]]).astype(np.float64) for m in matmuls]
        if tensor not in reach or any(w.shape[0] != reach[tensor].size for w in weights):
            continue
        weight_reach = np.max(np.abs(np.concatenate(weights, axis=1)), axis=1)
        factor = np.power(np.maximum(reach[tensor], 1e-5), opts.smooth) / np.power(np.maximum(weight_reach, 1e-5), 1 - opts.smooth)
        factor = np.clip(factor, 1e-2, 1e2)
        inverse = unique_name(f"{tensor}_smooth_inverse", names)
        graph.initializer.append(numpy_helper.from_array((1 / factor).astype(np.float32), inverse))
        smoothed = unique_name(f"{tensor}_smoothed", names)
        inserted[id(matmuls[0])] = [helper.make_node("Mul", [tensor, inverse], [smoothed],
                                                     name=unique_name(f"{tensor}_smooth", names)), matmuls[0]]
        for matmul, weight in zip(matmuls, weights):
            scaled = unique_name(f"{matmul.input[1]}_smoothed", names)
            graph.initializer.append(numpy_helper.from_array((weight * factor[:, None]).astype(np.float32), scaled))
            matmul.input[0], matmul.input[1] = smoothed, scaled
    replace_nodes(graph, inserted)  # each Mul goes right before the first MatMul that reads it
    drop_unused_initializers(graph)
    notes.append(Note("(graph)", f"SmoothQuant alpha={opts.smooth:g} on {len(inserted)} MatMul inputs"))
    return {mul.name for mul, _ in inserted.values()}


def _quantize_tables(model, nodes, initializers, opts, notes: list[Note]) -> set[str]:
    """Embedding tables read by Gather: stored int8 per column, gathered as int8, dequantized after.

    Gather only moves rows, so it runs on the codes and the DequantizeLinear touches just the
    gathered rows; dequantizing the whole table first would cost a full pass over it every run."""
    graph = model.graph
    names = all_names(model)  # subgraphs included: a new name must not shadow one a branch defines
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    done: set[str] = set()
    instead = {}
    for node in graph.node:
        table = initializers.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        axis = attribute(node, "axis", 0)
        if (node not in nodes or table is None or table.data_type != TensorProto.FLOAT or len(table.dims) != 2
                or axis != 0 or int(np.prod(table.dims)) < 4096 or readers.get(table.name, 0) != 1):
            continue
        array = numpy_helper.to_array(table).astype(np.float32)
        reach = np.abs(array).max(axis=0) if opts.per_channel else np.array(np.abs(array).max())
        scale = np.where(reach > 0, reach / 127.0, 1.0).astype(np.float32)
        codes = np.clip(np.rint(array / scale), -127, 127).astype(np.int8)
        codes_name = unique_name(f"{table.name}_quantized", names)
        graph.initializer.extend([numpy_helper.from_array(codes, codes_name),
                                  numpy_helper.from_array(scale, unique_name(f"{table.name}_scale", names)),
                                  numpy_helper.from_array(np.zeros(scale.shape, np.int8),
                                                          unique_name(f"{table.name}_zero_point", names))])
        scale_name, zero_name = graph.initializer[-2].name, graph.initializer[-1].name
        output = node.output[0]
        gathered = unique_name(f"{output}_quantized", names)
        node.input[0], node.output[0] = codes_name, gathered
        instead[id(node)] = [node, helper.make_node("DequantizeLinear", [gathered, scale_name, zero_name], [output],
                                                    name=unique_name(f"{output}_DQ", names),
                                                    **({"axis": -1} if opts.per_channel else {}))]
        done.add(gathered)  # by output: node names may be empty
        notes.append(Note(node.name or output, f"embedding table {table.name} {list(table.dims)} stored int8"))
    if done:
        replace_nodes(graph, instead)
        drop_unused_initializers(graph)
    return done


def _float_by_design(model: onnx.ModelProto) -> list[Note]:
    """Notes for what this pass never quantizes: If/Loop/Scan bodies and recurrent ops."""
    notes = []
    for node in model.graph.node:
        inner = sum(1 for sub in subgraphs(node) for _ in sub.node)
        if inner:
            notes.append(Note(node.name or node.output[0], f"{node.op_type} body ({inner} nodes) left float: "
                                                           "subgraph tensors cannot be calibrated from outside"))
        elif node.op_type in ("LSTM", "GRU", "RNN"):
            notes.append(Note(node.name or node.output[0], f"{node.op_type} left float: onnxruntime has no QDQ "
                                                           "kernel for it (quantize-dynamic neither)"))
    return notes


# The folds round differently by ~1e-5 of an output; past this they are not what was meant.
_FOLD_TOLERANCE = 1e-3


def _fold_weights(model: onnx.ModelProto, meter: DriftMeter, notes: list[Note]) -> onnx.ModelProto:
    """Cleanup's weight folds, applied without its 1e-6 tolerance: they round differently by ~1e-5
    of an output (PP-OCRv4 det: 2e-5), far below what int8 changes, and they take the float ops out
    from between the integer kernels. PP-OCRv4 det's learnable affine blocks (a scalar Mul and Add
    after each Conv) and decomposed hard swish left float Mul/Add/Div there (onnxruntime ran 55 Add,
    53 Mul, 24 Div float), each behind a Dequantize and before a Quantize. Folded, its int8 model
    runs 0.54-0.57x fp32 at 1 thread and 0.58-0.67x at 2 (two runs of benchmarks/quantize.py),
    against 0.69x and 0.84x before."""
    from .cleanup import max_output_change, weight_folds

    folded, counts = weight_folds(model)
    if not counts:
        return model
    change = max_output_change(model, folded, meter.feeds, expected=meter.reference)
    if change is None or change > _FOLD_TOLERANCE:
        moved = "could not be run" if change is None else f"moved an output by {change:.2g} of its largest magnitude"
        notes.append(Note("(graph)", f"weight folds not applied: the folded float model {moved} on "
                                     f"{len(meter.feeds)} calibration samples"))
        return model
    notes += [Note("(graph)", f"before quantizing, {what}: {count}") for what, count in sorted(counts.items())]
    notes.append(Note("(graph)", f"the folds moved the float outputs by at most {change:.2g} of their largest "
                                 f"magnitude on {len(meter.feeds)} calibration samples"))
    return folded


def _refuse_unsupported(model: onnx.ModelProto) -> None:
    ops = {n.op_type for n in model.graph.node}
    found = sorted(ops & _ALREADY_QUANTIZED)
    if found:
        raise OnnxShrinkError(f"quantize-int8: the model is already quantized (it has {found[0]} nodes)")
    if any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer) or any(
            i.type.tensor_type.elem_type == TensorProto.FLOAT16 for i in model.graph.input):
        raise OnnxShrinkError("quantize-int8: the model computes in float16; quantize the float32 model "
                              "(run fp16 after quantize-int8, not before)")


def _ensure_opset(model: onnx.ModelProto, needed: int, notes: list[Note]) -> onnx.ModelProto:
    version = opset_version(model)
    if version is None:
        raise OnnxShrinkError("quantize-int8: the model imports no default-domain opset")
    if version >= needed:
        return model
    from onnx import version_converter

    try:
        upgraded = version_converter.convert_version(model, needed)
        onnx.checker.check_model(upgraded)
    except Exception as exc:  # the converter raises several types for ops it cannot adapt
        raise OnnxShrinkError(f"quantize-int8: needs opset {needed} (per-channel weights) and converting this "
                              f"opset-{version} model failed: {str(exc).splitlines()[0][:200]}; "
                              "try per_channel=false") from None
    notes.append(Note("(graph)", f"opset {version} upgraded to {needed} for per-channel weights"))
    return upgraded


def _activation_inputs(node: onnx.NodeProto) -> tuple[int, ...]:
    table = {**_WEIGHTED, **_COMPUTE, **_PASSTHROUGH}
    positions = table.get(node.op_type, (0,))
    return tuple(range(len(node.input))) if positions is None else positions


def _candidate_tensors(nodes, initializers) -> list[str]:
    """Every tensor whose range may be needed: activation inputs and outputs of selected nodes."""
    names: dict[str, None] = {}
    for node in nodes:
        for position in _activation_inputs(node):
            if position < len(node.input) and node.input[position] and node.input[position] not in initializers:
                names[node.input[position]] = None
        for output in node.output:
            if output:
                names[output] = None
    return list(names)


@dataclass
class Stats:
    histograms: dict[str, Histogram]
    dtypes: dict[str, np.dtype]
    channel_means: dict[str, np.ndarray]  # weighted node input -> mean per input channel
    # method -> activation tensor -> calibrated range, filled on first use
    ranges: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)


def _channel_axis(node: onnx.NodeProto) -> int:
    return 1 if node.op_type == "Conv" else -1


def _calibrate(model, candidates, nodes, initializers, context: PassContext, max_samples: int,
               method: str) -> Stats:
    histograms = {name: Histogram(0 if method == "minmax" else BINS) for name in candidates}
    dtypes: dict[str, np.dtype] = {}
    mean_axes = {n.input[0]: _channel_axis(n) for n in nodes
                 if n.op_type in _WEIGHTED and len(n.input) > 1 and n.input[1] in initializers}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    samples = (feed for index, feed in enumerate(context.data) if index < max_samples)
    if method == "minmax":  # extremes and channel sums are computed inside onnxruntime
        for summaries in stream_extremes(model, candidates, mean_axes, samples, progress=context.progress):
            for name, summary in summaries.items():
                dtypes.setdefault(name, summary.dtype)
                histograms[name].update_extremes(summary.low, summary.high)
                if summary.channel_sum is not None and summary.channel_count:
                    sums[name] = sums.get(name, 0) + summary.channel_sum
                    counts[name] = counts.get(name, 0) + summary.channel_count
    else:
        for values in stream_tensors(model, candidates, samples, progress=context.progress):
            for name, value in values.items():
                dtypes.setdefault(name, value.dtype)
                if value.dtype != np.float32:
                    continue
                histograms[name].update(value)
                if name in mean_axes and value.ndim >= 2:
                    axis = mean_axes[name] % value.ndim
                    others = tuple(a for a in range(value.ndim) if a != axis)
                    sums[name] = sums.get(name, 0) + value.sum(axis=others, dtype=np.float64)
                    counts[name] = counts.get(name, 0) + value.size // value.shape[axis]
    if not dtypes:
        raise OnnxShrinkError(f"{context.data.origin}: holds no samples")
    means = {name: sums[name] / counts[name] for name in sums}
    return Stats(histograms, dtypes, means)


@dataclass
class Plan:
    nodes: list[onnx.NodeProto]  # quantized nodes, in graph order
    tensors: dict[str, tuple[float, float]]  # activation tensor -> calibrated range
    shared: dict[str, str]  # passthrough output -> the input whose parameters it reuses


def _plan(graph, nodes, initializers, stats: Stats, opts, notes: list[Note]) -> Plan:
    outputs = {o.name for o in graph.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def is_float(name):
        return stats.dtypes.get(name) == np.float32 or (name in initializers and
                                                         initializers[name].data_type == TensorProto.FLOAT)

    ranges = stats.ranges.setdefault(opts.calibration, {})

    def rng(name):
        if name not in ranges:
            ranges[name] = calibrate(stats.histograms[name], opts.calibration, symmetric=opts.symmetric,
                                     percentile=opts.percentile)
        return ranges[name]

    chosen: list[onnx.NodeProto] = []
    tensors: dict[str, tuple[float, float]] = {}
    shared: dict[str, str] = {}
    awaiting_activation: set[str] = set()  # compute outputs whose range the following Relu/Clip sets
    for node in nodes:  # graph order: a passthrough sees whether its producer was quantized
        inputs = [node.input[p] for p in _activation_inputs(node) if p < len(node.input) and node.input[p]]
        if not inputs or not all(is_float(name) for name in inputs) or not all(is_float(o) for o in node.output):
            continue
        where = node.name or node.output[0]
        if node.op_type in _WEIGHTED and not _weight_ok(node, initializers, where, notes):
            continue
        if node.op_type in _PASSTHROUGH:
            if inputs[0] not in tensors:
                continue  # nothing quantized feeds it: a pair here would only add work
            for output in node.output:
                shared[output] = inputs[0]
            chosen.append(node)
            continue
        if node.op_type in _FUSED_ACTIVATIONS:
            if inputs[0] not in awaiting_activation:
                continue  # no quantized compute node in front to fuse into: stays float
            chosen.append(node)
            tensors[node.output[0]] = rng(node.output[0])
            continue
        activation_inputs = [n for n in inputs if n not in initializers]
        if node.op_type == "Softmax" and _span(rng(inputs[0])) > _SOFTMAX_SPAN:
            notes.append(Note(where, f"left float: input spans {_span(rng(inputs[0])):.3g} (masked scores?); one "
                                     "8-bit step would move its outputs by more than a quarter"))
            continue
        if node.op_type == "Concat" and not _ranges_compatible([rng(n) for n in activation_inputs], opts.concat_ratio):
            notes.append(Note(where, f"left float: its inputs' ranges differ by more than {opts.concat_ratio:g}x"))
            continue
        for name in activation_inputs:
            tensors.setdefault(name, rng(name))
        output = node.output[0]
        if output in outputs:
            chosen.append(node)  # its inputs are quantized; its output stays float
            continue
        followers = consumers.get(output, [])
        if (len(followers) == 1 and followers[0].op_type in _FUSED_ACTIVATIONS and followers[0] in nodes
                and (followers[0].op_type == "Relu" or _constant_clip(followers[0], initializers))):
            awaiting_activation.add(output)
            chosen.append(node)  # the activation's range covers this output (ORT fuses Relu into Q)
            continue
        tensors[output] = rng(output)
        chosen.append(node)

    chosen = _drop_useless(chosen, tensors, shared, consumers)
    # A shared output reuses its source's range; drop those that lost their source or are graph outputs.
    for output, source in list(shared.items()):
        while source in shared:
            source = shared[source]
        if source not in tensors or output in outputs:
            shared.pop(output)
            continue
        shared[output] = source
    for output, source in shared.items():
        tensors[output] = tensors[source]
    return Plan(chosen, tensors, shared)


def _drop_useless(chosen, tensors, shared, consumers) -> list:
    """Unquantize outputs that no quantized node reads, and nodes left with no quantized output.

    A pair that feeds only float nodes adds rounding error and work and enables no integer kernel.
    Weighted nodes (and a Relu/Clip fused to one) keep their output pair anyway: it is what turns
    them into integer kernels.
    Consumers come after producers in graph order, so one backward sweep settles every chain."""
    kept = {id(node) for node in chosen}
    for node in reversed(chosen):
        if node.op_type in _WEIGHTED or node.op_type in _FUSED_ACTIVATIONS:
            continue
        for output in node.output:
            if output in tensors and not any(id(c) in kept for c in consumers.get(output, [])):
                tensors.pop(output)
                shared.pop(output, None)
        if not any(output in tensors for output in node.output):
            kept.discard(id(node))
    survivors = [node for node in chosen if id(node) in kept]
    # Inputs that only an unquantized node read lose their pair too.
    touched = {name for node in survivors for name in (*node.input, *node.output)}
    for name in list(tensors):
        if name not in touched:
            tensors.pop(name)
    return survivors


def _weight_ok(node, initializers, where, notes) -> bool:
    if node.op_type == "MatMul":
        return True  # a constant B becomes a per-channel weight; a computed B is a second activation
    weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
    if weight is None or weight.data_type != TensorProto.FLOAT:
        notes.append(Note(where, "left float: its weight is not a float32 initializer"))
        return False
    if node.op_type == "Gemm":
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            notes.append(Note(where, "left float: Gemm with transA, alpha or beta"))
            return False
    return True


def _constant_clip(node, initializers) -> bool:
    """A Clip whose bounds are constants (it can then be folded into a quantization range)."""
    return all(not name or name in initializers for name in node.input[1:])


# Softmax inputs wider than this lose the scores to quantization steps over ~1/8 (exp(1/8) ~ +13%);
# padded attention adds -1e4 (or -inf-like) masks, which is how such spans arise.
_SOFTMAX_SPAN = 32.0


def _span(bounds) -> float:
    return bounds[1] - bounds[0]


def _ranges_compatible(ranges, ratio: float) -> bool:
    spans = [high - low for low, high in ranges if high > low]
    return not spans or max(spans) <= ratio * min(spans)


def _scale_zero_point(low: float, high: float, dtype: str, symmetric: bool):
    qmin, qmax = (0, 255) if dtype == "uint8" else (-128, 127)
    if symmetric:
        reach = max(abs(low), abs(high))
        scale = reach / ((qmax - qmin) / 2) if reach > 0 else 1.0
        zero_point = (qmin + qmax + 1) // 2
    else:
        scale = (high - low) / (qmax - qmin) if high > low else 1.0
        zero_point = int(np.clip(round(qmin - low / scale), qmin, qmax))
    return np.float32(scale), np.array(zero_point, dtype=np.uint8 if dtype == "uint8" else np.int8)


def _rewrite(model: onnx.ModelProto, plan: Plan, stats: Stats, opts, notes: list[Note]) -> None:
    graph = model.graph
    names = all_names(model)
    initializers = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    new_initializers: list[onnx.TensorProto] = []
    head: list[onnx.NodeProto] = []  # DequantizeLinear of weights and of quantized graph inputs
    after: dict[str, list[onnx.NodeProto]] = {}  # producer output -> its Q/DQ pair
    renamed_inputs: dict[str, str] = {}
    params: dict[str, tuple[str, str, float]] = {}  # tensor -> scale name, zero point name, scale

    def add(array: np.ndarray, base: str) -> str:
        name = unique_name(base, names)
        new_initializers.append(numpy_helper.from_array(array, name))
        return name

    def activation_params(tensor: str):
        source = plan.shared.get(tensor, tensor)
        if source not in params:
            scale, zero_point = _scale_zero_point(*plan.tensors[source], opts.activations, opts.symmetric)
            params[source] = (add(np.array(scale, np.float32), f"{source}_scale"),
                              add(zero_point, f"{source}_zero_point"), float(scale))
        return params[source]

    # Activations: the producer writes T_float, Q/DQ recreate T, so every reader (subgraphs too) sees T.
    for tensor in plan.tensors:
        scale, zero_point, _ = activation_params(tensor)
        quantized = unique_name(f"{tensor}_quantized", names)
        if tensor in graph_inputs:
            dequantized = unique_name(f"{tensor}_dequantized", names)
            head += [helper.make_node("QuantizeLinear", [tensor, scale, zero_point], [quantized],
                                      name=unique_name(f"{tensor}_Q", names)),
                     helper.make_node("DequantizeLinear", [quantized, scale, zero_point], [dequantized],
                                      name=unique_name(f"{tensor}_DQ", names))]
            renamed_inputs[tensor] = dequantized
            continue
        source = unique_name(f"{tensor}_float", names)
        after[tensor] = [helper.make_node("QuantizeLinear", [source, scale, zero_point], [quantized],
                                          name=unique_name(f"{tensor}_Q", names)),
                         helper.make_node("DequantizeLinear", [quantized, scale, zero_point], [tensor],
                                          name=unique_name(f"{tensor}_DQ", names))]

    # Weights and biases of Conv / Gemm / MatMul with a constant B.
    quantized_nodes = {id(n) for n in plan.nodes}
    for node in plan.nodes:
        if node.op_type in _WEIGHTED and (node.op_type != "MatMul" or node.input[1] in initializers):
            _quantize_weight(node, initializers, stats, activation_params, add, head, names, opts, notes)
        elif node.op_type in ("Add", "Mul", "Concat"):
            for position, name in enumerate(node.input):
                if name in initializers and initializers[name].data_type == TensorProto.FLOAT:
                    node.input[position] = _quantized_constant(initializers[name], add, head, names, opts)

    written_as = {pair[0].input[0]: tensor for tensor, pair in after.items()}
    ordered: list[onnx.NodeProto] = list(head)
    for node in graph.node:
        if id(node) in quantized_nodes:
            for position, name in enumerate(node.input):
                if name in renamed_inputs:
                    node.input[position] = renamed_inputs[name]
        for position, name in enumerate(node.output):
            if name in after:
                node.output[position] = after[name][0].input[0]
        ordered.append(node)
        for name in node.output:
            ordered.extend(after.get(written_as.get(name, name), []))
    del graph.node[:]
    graph.node.extend(ordered)
    graph.initializer.extend(new_initializers)
    drop_unused_initializers(graph)
    counts = {}
    for node in plan.nodes:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    summary = ", ".join(f"{count} {op}" for op, count in sorted(counts.items(), key=lambda kv: -kv[1]))
    notes.insert(0, Note("(graph)", f"quantized {len(plan.nodes)} nodes ({summary}); {len(plan.tensors)} "
                                    f"activation tensors, calibration={opts.calibration}"))


# Bias codes stay within 2^30, leaving int32 room for the bias correction added to them.
_BIAS_CODE_ROOM = 2.0 ** 30


def _quantize_weight(node, initializers, stats: Stats, activation_params, add, head, names, opts, notes) -> None:
    where = node.name or node.output[0]
    weight_tensor = initializers[node.input[1]]
    weight = numpy_helper.to_array(weight_tensor).astype(np.float32)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    # The output-channel axis: Conv's O, MatMul's N, Gemm's N (axis 0 when B is transposed).
    if node.op_type == "Conv":
        axis = 0
    elif node.op_type == "Gemm":
        axis = 0 if attrs.get("transB", 0) else 1
    else:
        axis = weight.ndim - 1
    if weight.ndim < 2 and node.op_type != "Conv":
        notes.append(Note(where, "weight kept float: not a matrix"))
        return
    reduce_axes = tuple(a for a in range(weight.ndim) if a != axis)
    if opts.per_channel:
        reach = np.abs(weight).max(axis=reduce_axes)
    else:
        reach = np.array(np.abs(weight).max())
    limit = 63 if _reduce_range(opts) else 127
    scale = np.where(reach > 0, reach / limit, 1.0).astype(np.float32)
    input_scale = activation_params(node.input[0])[2]
    bias_position = 2 if node.op_type in ("Conv", "Gemm") else None
    bias_name = node.input[2] if bias_position and len(node.input) > 2 and node.input[2] else None
    if bias_name in initializers:
        # The int32 bias is stored at scale input*weight. A channel whose weights are all but zero
        # (PP-OCRv4 det has some at 1e-14, with biases near 1) would need codes past int32 and
        # saturate: its weight scale is widened until the bias fits, and its weights round to 0.
        need = np.abs(numpy_helper.to_array(initializers[bias_name]).astype(np.float64)) / \
            (float(input_scale) * _BIAS_CODE_ROOM)
        if need.size == scale.size or not opts.per_channel:
            scale = np.maximum(scale, need.max() if not opts.per_channel else need).astype(np.float32)
    shape = [1] * weight.ndim
    if opts.per_channel:
        shape[axis] = -1
    codes = np.clip(np.rint(weight / scale.reshape(shape)), -limit, limit).astype(np.int8)
    dequantized = codes.astype(np.float32) * scale.reshape(shape)

    correction = _bias_correction(node, weight, dequantized, axis, stats) if opts.bias_correction else None

    weight_name = add(codes, f"{node.input[1]}_quantized")
    scale_name = add(scale, f"{node.input[1]}_scale")
    zero_name = add(np.zeros(scale.shape, np.int8), f"{node.input[1]}_zero_point")
    dq_attrs = {"axis": axis} if opts.per_channel else {}
    weight_out = unique_name(f"{node.input[1]}_dequantized", names)
    head.append(helper.make_node("DequantizeLinear", [weight_name, scale_name, zero_name], [weight_out],
                                 name=unique_name(f"{node.input[1]}_DQ", names), **dq_attrs))
    node.input[1] = weight_out

    if bias_name is None and correction is not None and node.op_type == "Conv":
        bias = np.zeros(weight.shape[0], np.float32)
    elif bias_name is not None and bias_name in initializers:
        bias = numpy_helper.to_array(initializers[bias_name]).astype(np.float32)
    else:
        bias = None
    if bias is not None and correction is not None and bias.shape == correction.shape:
        bias = bias + correction.astype(np.float32)  # float output = Wq x + (W - Wq) x + b
    if bias is not None and bias.ndim == 1 and bias_position:
        # Bias as int32 at scale input*weight, the form ORT's QLinearConv/QGemm fusion expects.
        # Per-tensor weights keep a scalar bias scale: a 1-D scale needs opset 13, which only
        # per-channel quantization upgrades to.
        bias_scale = (input_scale * scale).astype(np.float32)
        if opts.per_channel:
            bias_scale = bias_scale * np.ones(bias.shape, np.float32)
        safe = np.where(bias_scale > 0, bias_scale, 1.0)
        bias_codes = np.clip(np.rint(bias / safe), -2**31, 2**31 - 1).astype(np.int32)
        base = bias_name or f"{node.output[0]}_bias"
        bias_out = unique_name(f"{base}_dequantized", names)
        head.append(helper.make_node("DequantizeLinear", [add(bias_codes, f"{base}_quantized"),
                                                          add(bias_scale, f"{base}_scale"),
                                                          add(np.zeros(bias_scale.shape, np.int32), f"{base}_zero_point")],
                                     [bias_out], name=unique_name(f"{base}_DQ", names),
                                     **({"axis": 0} if opts.per_channel else {})))
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = bias_out


def _reduce_range(opts) -> bool:
    return opts.reduce_range == "on" or (opts.reduce_range == "auto" and u8s8_saturates())


def _bias_correction(node, weight, dequantized, axis, stats: Stats) -> np.ndarray | None:
    """Expected output shift from rounding the weights: (W - Wq) applied to the mean input per channel."""
    mean = stats.channel_means.get(node.input[0])
    if mean is None:
        return None
    error = (weight - dequantized).astype(np.float64)
    if node.op_type == "Conv":
        groups = int(attribute(node, "group", 1))
        out_channels, in_per_group = error.shape[0], error.shape[1]
        if mean.size != in_per_group * groups:
            return None
        per_in = error.reshape(out_channels, in_per_group, -1).sum(axis=2)  # padding is ignored
        group_of_out = np.arange(out_channels) // (out_channels // groups)
        means = mean.reshape(groups, in_per_group)[group_of_out]
        return (per_in * means).sum(axis=1)
    matrix = error if axis == error.ndim - 1 else error.T  # as [K, N]
    if matrix.ndim != 2 or mean.size != matrix.shape[0]:
        return None
    return mean @ matrix


def _quantized_constant(tensor, add, head, names, opts) -> str:
    """A float constant operand of Add/Mul/Concat stored as uint8/int8 with its own range."""
    array = numpy_helper.to_array(tensor).astype(np.float32)
    low, high = min(float(array.min()), 0.0), max(float(array.max()), 0.0)
    scale, zero_point = _scale_zero_point(low, high, opts.activations, symmetric=False)
    info = np.iinfo(zero_point.dtype)
    codes = np.clip(np.rint(array / scale) + int(zero_point), info.min, info.max).astype(zero_point.dtype)
    output = unique_name(f"{tensor.name}_dequantized", names)
    head.append(helper.make_node("DequantizeLinear", [add(codes, f"{tensor.name}_quantized"),
                                                      add(np.array(scale, np.float32), f"{tensor.name}_scale"),
                                                      add(zero_point, f"{tensor.name}_zero_point")],
                                 [output], name=unique_name(f"{tensor.name}_DQ", names)))
    return output
