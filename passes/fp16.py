"""`fp16`: weights stored in float16, compute in float16 where the execution provider has
float16 kernels, float32 model inputs and outputs kept with casts at the boundary.

Which nodes can compute in float16 is read from onnxruntime's own kernel registry, per op,
opset and type constraint, so the pass follows the installed runtime instead of a hand list.
Nodes without a float16 kernel stay float32 and read their float16-stored weights through a
Cast that onnxruntime folds when it loads the model: the file halves, the speed stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.errors import OnnxShrinkError
from onnxshrink.graph import all_names, constants_to_initializers, opset_version, outer_scope_names, subgraphs, unique_name
from onnxshrink.options import PassOptions, option
from onnxshrink.pass_base import Note, Pass, PassContext, PassOutput
from onnxshrink.registry import register_pass

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
_FP16_MAX = float(np.finfo(np.float16).max)
# Type-generic data movement: in fp16 mode it runs in float16 only when its input already is.
_DATA_MOVEMENT = {"Concat", "Reshape", "Transpose", "Slice", "Gather", "GatherElements", "GatherND", "Squeeze",
                  "Unsqueeze", "Flatten", "Split", "Identity", "Expand", "Tile", "Pad", "DepthToSpace",
                  "SpaceToDepth", "ScatterND", "ScatterElements", "Where", "Cast", "Shape", "Size"}


@register_pass("fp16")
class Float16(Pass):
    summary = "Float16 weights, and float16 compute where the provider has float16 kernels; float32 I/O kept."

    @dataclass(frozen=True)
    class Options(PassOptions):
        compute: str = option("auto", "auto: float16 compute only where no cast is added in front (on an x86 CPU, "
                              "with almost no float16 kernels, this stores weights in float16 and computes in "
                              "float32); fp16: every node with a float16 kernel; storage: all compute float32",
                              choices=("auto", "fp16", "storage"))
        keep_io_types: bool = option(True, "keep float32 model inputs and outputs (casts at the boundary)")
        min_elements: int = option(16, "initializers with fewer elements stay float32", low=0)
        provider: str = option("CPUExecutionProvider", "execution provider whose float16 kernels decide the compute type")

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassOutput:
        graph = model.graph
        if opset_version(model) is None:
            raise OnnxShrinkError("fp16: the model imports no default-domain opset")
        if any(t.data_type == HALF for t in graph.initializer) and not any(t.data_type == FLOAT for t in graph.initializer):
            raise OnnxShrinkError("fp16: the model's weights are float16 already")
        constants_to_initializers(graph)
        types = _tensor_types(model)
        captured = {name for node in graph.node for sub in subgraphs(node) for name in outer_scope_names(sub)}
        notes: list[Note] = []
        kernels = _fp16_kernels(self.options.provider)
        if not kernels and self.options.compute != "storage":
            notes.append(Note("(graph)", f"no float16 kernels registered for {self.options.provider}: storage only"))

        names = all_names(model)
        half_of: dict[str, str] = {}  # float32 tensor -> its float16 twin
        full_of: dict[str, str] = {}  # float16 tensor -> its float32 twin
        is_half: set[str] = set()
        new_nodes: list[onnx.NodeProto] = []
        initializers = {t.name: t for t in graph.initializer}
        pinned = {i.name for i in graph.input} | {o.name for o in graph.output} | captured

        # Weights: stored float16 whatever computes on them; float32 readers get a Cast (folded at load).
        for tensor in list(graph.initializer):
            if tensor.data_type != FLOAT or tensor.name in pinned:
                continue
            array = numpy_helper.to_array(tensor)
            half = _half_array(array, self.options.min_elements)
            if half is None:
                if array.size >= self.options.min_elements:
                    notes.append(Note(tensor.name, "skipped: values beyond float16 range, kept float32"))
                continue
            tensor.CopyFrom(numpy_helper.from_array(half, tensor.name))
            is_half.add(tensor.name)

        if not self.options.keep_io_types:
            for value in list(graph.input) + list(graph.output):
                if value.type.tensor_type.elem_type == FLOAT:
                    value.type.tensor_type.elem_type = HALF
            is_half.update(v.name for v in graph.input if v.type.tensor_type.elem_type == HALF)

        def cast(name: str, to: int) -> str:
            cache, suffix = (half_of, "fp16") if to == HALF else (full_of, "fp32")
            if name not in cache:
                cache[name] = unique_name(f"{name}_{suffix}", names)
                new_nodes.append(helper.make_node("Cast", [name], [cache[name]], name=unique_name(f"Cast_{cache[name]}", names), to=to))
            return cache[name]

        opset = opset_version(model)
        converted = 0
        for node in graph.node:
            plan = _half_plan(node, types, kernels, opset, captured) if self.options.compute != "storage" else None
            if plan and (self.options.compute == "auto" or node.op_type in _DATA_MOVEMENT):
                # Only where the float16 data is already there: a lone float16 node between
                # float32 ones costs two casts and gains nothing.
                activations = [n for i, n in enumerate(node.input) if n and plan["inputs"].get(i) and n not in initializers]
                if not activations or not all(n in is_half for n in activations):
                    plan = None
            for index, name in enumerate(node.input):
                if not name or types.get(name) not in (FLOAT, HALF):
                    continue
                want_half = bool(plan and plan["inputs"].get(index))
                if want_half and name not in is_half:
                    node.input[index] = cast(name, HALF)
                elif not want_half and name in is_half:
                    node.input[index] = cast(name, FLOAT)
            new_nodes.append(node)
            if plan:
                converted += 1
                for index, name in enumerate(node.output):
                    if name and plan["outputs"].get(index):
                        is_half.add(name)
                        _set_cast_target(node, HALF)
        # Graph outputs keep their declared type: a producer of the other type writes a twin that a Cast renames.
        for value in graph.output:
            declared = value.type.tensor_type.elem_type
            if declared not in (FLOAT, HALF) or types.get(value.name) not in (FLOAT, HALF):
                continue
            if (value.name in is_half) != (declared == HALF):
                _retarget_output(value.name, declared, new_nodes, names)
        del graph.node[:]
        graph.node.extend(new_nodes)
        # Weights read by subgraphs, and those inside them, keep their float32 name and type for
        # the readers: stored float16 under a new name, a Cast restores the old one.
        graph_io = {i.name for i in graph.input} | {o.name for o in graph.output}
        stored = _store_half_with_cast(graph, names, self.options.min_elements,
                                       only={n for n in captured if n in initializers and n not in graph_io})
        for node in graph.node:
            for sub in subgraphs(node):
                stored += _store_half_in_subgraph(sub, names, self.options.min_elements)
        if stored:
            notes.append(Note("(subgraphs)", f"{stored} weights read in subgraphs stored float16 behind a Cast"))
        del graph.value_info[:]  # stale types; onnxruntime infers them again
        notes.append(Note("(graph)", f"{converted} nodes compute in float16, {len(half_of) + len(full_of)} casts added"))
        return PassOutput(model, notes)


def _half_array(array: np.ndarray, min_elements: int) -> np.ndarray | None:
    if array.dtype != np.float32 or array.size < min_elements:
        return None
    if array.size and np.max(np.abs(array)) > _FP16_MAX:
        return None
    return array.astype(np.float16)


def _store_half_with_cast(graph: onnx.GraphProto, names: set, min_elements: int, only=None) -> int:
    """Float32 initializers (all, or those in `only`) become float16 twins plus a Cast to the old name."""
    casts, count = [], 0
    for tensor in graph.initializer:
        if tensor.data_type != FLOAT or (only is not None and tensor.name not in only):
            continue
        half = _half_array(numpy_helper.to_array(tensor), min_elements)
        if half is None:
            continue
        original = tensor.name
        twin = unique_name(f"{original}_fp16", names)
        tensor.CopyFrom(numpy_helper.from_array(half, twin))
        casts.append(helper.make_node("Cast", [twin], [original], name=unique_name(f"Cast_{original}", names), to=FLOAT))
        count += 1
    if casts:
        nodes = casts + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    return count


def _store_half_in_subgraph(graph: onnx.GraphProto, names: set, min_elements: int) -> int:
    count = _store_half_with_cast(graph, names, min_elements)
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for sub in subgraphs(node):
            count += _store_half_in_subgraph(sub, names, min_elements)
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            continue
        value = next((a for a in node.attribute if a.name == "value"), None)
        half = _half_array(numpy_helper.to_array(value.t), min_elements) if value is not None else None
        if half is None:
            continue
        original = node.output[0]
        twin = unique_name(f"{original}_fp16", names)
        value.t.CopyFrom(numpy_helper.from_array(half, value.t.name))
        node.output[0] = twin
        nodes.append(helper.make_node("Cast", [twin], [original], name=unique_name(f"Cast_{original}", names), to=FLOAT))
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def _retarget_output(name: str, to: int, nodes: list, names: set) -> None:
    producer = next(n for n in nodes if name in n.output)
    twin = unique_name(f"{name}_{'fp32' if to == HALF else 'fp16'}", names)
    producer.output[list(producer.output).index(name)] = twin
    for node in nodes:
        node.input[:] = [twin if n == name else n for n in node.input]
    nodes.append(helper.make_node("Cast", [twin], [name], name=unique_name(f"Cast_{name}", names), to=to))


def _set_cast_target(node: onnx.NodeProto, to: int) -> None:
    if node.op_type == "Cast":
        for attr in node.attribute:
            if attr.name == "to" and attr.i == FLOAT:
                attr.i = to


def _half_plan(node, types, kernels, opset, captured) -> dict | None:
    """Which float inputs/outputs of `node` become float16, or None if it must stay float32."""
    if node.domain not in ("", "ai.onnx") or any(True for _ in subgraphs(node)):
        return None
    if any(name in captured for name in node.output):
        return None
    float_params = [(index, name) for index, name in enumerate(node.input) if name and types.get(name) == FLOAT]
    float_outputs = [(index, name) for index, name in enumerate(node.output) if name and types.get(name) == FLOAT]
    if not float_params and not float_outputs:
        return None
    if any(name and name not in types for name in list(node.input) + list(node.output)):
        return None  # a tensor of unknown type: do not guess
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return None
    for constraints in kernels.get((node.op_type, schema.since_version), []):
        plan = {"inputs": {}, "outputs": {}}
        ok = True
        for side, params, formal in (("inputs", float_params, schema.inputs), ("outputs", float_outputs, schema.outputs)):
            for index, _ in params:
                if not formal:
                    ok = False
                    break
                type_str = formal[min(index, len(formal) - 1)].type_str
                allowed = constraints.get(type_str)
                if allowed is None:
                    plan[side][index] = False  # a fixed type such as tensor(float): stays float32
                elif "tensor(float16)" in allowed:
                    plan[side][index] = True
                elif "tensor(float)" in allowed:
                    plan[side][index] = False
                else:
                    ok = False
        if ok and any(plan["inputs"].values()) | any(plan["outputs"].values()):
            if _consistent(node, schema, plan, float_params, float_outputs):
                return plan
    return None


def _consistent(node, schema, plan, float_params, float_outputs) -> bool:
    # Every tensor bound to one type variable must end up with the same type.
    chosen: dict[str, bool] = {}
    for side, params, formal in (("inputs", float_params, schema.inputs), ("outputs", float_outputs, schema.outputs)):
        for index, _ in params:
            type_str = formal[min(index, len(formal) - 1)].type_str
            if chosen.setdefault(type_str, plan[side][index]) != plan[side][index]:
                return False
    return True


@lru_cache(maxsize=4)
def _fp16_kernels(provider: str) -> dict:
    """(op_type, since_version) -> list of {type constraint: allowed types} of kernels that take float16."""
    from onnxruntime.capi import _pybind_state

    history: dict[str, list[int]] = {}
    for schema in onnx.defs.get_all_schemas_with_history():
        if schema.domain == "":
            history.setdefault(schema.name, []).append(schema.since_version)
    table: dict = {}
    for kernel in _pybind_state.get_all_opkernel_def():
        if kernel.provider != provider or kernel.domain not in ("", "ai.onnx"):
            continue
        constraints = {k: list(v) for k, v in kernel.type_constraints.items()}
        if not any("tensor(float16)" in v for v in constraints.values()):
            continue
        start, end = kernel.version_range
        for since in history.get(kernel.op_name, []):
            if start <= since <= end:
                table.setdefault((kernel.op_name, since), []).append(constraints)
    return table


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=False)
    except Exception:  # inference fails on some exported models; fall back to what the file declares
        inferred = model
    types: dict[str, int] = {}
    g = inferred.graph
    for value in list(g.input) + list(g.output) + list(g.value_info):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for tensor in model.graph.initializer:
        types[tensor.name] = tensor.data_type
    return types
