"""`mixed-precision`: a bit width per MatMul/Gemm weight, chosen by measured sensitivity.

Each layer is quantized alone at each candidate width and the drift of the model's outputs
is measured on calibration data. Measurements use the float weights that rounding to nearest
would give ("fake" quantization: the same numbers without packing), which is fast enough to
build one model per layer and width; only the final choice goes through quantize-weights. Starting from every layer at the narrowest width, the pass
widens the layer that buys the most drift per extra byte until the model, measured as a
whole, meets the budget. The report lists every layer's sensitivity and the choice made.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto

from onnxshrink.errors import OnnxShrinkError, UsageError
from onnxshrink.fidelity import METRICS, output_metrics, parse_drift, summarize
from onnxshrink.graph import all_names, unique_name
from onnxshrink.options import PassOptions, option
from onnxshrink.pass_base import Note, Pass, PassContext, PassOutput
from onnxshrink.registry import get_pass, register_pass
from onnxshrink.runtime import adapt_feeds, make_session, run_all

FLOAT_BITS = 32


@register_pass("mixed-precision")
class MixedPrecision(Pass):
    summary = "Per-layer weight bit widths (e.g. 4/8/32) chosen by measured sensitivity to meet a drift budget."
    needs_data = True

    @dataclass(frozen=True)
    class Options(PassOptions):
        budget: str = option("cosine>=0.99", "drift bound the whole model must meet, as in --max-drift")
        widths: tuple[int, ...] = option((4, 8), "candidate weight bit widths, narrowest first; float is always a fallback")
        block: int = option(32, "weights per scale (see quantize-weights)")
        method: str = option("rtn", "rtn or gptq, as in quantize-weights", choices=("rtn", "gptq"))
        min_elements: int = option(4096, "weights with fewer elements stay float", low=0)
        samples: int = option(8, "calibration samples each measurement runs", low=1)

        def __post_init__(self):
            super().__post_init__()
            if not parse_drift(self.budget):
                raise UsageError("budget: give a bound such as cosine>=0.99")
            if not self.widths or any(not 2 <= w <= 8 for w in self.widths):
                raise UsageError("widths: give bit widths between 2 and 8, e.g. [4,8]")

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassOutput:
        opts = self.options
        if context.data is None:
            raise OnnxShrinkError("mixed-precision needs calibration data (--calib) to measure sensitivity")
        bounds = parse_drift(opts.budget)
        metric = METRICS[bounds[0].metric]
        layers = _name_weight_layers(model, opts.min_elements)
        if not layers:
            return PassOutput(model, [Note("(graph)", "no MatMul/Gemm weights to quantize")])
        feeds = context.data.take(opts.samples)
        reference_session = make_session(model)
        names = [o.name for o in reference_session.get_outputs()]
        reference = run_all(reference_session, feeds)

        def measure(candidate: onnx.ModelProto) -> dict:
            session = make_session(candidate)
            return summarize(output_metrics(names, reference, run_all(session, adapt_feeds(feeds, session))))

        def simulated(choice: dict[str, int]) -> onnx.ModelProto:
            candidate = onnx.ModelProto()
            candidate.CopyFrom(model)
            weights = {t.name: t for t in candidate.graph.initializer}
            for name, bits in choice.items():
                if bits != FLOAT_BITS:
                    weight, transposed = layers[name].weight, layers[name].transposed
                    weights[weight].CopyFrom(_fake_quantized(weights[weight], bits, opts.block, transposed))
            return candidate

        def quantized(choice: dict[str, int]) -> onnx.ModelProto:
            current = model
            for width in sorted(set(choice.values()) - {FLOAT_BITS}):
                chosen = tuple(name for name, bits in choice.items() if bits == width)
                step = get_pass("quantize-weights")(bits=width, block=opts.block, method=opts.method,
                                                    include=chosen, min_elements=0)
                current = step.run(onnx.ModelProto.FromString(current.SerializeToString()), context).model
            return current

        # Sensitivity: each layer alone at each width; drift as the metric's distance from perfect.
        def drift(summary):
            value = summary.get(metric)
            return (1.0 - value) if metric in ("cosine", "top1") else value
        table: dict[str, dict[int, float]] = {}
        for name in context.progress(layers, desc="sensitivity", unit="layer"):
            table[name] = {w: drift(measure(simulated({name: w}))) for w in opts.widths}

        widths = sorted(opts.widths) + [FLOAT_BITS]
        choice = {name: widths[0] for name in layers}
        build = simulated
        summary = measure(build(choice))
        while True:
            if all(b.holds(summary) is not False for b in bounds):
                if build is quantized:
                    break
                build = quantized  # met when simulated: confirm on the real model, widen further if not
                final = build(choice)
                summary = measure(final)
                continue
            candidates = []
            for name, bits in choice.items():
                if bits == FLOAT_BITS:
                    continue
                wider = widths[widths.index(bits) + 1]
                gain = table[name][bits] - table[name].get(wider, 0.0)
                cost = layers[name].size * (wider - bits)
                candidates.append((gain / cost, name, wider))
            if not candidates:
                break
            candidates.sort(reverse=True)
            _, name, wider = candidates[0]
            choice[name] = wider
            final = build(choice)
            summary = measure(final)
        if not all(b.holds(summary) is not False for b in bounds):
            raise OnnxShrinkError(f"mixed-precision: even with every layer float the budget {opts.budget} is not met")

        notes = [Note("(graph)", f"{metric} {summary[metric]:.6f} meets {opts.budget}; widths chosen: " +
                      ", ".join(f"{sum(1 for b in choice.values() if b == w)} x {w if w != FLOAT_BITS else 'float'}"
                                for w in widths if any(b == w for b in choice.values())))]
        for name in layers:
            sensitivity = ", ".join(f"{w}-bit drift {table[name][w]:.2e}" for w in opts.widths)
            chosen = "float" if choice[name] == FLOAT_BITS else f"{choice[name]}-bit"
            notes.append(Note(name, f"{sensitivity} -> {chosen} ({layers[name].size} weights)"))
        return PassOutput(final, notes)


@dataclass(frozen=True)
class _Layer:
    weight: str  # initializer name
    size: int
    transposed: bool  # stored [N, K] (Gemm transB=1)


def _fake_quantized(tensor: onnx.TensorProto, bits: int, block: int, transposed: bool) -> onnx.TensorProto:
    from onnx import numpy_helper

    from .quantize_weights import rtn

    matrix = numpy_helper.to_array(tensor).astype(np.float32)
    matrix = matrix.T if transposed else matrix
    values = rtn(matrix, bits, block, symmetric=True).dequantize()
    return numpy_helper.from_array(np.ascontiguousarray(values.T if transposed else values), tensor.name)


def _name_weight_layers(model: onnx.ModelProto, min_elements: int) -> dict[str, "_Layer"]:
    """MatMul/Gemm nodes of the main graph with a 2-D float32 initializer weight, by node name.

    Unnamed nodes are given names, since the choice is passed to quantize-weights by name."""
    initializers = {t.name: t for t in model.graph.initializer}
    taken = all_names(model)
    layers: dict[str, _Layer] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        weight = initializers.get(node.input[1])
        if weight is None or weight.data_type != TensorProto.FLOAT or len(weight.dims) != 2:
            continue
        size = int(np.prod(weight.dims))
        if size < min_elements:
            continue
        if not node.name:
            node.name = unique_name(f"{node.op_type}_{node.output[0]}", taken)
        transposed = node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        layers[node.name] = _Layer(node.input[1], size, transposed)
    return layers
