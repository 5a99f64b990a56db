"""`cleanup`: dead nodes, unused initializers, Identity nodes, and constant folding where it is safe.

Outputs are unchanged. Folding never grows the file: ops whose folded result is bigger than
their inputs (Expand, Tile, a Cast that widens, DequantizeLinear, ...) are left as they are,
since a model that stores fp16 or int8 weights with a cast on load means to stay small.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxshrink.graph import model_stats
from onnxshrink.options import PassOptions, option
from onnxshrink.pass_base import Note, Pass, PassContext, PassOutput
from onnxshrink.registry import register_pass
from onnxshrink.surgeon import export_model, import_graph

# Ops whose output can be much larger than their inputs, or that are deliberate decompression steps.
_GROWING_OPS = {"Expand", "Tile", "ConstantOfShape", "Range", "Resize", "Upsample", "Pad", "OneHot",
                "DequantizeLinear", "DynamicQuantizeLinear", "MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"}
_NONDETERMINISTIC_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                         "Bernoulli", "Dropout"}


@register_pass("cleanup")
class Cleanup(Pass):
    summary = "Remove dead nodes, unused initializers and Identity nodes; fold constants where safe (outputs unchanged)."

    @dataclass(frozen=True)
    class Options(PassOptions):
        fold_constants: bool = option(True, "evaluate nodes whose inputs are all constant and store the result")
        remove_identity: bool = option(True, "bypass Identity nodes")

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassOutput:
        notes: list[Note] = []
        graph = import_graph(model)
        if self.options.remove_identity:
            notes += _bypass_identities(graph)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        unfolded = export_model(graph, model)
        result = unfolded
        if self.options.fold_constants:
            for size_threshold in (None, 64 * 1024):  # a fold that grows the file is redone with a size cap
                folded_graph, fold_notes = _fold(import_graph(unfolded), size_threshold)
                folded = export_model(folded_graph, model)
                problem = _invalid(folded)
                if problem:
                    notes.append(Note("(graph)", f"skipped constant folding: it gave an invalid graph ({problem})"))
                    break
                if model_stats(folded).bytes <= model.ByteSize():
                    result = folded
                    notes += fold_notes
                    break
        _drop_stale_value_info(result)
        before, after = model_stats(model), model_stats(result)
        if after.bytes > before.bytes or (after.nodes, after.params) == (before.nodes, before.params):
            # A re-export alone is no gain, and cleanup never makes the file larger.
            return PassOutput(model, [Note("(graph)", "nothing to clean" if after.bytes <= before.bytes else
                                           f"kept the input: the cleaned graph was {after.bytes - before.bytes} bytes larger")])
        return PassOutput(result, notes)


def _bypass_identities(graph: gs.Graph) -> list[Note]:
    notes = []
    graph_outputs = set(id(t) for t in graph.outputs)
    graph_inputs = set(id(t) for t in graph.inputs)
    for node in list(graph.nodes):
        if node.op != "Identity" or len(node.inputs) != 1 or len(node.outputs) != 1:
            continue
        source, target = node.inputs[0], node.outputs[0]
        if id(target) not in graph_outputs:
            for consumer in list(target.outputs):
                _replace(consumer.inputs, target, source)
        elif (not isinstance(source, gs.Constant) and id(source) not in graph_inputs and id(source) not in graph_outputs
              and len(source.inputs) == 1):
            # The Identity names a graph output: let the producer write that name directly.
            producer = source.inputs[0]
            for consumer in list(source.outputs):
                if consumer is not node:
                    _replace(consumer.inputs, source, target)
            _replace(producer.outputs, source, target)
        else:
            continue
        node.outputs.clear()
        node.inputs.clear()
        notes.append(Note(node.name or target.name, "removed Identity"))
    return notes


def _replace(tensors, old: gs.Tensor, new: gs.Tensor) -> None:
    # Index assignment keeps graphsurgeon's producer/consumer links in sync.
    for index, tensor in enumerate(tensors):
        if tensor is old:
            tensors[index] = new


def _fold(graph: gs.Graph, size_threshold: int | None) -> tuple[gs.Graph, list[Note]]:
    before = len(graph.nodes)
    try:
        # flatten_subgraphs inlines an If with a constant condition; on nested Ifs (Silero VAD)
        # graphsurgeon leaves outputs unbound, so branches stay for the cleanup issue to handle.
        graph.fold_constants(error_ok=True, size_threshold=size_threshold, should_exclude_node=_keep_unfolded,
                             flatten_subgraphs=False)
    except Exception as exc:  # graphsurgeon's folding raises many types on exotic graphs; then we only clean
        return graph, [Note("(graph)", f"skipped constant folding: {str(exc).splitlines()[0][:200]}")]
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    if len(graph.nodes) < before:
        return graph, [Note("(graph)", f"folded constants: {before - len(graph.nodes)} nodes fewer")]
    return graph, []


def _invalid(model: onnx.ModelProto) -> str | None:
    try:
        onnx.checker.check_model(model, full_check=False)
    except onnx.checker.ValidationError as exc:
        return str(exc).splitlines()[0][:200]
    return None


def _keep_unfolded(node: gs.Node) -> bool:
    if node.domain not in ("", "ai.onnx", None):
        return True
    if node.op in _GROWING_OPS or node.op in _NONDETERMINISTIC_OPS:
        return True
    if node.op == "Cast" and node.inputs and isinstance(node.inputs[0], gs.Constant):
        source = np.dtype(node.inputs[0].values.dtype)
        target = onnx.helper.tensor_dtype_to_np_dtype(node.attrs.get("to", onnx.TensorProto.FLOAT))
        return np.dtype(target).itemsize > source.itemsize and node.inputs[0].values.size > 64
    return False


def _drop_stale_value_info(model: onnx.ModelProto) -> None:
    # value_info of removed tensors only bloats the file; the rest ORT recomputes on load.
    live = {name for node in model.graph.node for name in list(node.input) + list(node.output)}
    keep = [vi for vi in model.graph.value_info if vi.name in live]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
