"""`quantize-dynamic`: 8-bit MatMul and Gemm weights, activations quantized when the model runs.

Weights are quantized once, here, per output column; each activation is quantized to uint8 at
run time from its own minimum and maximum, so no calibration data is needed. This suits
transformers and MLPs on a CPU: the integer products are faster than float32 ones and the
weights take a quarter of the bytes.

Two spellings of the same arithmetic:

* `ort`: com.microsoft DynamicQuantizeMatMul, one node per product with the bias folded in;
  where several products read one activation (query, key and value), one DynamicQuantizeLinear
  feeds com.microsoft MatMulIntegerToFloat nodes so the activation is quantized once. This is
  the graph onnxruntime builds from the portable form when it loads it.
* `portable`: standard ONNX only, DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul (-> Add).

Embedding tables (`embeddings=true`) become int8 with one scale per row: the Gather picks rows
of the int8 table and of the scales, and a Cast and a Mul restore them, so only the rows looked
up are ever float32.

A weight is quantized only when every node that reads it is quantized (a float copy kept for
one reader would grow the file), wherever those nodes are: products inside If/Loop bodies are
quantized like the others, and the int8 weight is stored in the graph that held the float one.

On x86 CPUs without VNNI, onnxruntime multiplies uint8 activations by int8 weights with an
instruction that saturates pairs of products at int16; `reduce_range` (7-bit weights) or
`weight_type=uint8` avoid it, the first at one bit of weight precision, the second at some speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.errors import OnnxShrinkError
from onnxshrink.graph import all_names, attribute, opset_version, subgraphs, unique_name, walk_graphs
from onnxshrink.options import PassOptions, option
from onnxshrink.pass_base import Note, Pass, PassContext, PassOutput
from onnxshrink.registry import register_pass
from onnxshrink.runtime import make_session, u8s8_saturates

MS_DOMAIN = "com.microsoft"
_DEFAULT = ("", "ai.onnx")
_QUANTIZED_OPS = {"DynamicQuantizeMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "QGemm"}
_MIN_OPSET = 11  # DynamicQuantizeLinear


@register_pass("quantize-dynamic")
class QuantizeDynamic(Pass):
    summary = ("8-bit MatMul/Gemm weights (per output column), activations quantized at run time; "
               "no calibration data needed (transformers, MLPs)")

    @dataclass(frozen=True)
    class Options(PassOptions):
        form: str = option("ort", "ort: onnxruntime's DynamicQuantizeMatMul/MatMulIntegerToFloat (com.microsoft); "
                           "portable: standard ONNX DynamicQuantizeLinear + MatMulInteger", choices=("ort", "portable"))
        per_channel: bool = option(True, "one scale per output column (per row for embedding tables); "
                                   "false: one scale per weight")
        weight_type: str = option("int8", "int8: symmetric, zero point 0; uint8: asymmetric. On x86 CPUs without "
                                  "VNNI onnxruntime's uint8 x int8 kernel saturates: use uint8 or reduce_range there",
                                  choices=("int8", "uint8"))
        reduce_range: str = option("auto", "7-bit weights: no int16 saturation in uint8 x int8 products on x86 CPUs "
                                   "without VNNI; auto turns it on when the quantizing machine lacks VNNI",
                                   choices=("auto", "on", "off"))
        include: tuple[str, ...] = option((), "quantize only these op types or node names (empty: all)")
        exclude: tuple[str, ...] = option((), "op types or node names to keep float")
        min_elements: int = option(1024, "weights with fewer elements stay float (the per-run quantization "
                                   "of the activation costs more than a small product saves)", low=0)
        embeddings: bool = option(True, "also store Gather embedding tables as int8 with per-row scales")

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassOutput:
        original = onnx.ModelProto()
        original.CopyFrom(model)
        notes: list[Note] = []
        opset = opset_version(model)
        if opset is None:
            raise OnnxShrinkError(f"{self.name}: the model imports no default-domain opset")
        scan = _Scan(model)
        planner = _Planner(self.options, scan)
        plans, skips = planner.plan()
        _refuse_quantized_or_half(self.name, scan, planner)
        notes.extend(Note(where, why) for where, why in skips)
        if not plans:
            notes.append(Note("(graph)", "nothing to quantize (no MatMul/Gemm with a constant float32 weight that "
                              "the options select); model unchanged"))
            return PassOutput(original, notes)
        if self.options.form == "portable" and opset < _MIN_OPSET:
            model = _upgrade_opset(self.name, model, opset)
            notes.append(Note("(graph)", f"default opset upgraded from {opset} to {_MIN_OPSET} for DynamicQuantizeLinear"))
            opset = _MIN_OPSET
            scan = _Scan(model)
            plans, _ = _Planner(self.options, scan).plan()

        writer = _Writer(model, scan, self.options, share=opset >= _MIN_OPSET)
        notes.extend(writer.write(plans))
        _remove_dead(model, writer.touched)
        if writer.used_ms_domain and opset_version(model, MS_DOMAIN) is None:
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))

        if model.ByteSize() >= original.ByteSize():
            return PassOutput(original, notes + [Note("(graph)", "quantizing saved no bytes; model unchanged")])
        _verify(self.name, model)
        return PassOutput(model, notes)


# ---------------------------------------------------------------------------------------------
# What the model holds: every value's definition (per graph, with outer scopes), its readers,
# and which definitions are constants.
# ---------------------------------------------------------------------------------------------

Key = tuple  # (graph index in walk order, value name)


@dataclass
class _Const:
    graph: onnx.GraphProto
    tensor: onnx.TensorProto
    node: onnx.NodeProto | None  # the Constant node, when not an initializer
    is_input: bool = False  # an initializer listed as a graph input (IR < 4: still a weight)


@dataclass
class _Use:
    graph: int
    node: onnx.NodeProto | None  # None: read as a graph output
    index: int


class _Scan:
    def __init__(self, model: onnx.ModelProto):
        self.ir_version = model.ir_version
        self.graphs: list[onnx.GraphProto] = []
        self.consts: dict[Key, _Const] = {}
        self.uses: dict[Key, list[_Use]] = {}
        self.nodes: list[tuple[int, onnx.NodeProto, list[Key | None]]] = []  # graph, node, resolved inputs
        self.overridable: set[Key] = set()  # initializers that are graph inputs (IR >= 4): not constants
        self.resolved: dict[int, list[Key | None]] = {}  # id(node) -> its inputs' definitions
        self.producer: dict[Key, onnx.NodeProto] = {}
        self._walk(model.graph, {})

    def _walk(self, graph: onnx.GraphProto, outer: dict) -> None:
        gid = len(self.graphs)
        self.graphs.append(graph)
        env = dict(outer)
        inputs = {i.name for i in graph.input}
        for value in graph.input:
            env[value.name] = (gid, value.name)
        for tensor in graph.initializer:
            key = (gid, tensor.name)
            env[tensor.name] = key
            if tensor.name not in inputs or self.ir_version < 4:
                self.consts[key] = _Const(graph, tensor, None, tensor.name in inputs)
            else:
                self.overridable.add(key)
        for node in graph.node:
            resolved = [env.get(name) if name else None for name in node.input]
            for index, key in enumerate(resolved):
                if key is not None:
                    self.uses.setdefault(key, []).append(_Use(gid, node, index))
            self.nodes.append((gid, node, resolved))  # also keeps `node` alive, so its id() stays unique
            self.resolved[id(node)] = resolved
            for sub in subgraphs(node):
                self._walk(sub, env)
            for name in node.output:
                if name:
                    env[name] = (gid, name)
                    self.producer[(gid, name)] = node
            value = _constant_value(node)
            if value is not None:
                self.consts[(gid, node.output[0])] = _Const(graph, value, node)
        for value in graph.output:
            key = env.get(value.name)
            if key is not None:
                self.uses.setdefault(key, []).append(_Use(gid, None, -1))


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    if node.op_type != "Constant" or node.domain not in _DEFAULT or len(node.output) != 1:
        return None
    return next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)


def _where(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"



# ---------------------------------------------------------------------------------------------
# Which nodes to quantize, and why the others stay float.
# ---------------------------------------------------------------------------------------------

@dataclass
class _Plan:
    graph: int
    node: onnx.NodeProto
    kind: str  # matmul | gemm | gather
    weight: Key
    layout: str  # kn: B as stored; nk: B transposed (Gemm transB); rows: an embedding table
    alpha: float = 1.0
    bias: Key | None = None  # constant bias to fold (Gemm C, or the Add after a MatMul)
    bias_scale: float = 1.0  # Gemm beta
    extra_input: str = ""  # Gemm C that is not a bias vector: added after the product
    fold_add: onnx.NodeProto | None = None  # the Add whose constant became the bias
    columns: int = 0  # N, the product's output columns


class _Planner:
    def __init__(self, options, scan: _Scan):
        self.options = options
        self.scan = scan
        self.float_weights = 0  # MatMul/Gemm nodes with a constant 2-D float32 weight, quantized or not
        self.half_weights = 0  # ... with a float16 one (stored so, or behind fp16's Cast)

    def plan(self) -> tuple[list[_Plan], list[tuple[str, str]]]:
        candidates, skips = [], []
        for gid, node, resolved in self.scan.nodes:
            kind = self._kind(node, resolved)
            if kind is None:
                continue
            plan, reason = self._candidate(gid, node, resolved, kind)
            if plan is None:
                skips.append((_where(node), f"kept float: {reason}"))
            else:
                candidates.append(plan)
        # A weight is quantized only when every reader of it is: a float copy kept for one
        # reader would make the file bigger, not smaller.
        by_weight: dict[Key, list[_Plan]] = {}
        for plan in candidates:
            by_weight.setdefault(plan.weight, []).append(plan)
        plans = []
        for key, group in by_weight.items():
            planned = {id(p.node) for p in group}
            others = [u for u in self.scan.uses.get(key, []) if u.node is None or id(u.node) not in planned]
            if others:
                other = "a graph output" if others[0].node is None else f"{_where(others[0].node)} ({others[0].node.op_type})"
                skips.extend((_where(p.node), f"kept float: weight '{key[1]}' is also read in float by {other}")
                             for p in group)
            else:
                plans.extend(group)
        order = {id(node): index for index, (_, node, _) in enumerate(self.scan.nodes)}
        plans.sort(key=lambda p: order[id(p.node)])
        return plans, skips

    def _kind(self, node, resolved) -> str | None:
        if node.domain not in _DEFAULT:
            return None
        if node.op_type in ("MatMul", "Gemm") and len(node.input) >= 2:
            return node.op_type.lower()
        if node.op_type == "Gather" and self.options.embeddings and resolved and resolved[0] in self.scan.consts:
            table = self.scan.consts[resolved[0]].tensor
            if table.data_type == TensorProto.FLOAT and len(table.dims) == 2:
                return "gather"
        return None

    def _selected(self, node) -> str | None:
        names = {node.op_type, node.name}
        if self.options.include and not names & set(self.options.include):
            return "not selected by include"
        if names & set(self.options.exclude):
            return "excluded by exclude"
        return None

    def _candidate(self, gid, node, resolved, kind) -> tuple[_Plan | None, str]:
        weight_index = 0 if kind == "gather" else 1
        key = resolved[weight_index]
        if key in self.scan.overridable:
            return None, f"weight '{key[1]}' is also a graph input (can be overridden at run time)"
        const = self.scan.consts.get(key) if key else None
        if const is None:
            if self._behind_half_cast(key):
                self.half_weights += 1
                return None, "weight is float16 (behind a Cast)"
            return None, "B is not a constant (a product of two activations)"
        tensor = const.tensor
        if tensor.data_type == TensorProto.FLOAT16:
            self.half_weights += 1
            return None, f"weight '{key[1]}' is float16"
        if tensor.data_type != TensorProto.FLOAT:
            return None, f"weight '{key[1]}' is {TensorProto.DataType.Name(tensor.data_type).lower()}, not float32"
        if len(tensor.dims) != 2:
            return None, f"weight '{key[1]}' is {len(tensor.dims)}-D; only 2-D weights are quantized"
        if kind != "gather":
            self.float_weights += 1
        reason = self._selected(node)
        if reason:
            return None, reason
        elements = int(np.prod(tensor.dims))
        if elements < self.options.min_elements:
            return None, f"weight has {elements} elements, fewer than min_elements={self.options.min_elements}"
        plan = _Plan(gid, node, kind, key, "rows" if kind == "gather" else "kn", columns=int(tensor.dims[1]))
        if kind == "gather":
            if attribute(node, "axis", 0) not in (0, -2):
                return None, "Gather along axis 1 of the table; only row lookups are quantized"
        elif kind == "gemm":
            if attribute(node, "transA", 0):
                return None, "Gemm with transA=1 is not supported"
            plan.layout = "nk" if attribute(node, "transB", 0) else "kn"
            plan.columns = int(tensor.dims[0] if plan.layout == "nk" else tensor.dims[1])
            plan.alpha = float(attribute(node, "alpha", 1.0))
            plan.bias_scale = float(attribute(node, "beta", 1.0))
            if len(node.input) > 2 and node.input[2]:
                self._gemm_bias(plan, resolved[2], node.input[2])
        elif self.options.form == "ort":
            self._following_add(plan)
        if not np.isfinite(numpy_helper.to_array(tensor)).all():
            return None, f"weight '{key[1]}' holds inf or nan"
        return plan, ""

    def _gemm_bias(self, plan: _Plan, key: Key | None, name: str) -> None:
        const = self.scan.consts.get(key) if key else None
        columns = plan.columns
        if (const is not None and const.tensor.data_type == TensorProto.FLOAT
                and (int(np.prod(const.tensor.dims)) == 1 or tuple(const.tensor.dims) in ((columns,), (1, columns)))):
            plan.bias = key
        else:
            plan.extra_input = name  # a full [M, N] C, or one computed at run time

    def _following_add(self, plan: _Plan) -> None:
        """A MatMul whose only reader is `Add(bias vector)` takes the bias into the quantized node."""
        output = plan.node.output[0]
        readers = self.scan.uses.get((plan.graph, output), [])
        if len(readers) != 1 or readers[0].node is None or readers[0].graph != plan.graph:
            return
        add = readers[0].node
        if add.op_type != "Add" or add.domain not in _DEFAULT or len(add.input) != 2:
            return
        other = self.scan.resolved[id(add)][1 - readers[0].index]
        const = self.scan.consts.get(other) if other else None
        if const is not None and const.tensor.data_type == TensorProto.FLOAT and tuple(const.tensor.dims) == (plan.columns,):
            plan.bias, plan.fold_add = other, add

    def _behind_half_cast(self, key: Key | None) -> bool:
        # fp16 stores a weight as float16 and casts it back: the product reads the Cast's output.
        node = self.scan.producer.get(key) if key else None
        if node is None or node.op_type != "Cast" or not node.input:
            return False
        source = self.scan.resolved[id(node)][0]
        return source in self.scan.consts and self.scan.consts[source].tensor.data_type == TensorProto.FLOAT16


def _refuse_quantized_or_half(name: str, scan: _Scan, planner: _Planner) -> None:
    if planner.float_weights:
        return
    quantized = sum(1 for _, node, _ in scan.nodes if node.op_type in _QUANTIZED_OPS)
    if quantized:
        raise OnnxShrinkError(f"{name}: the model is quantized already ({quantized} integer MatMul nodes, "
                              "no float MatMul/Gemm weights left)")
    if planner.half_weights:
        raise OnnxShrinkError(f"{name}: the MatMul/Gemm weights are float16; quantize the float32 model "
                              "(run quantize-dynamic before fp16)")


# ---------------------------------------------------------------------------------------------
# Weight quantization (numpy, vectorized over columns).
# ---------------------------------------------------------------------------------------------

@dataclass
class _QuantizedWeight:
    data: np.ndarray  # int8 or uint8, [K, N] (or [V, H] for a table)
    scale: np.ndarray  # float32
    zero_point: np.ndarray | None  # same type as data, shaped like scale; None for symmetric int8


def quantize_weight(w: np.ndarray, signed: bool, per_channel: bool, reduce_range: bool, axis: int = 0) -> _QuantizedWeight:
    """Quantize `w` with one scale per index of the other axis (per_channel) or one for all.

    `axis` is the axis a scale spans: 0 (K) for a [K, N] product weight, 1 for a [V, H] table.
    Scales and zero points keep `w`'s rank, with size 1 along `axis` (and everywhere if per-tensor)."""
    w = w.astype(np.float32)
    keep = dict(axis=axis, keepdims=True) if per_channel else dict(axis=None, keepdims=True)
    if signed:
        # 7 bits: |q| <= 64 keeps a pair of uint8 x int8 products within int16 (2*255*64 < 32767).
        limit = 64 if reduce_range else 127
        peak = np.max(np.abs(w), **keep)
        scale = np.where(peak > 0, peak / limit, 1.0).astype(np.float32)
        data = np.clip(np.rint(w / scale), -limit, limit).astype(np.int8)
        zero_point = None
    else:
        levels = 127 if reduce_range else 255
        low = np.minimum(np.min(w, **keep), 0.0)
        high = np.maximum(np.max(w, **keep), 0.0)
        scale = np.where(high > low, (high - low) / levels, 1.0).astype(np.float32)
        zero_point = np.clip(np.rint(-low / scale), 0, levels)
        data = np.clip(np.rint(w / scale) + zero_point, 0, levels).astype(np.uint8)
        zero_point = zero_point.astype(np.uint8)
    return _QuantizedWeight(data, scale, zero_point)


# ---------------------------------------------------------------------------------------------
# Rewriting.
# ---------------------------------------------------------------------------------------------

class _Writer:
    def __init__(self, model: onnx.ModelProto, scan: _Scan, options, share: bool):
        self.model = model
        self.scan = scan
        self.options = options
        self.share = share  # DynamicQuantizeLinear available: one quantization per shared activation
        self.names = all_names(model)
        self.new_initializers: dict[int, list[TensorProto]] = {}
        self.weights: dict[tuple, tuple[list[str], int]] = {}  # (key, layout, alpha) -> input names, bytes
        self.activations: dict[tuple[int, str], list[str]] = {}  # (graph, activation) -> DQL outputs
        self.touched: set[tuple[int, str]] = set()  # constants that may have lost their last reader
        self.used_ms_domain = False

    def write(self, plans: list[_Plan]) -> list[Note]:
        notes = []
        readers: dict[tuple[int, str], int] = {}  # products per activation, to decide on sharing
        for plan in plans:
            if plan.kind != "gather":
                key = (plan.graph, plan.node.input[0])
                readers[key] = readers.get(key, 0) + 1
        sharers = {key: n for key, n in readers.items() if n > 1}
        weight_readers: dict[Key, int] = {}
        for plan in plans:
            weight_readers[plan.weight] = weight_readers.get(plan.weight, 0) + 1
        replacements: dict[int, list[onnx.NodeProto]] = {}
        dropped: set[int] = set()
        for plan in plans:
            new_nodes, before, after = self._rewrite(plan, (plan.graph, plan.node.input[0]) in sharers)
            replacements[id(plan.node)] = new_nodes
            if plan.fold_add is not None:
                dropped.add(id(plan.fold_add))
            self.touched.add(plan.weight)
            shared = f", weight shared by {weight_readers[plan.weight]} nodes" if weight_readers[plan.weight] > 1 else ""
            kind = "per-row" if plan.kind == "gather" else ("per-column" if self.options.per_channel else "per-tensor")
            dtype = "int8" if plan.kind == "gather" else self.options.weight_type
            folded = ", bias folded" if plan.bias is not None and self.options.form == "ort" and plan.kind != "gather" else ""
            notes.append(Note(_where(plan.node), f"quantized: {dtype} {kind} weights, {before:,} -> {after:,} bytes{shared}{folded}"))
        # Innermost graphs first: rebuilding a graph's node list copies its subgraphs, so an outer
        # graph is rebuilt only after everything inside it is final.
        for gid in reversed(range(len(self.scan.graphs))):
            graph = self.scan.graphs[gid]
            graph.initializer.extend(self.new_initializers.get(gid, []))
            if self.model.ir_version < 4:  # IR 3 lists every initializer among the graph's inputs too
                graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                                   for t in self.new_initializers.get(gid, []))
            # The scan's own node objects, in graph order: the ones `replacements` is keyed by.
            old = [node for g, node, _ in self.scan.nodes if g == gid]
            if not any(id(n) in replacements or id(n) in dropped for n in old):
                continue
            nodes = []
            for node in old:
                if id(node) not in dropped:
                    nodes.extend(replacements.get(id(node), [node]))
            del graph.node[:]
            graph.node.extend(nodes)
        return notes

    # -- names and constants ------------------------------------------------------------------

    def _name(self, base: str) -> str:
        return unique_name(base, self.names)

    def _add(self, gid: int, array: np.ndarray, base: str) -> str:
        name = self._name(base)
        self.new_initializers.setdefault(gid, []).append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def _weight(self, plan: _Plan) -> tuple[list[str], int, int]:
        """Names of the quantized weight, its scale and zero point ('' if none); bytes before and after."""
        cache = (plan.weight, plan.layout, plan.alpha)
        const = self.scan.consts[plan.weight]
        before = int(np.prod(const.tensor.dims)) * 4
        if cache not in self.weights:
            w = numpy_helper.to_array(const.tensor)
            if plan.layout == "nk":
                w = w.T
            w = w * np.float32(plan.alpha) if plan.alpha != 1.0 else w
            gid, base = plan.weight[0], plan.weight[1]
            per_channel = self.options.per_channel
            seven_bit = self.options.reduce_range == "on" or (self.options.reduce_range == "auto" and u8s8_saturates())
            if plan.layout == "rows":  # [V, 1] scales: the Gather of a row's scale broadcasts over the row
                q = quantize_weight(w, True, per_channel, False, axis=1)
                shape = (-1, 1) if per_channel else ()
            else:  # one scale per column: a 1-D [N] tensor, or a scalar
                q = quantize_weight(w, self.options.weight_type == "int8", per_channel, seven_bit)
                shape = (-1,) if per_channel else ()
            q.scale = q.scale.reshape(shape)
            q.zero_point = None if q.zero_point is None else q.zero_point.reshape(shape)
            names = [self._add(gid, np.ascontiguousarray(q.data), f"{base}_quantized"), self._add(gid, q.scale, f"{base}_scale"),
                     self._add(gid, q.zero_point, f"{base}_zero_point") if q.zero_point is not None else ""]
            size = q.data.nbytes + q.scale.nbytes + (q.zero_point.nbytes if q.zero_point is not None else 0)
            self.weights[cache] = (names, size)
        names, size = self.weights[cache]
        return names, before, size

    def _bias(self, plan: _Plan) -> str:
        """A float32 [N] bias vector for the plan's constant bias (the original tensor when it is one)."""
        const = self.scan.consts[plan.bias]
        columns = plan.columns
        if plan.bias_scale == 1.0 and tuple(const.tensor.dims) == (columns,):
            return plan.bias[1]
        self.touched.add(plan.bias)
        vector = np.broadcast_to(numpy_helper.to_array(const.tensor).reshape(-1), (columns,)) * np.float32(plan.bias_scale)
        return self._add(plan.graph, vector.astype(np.float32), f"{plan.bias[1]}_bias")

    # -- nodes ----------------------------------------------------------------------------------

    def _rewrite(self, plan: _Plan, shared_input: bool) -> tuple[list[onnx.NodeProto], int, int]:
        (data, scale, zero_point), before, after = self._weight(plan)
        node = plan.node
        base = node.name or node.output[0]
        if plan.kind == "gather":
            return self._gather(plan, data, scale, base), before, after
        output = plan.fold_add.output[0] if plan.fold_add is not None else node.output[0]
        bias = self._bias(plan) if plan.bias is not None else ""
        nodes: list[onnx.NodeProto] = []
        needs_add = bool(bias) and (self.options.form == "portable")
        product = output if not (needs_add or plan.extra_input) else self._name(f"{base}_product")
        if self.options.form == "ort":
            self.used_ms_domain = True
            if shared_input and self.share:
                a_q, a_scale, a_zero = self._quantized_activation(plan, nodes)
                inputs = [a_q, data, a_scale, scale, a_zero, zero_point, bias]
                nodes.append(helper.make_node("MatMulIntegerToFloat", _trim(inputs), [product],
                                              name=self._name(f"{base}_quant"), domain=MS_DOMAIN))
            else:
                inputs = [node.input[0], data, scale, zero_point, bias]
                nodes.append(helper.make_node("DynamicQuantizeMatMul", _trim(inputs), [product],
                                              name=self._name(f"{base}_quant"), domain=MS_DOMAIN))
        else:
            a_q, a_scale, a_zero = self._quantized_activation(plan, nodes)
            integer = self._name(f"{base}_int32")
            as_float = self._name(f"{base}_int32_float")
            scales = self._name(f"{base}_scales")
            scaled = product if not needs_add else self._name(f"{base}_scaled")
            nodes += [helper.make_node("MatMulInteger", _trim([a_q, data, a_zero, zero_point]), [integer],
                                       name=self._name(f"{base}_quant")),
                      helper.make_node("Cast", [integer], [as_float], name=self._name(f"{base}_cast"), to=TensorProto.FLOAT),
                      helper.make_node("Mul", [a_scale, scale], [scales], name=self._name(f"{base}_scales_mul")),
                      helper.make_node("Mul", [as_float, scales], [scaled], name=self._name(f"{base}_rescale"))]
            if needs_add:
                target = product if plan.extra_input else output
                nodes.append(helper.make_node("Add", [scaled, bias], [target], name=self._name(f"{base}_bias")))
        if plan.extra_input:
            c = plan.extra_input
            if plan.bias_scale != 1.0:
                scaled_c = self._name(f"{base}_beta_c")
                beta = self._add(plan.graph, np.array(plan.bias_scale, np.float32), f"{base}_beta")
                nodes.append(helper.make_node("Mul", [c, beta], [scaled_c], name=self._name(f"{base}_beta_mul")))
                c = scaled_c
            nodes.append(helper.make_node("Add", [product, c], [output], name=self._name(f"{base}_add_c")))
        return nodes, before, after

    def _quantized_activation(self, plan: _Plan, nodes: list) -> list[str]:
        key = (plan.graph, plan.node.input[0])
        if key not in self.activations:
            base = plan.node.input[0]
            names = [self._name(f"{base}_quantized"), self._name(f"{base}_scale"), self._name(f"{base}_zero_point")]
            nodes.append(helper.make_node("DynamicQuantizeLinear", [plan.node.input[0]], names,
                                          name=self._name(f"{base}_DynamicQuantizeLinear")))
            self.activations[key] = names
        return self.activations[key]

    def _gather(self, plan: _Plan, data: str, scale: str, base: str) -> list[onnx.NodeProto]:
        node = plan.node
        rows, as_float = self._name(f"{base}_rows"), self._name(f"{base}_rows_float")
        nodes = [helper.make_node("Gather", [data, node.input[1]], [rows], name=self._name(f"{base}_quant"), axis=0),
                 helper.make_node("Cast", [rows], [as_float], name=self._name(f"{base}_cast"), to=TensorProto.FLOAT)]
        if self.options.per_channel:
            row_scales = self._name(f"{base}_row_scales")
            nodes.append(helper.make_node("Gather", [scale, node.input[1]], [row_scales],
                                          name=self._name(f"{base}_scales"), axis=0))
            scale = row_scales
        nodes.append(helper.make_node("Mul", [as_float, scale], [node.output[0]], name=self._name(f"{base}_rescale")))
        return nodes


def _trim(inputs: list[str]) -> list[str]:
    """Optional inputs: empty names in the middle stay, trailing ones go."""
    while inputs and not inputs[-1]:
        inputs = inputs[:-1]
    return inputs


def _remove_dead(model: onnx.ModelProto, touched: set) -> None:
    """Drop the float weights (and folded biases) that nothing reads any more; tidy value_info."""
    scan = _Scan(model)
    for key in touched:
        const = scan.consts.get(key)
        if const is None or scan.uses.get(key):
            continue
        if const.node is not None:
            const.graph.node.remove(const.node)
        else:
            const.graph.initializer.remove(const.tensor)
            if const.is_input:
                const.graph.input.remove(next(i for i in const.graph.input if i.name == key[1]))
    defined = all_names(model)  # a subgraph's value_info may describe an outer value: look model-wide
    for graph in walk_graphs(model.graph):
        for value in [v for v in graph.value_info if v.name not in defined]:
            graph.value_info.remove(value)


def _upgrade_opset(name: str, model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    from onnx import version_converter

    try:
        upgraded = version_converter.convert_version(model, _MIN_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as exc:  # the converter raises several types; any means "cannot upgrade"
        raise OnnxShrinkError(f"{name}: form=portable needs opset >= {_MIN_OPSET} and the model's opset {opset} "
                              f"could not be upgraded ({str(exc).splitlines()[0][:160]}); use form=ort") from None
    return upgraded


def _verify(name: str, model: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # ValidationError and friends: a bug here, not a user mistake
        raise OnnxShrinkError(f"{name}: produced a model the ONNX checker rejects ({str(exc).splitlines()[0][:200]})") from None
    try:
        make_session(model)
    except OnnxShrinkError as exc:
        raise OnnxShrinkError(f"{name}: produced a model onnxruntime cannot load ({exc})") from None
