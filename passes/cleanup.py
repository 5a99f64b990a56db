"""`cleanup`: leave onnxruntime less to run, never a different output.

What it does (each can be switched off):

- constant folding, including shape computations whose value follows from static sizes or rank,
  and Reshape/Expand targets rewritten as constants where sizes are only known to equal the
  input's (a Shape -> Gather -> Unsqueeze -> Concat -> Reshape chain becomes one Reshape), with
  chains of reshaping ops merged (cleanup_shapes tracks sizes as integers or symbols);
- the same inside If/Loop/Scan bodies, reading values of the enclosing graphs, and an If whose
  condition is known replaced by its branch;
- ops that return their input removed (Identity, Cast to the same type, Reshape to the same shape,
  x*1, x+0, a Slice of everything, Transpose pairs, ...), a Transpose that moves only size-1 axes
  made a Reshape, Slice(Slice(x)) merged, duplicate nodes merged, dead nodes, unused If outputs and
  unused initializers dropped, identical initializers stored once;
- weight folds (cleanup_fuse): a scalar or per-channel Mul/Add/Sub/Div or a BatchNormalization after
  a Conv, ConvTranspose or Gemm folded into its weights and bias, and x*Clip(x+3,0,6)/6 written as
  x*HardSigmoid(x). These change rounding, so they are a second stage that is kept only if no output
  moves by more than `tolerance` (default 1e-6 of its largest magnitude) on the check samples (the
  pipeline's data, else synthesized inputs);
- `input_shapes` fixes dynamic input sizes so that everything that becomes static folds too;
  `strip_metadata` drops per-node debug metadata.

Declared shapes of outputs and value_info are hints, never facts: only graph inputs' declared shapes
are used (onnxruntime enforces their fixed sizes; the ONNX IR binds a dim_param to one value). A
declared output shape that contradicts what the graph computes is corrected. Folding never grows the
file: a fold may add at most 1 KiB (shape tensors), never by widening a weight (Cast, Dequantize-
Linear, Expand, ...), and a result larger than the input is redone without growing folds. The
result never has value_info with an unknown element type or a name twice.

Exact rewrites can still change onnxruntime's own choices: a graph with static shapes lets it fuse
more (e.g. MatMul with a scalar Mul into FusedMatMul), which rounds differently.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx

from onnxshrink.errors import OnnxShrinkError, UsageError
from onnxshrink.graph import opset_version, walk_graphs
from onnxshrink.options import PassOptions, option
from onnxshrink.pass_base import Note, Pass, PassContext, PassOutput
from onnxshrink.registry import register_pass

from .cleanup_rewrite import Settings, simplify
from .cleanup_shapes import onnx_inferred

_CHECK_SAMPLES = 4
_SHAPE_SPEC = re.compile(r"^(?P<name>.+):(?P<dims>\d+(?:x\d+)*)?$")


@register_pass("cleanup")
class Cleanup(Pass):
    summary = ("Fold constants and shape computations (subgraphs included), drop no-op and dead nodes, fold "
               "Mul/Add/BatchNorm into Conv weights; outputs unchanged.")

    @dataclass(frozen=True)
    class Options(PassOptions):
        fold_constants: bool = option(True, "evaluate nodes whose inputs are constant, or whose value follows "
                                            "from static sizes, and store the result")
        remove_identity: bool = option(True, "remove ops that return their input: Identity, Cast to the same "
                                             "type, Reshape to the same shape, x*1, x+0, ...")
        fuse: bool = option(True, "fold a scalar or per-channel Mul/Add/Sub/Div and BatchNormalization after a "
                                  "Conv/ConvTranspose/Gemm into its weights and bias, and write x*Clip(x+3,0,6)/6 as "
                                  "x*HardSigmoid(x), where outputs stay within `tolerance`")
        subgraphs: bool = option(True, "also work inside If/Loop/Scan bodies, and replace an If whose "
                                       "condition is known by its branch")
        dedup: bool = option(True, "store identical initializers once")
        input_shapes: tuple[str, ...] = option((), "fix dynamic input sizes, e.g. [images:1x3x320x320] (name:dims; "
                                                   "'name:' for a scalar); the model then accepts only these sizes")
        strip_metadata: bool = option(False, "drop per-node doc strings and metadata_props (exporters' debug "
                                             "information such as stack traces)")
        tolerance: float = option(1e-6, "the most that the `fuse` rewrites (they round differently) may change "
                                        "any output, relative to its largest magnitude, on up to 4 samples of the "
                                        "pipeline's data (else synthesized inputs); past it they are undone",
                                  low=0.0)

        def __post_init__(self):
            super().__post_init__()
            for spec in self.input_shapes:
                if not _SHAPE_SPEC.match(spec):
                    raise UsageError(f"option 'input_shapes': '{spec}' is not name:dims (e.g. images:1x3x320x320)")

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassOutput:
        # `model` is the pass's private copy (Pass.apply): the input fixes below edit it in place.
        if (opset_version(model) or 0) < 7:
            return PassOutput(model, [Note("(graph)", "nothing cleaned: opsets before 7 are not supported "
                                                      "(onnxruntime needs 7 or later)")])
        sizes: dict = {}
        size_before = _serialized_size(model, sizes)
        notes: list[Note] = []
        if self.options.input_shapes:
            notes += _fix_input_shapes(model, self.options.input_shapes)
        if self.options.strip_metadata:
            notes += _strip_metadata(model)
        result = stats = None
        for limit in ("size", "strict"):
            candidate, stats = _simplified(model, self._settings(limit, inexact=False))
            fold_notes = []
            if self.options.fuse and _has_weight_fold_candidates(candidate):
                fold_notes, candidate, stats = self._with_weight_folds(model, candidate, stats, limit, context)
            if _serialized_size(candidate, sizes) <= size_before:
                result = candidate
                notes += fold_notes
                if limit == "strict":
                    notes.append(Note("(graph)", "folded only what does not grow: larger folds made the file bigger"))
                break
        if result is None:
            return PassOutput(model, notes + [Note("(graph)", "kept the input: the cleaned graph was larger")])
        if not stats.counts and not notes:
            return PassOutput(model, [Note("(graph)", "nothing to clean")])
        # compress() checks the result with onnx's checker and onnxruntime.
        _fix_output_declarations(result, fill_sizes=bool(self.options.input_shapes))
        notes += [Note("(graph)", f"{what}: {count}") for what, count in sorted(stats.counts.items())]
        return PassOutput(result, notes)

    def _settings(self, limit: str, inexact: bool) -> Settings:
        return Settings(fold_constants=self.options.fold_constants, remove_identity=self.options.remove_identity,
                        fuse=inexact, subgraphs=self.options.subgraphs, dedup=self.options.dedup, fold_limit=limit)

    def _with_weight_folds(self, reference, exact_model, exact_stats, limit, context):
        """Fold Mul/Add/BatchNorm into Conv weights (and rewrite x*Clip(x+3,0,6)/6) on top of the exact
        result. Those change rounding, so the result is run on the check samples and kept only if no
        output moved by more than `tolerance` relative to its largest magnitude."""
        folded, stats = _simplified(exact_model, self._settings(limit, inexact=True))
        inexact = sum(count for what, count in stats.counts.items() if what in _INEXACT)
        if not inexact:
            return [], exact_model, exact_stats
        feeds, origin = _check_samples(reference, context)
        change = max_output_change(reference, folded, feeds) if feeds else None
        if change is None:
            return [Note("(graph)", f"weight folds not applied: no samples that run the model to check them on ({origin})")], \
                exact_model, exact_stats
        if change > self.options.tolerance:
            return [Note("(graph)", f"weight folds undone: they changed an output by {change:.2g} of its largest magnitude "
                                    f"on {len(feeds)} samples of {origin} (tolerance {self.options.tolerance:g})")], \
                exact_model, exact_stats
        return [Note("(graph)", f"weight folds changed outputs by at most {change:.2g} relative on {len(feeds)} samples "
                                f"of {origin}")], folded, _combined(exact_stats, stats)


def weight_folds(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """A copy of `model` with only the weight folds applied (no constant folding, no check against a
    tolerance), and what was folded. For passes whose own error dwarfs the folds' rounding (~1e-5):
    quantize-int8 uses it so that no float Mul/Add is left between two integer kernels."""
    if not _has_weight_fold_candidates(model):
        return model, {}
    settings = Settings(fold_constants=False, remove_identity=False, fuse=True, subgraphs=False, dedup=False)
    folded, stats = _simplified(model, settings)
    counts = {what: count for what, count in stats.counts.items() if what in _INEXACT}
    return (folded, counts) if counts else (model, {})


def _has_weight_fold_candidates(model: onnx.ModelProto) -> bool:
    """Whether any Conv/ConvTranspose/Gemm feeds a Mul/Add/Sub/Div/BatchNormalization, or an Add feeds a
    Clip (hard swish): else the second stage is skipped."""
    for graph in walk_graphs(model.graph):
        producers = {o: n.op_type for n in graph.node for o in n.output if o and n.domain in ("", "ai.onnx")}
        for node in graph.node:
            feeding = {producers.get(name) for name in node.input}
            if node.op_type in ("Mul", "Add", "Sub", "Div", "BatchNormalization") and \
                    feeding & {"Conv", "ConvTranspose", "Gemm"}:
                return True
            if node.op_type == "Clip" and "Add" in feeding:
                return True
    return False


_INEXACT = {f"{op} folded into {target}" for op in ("Mul", "Add", "Sub", "Div", "BatchNormalization")
            for target in ("Conv", "ConvTranspose", "Gemm")} | {"x*Clip(x+3,0,6)/6 made x*HardSigmoid(x)"}


def _simplified(model: onnx.ModelProto, settings: Settings):
    candidate = onnx.ModelProto()
    candidate.CopyFrom(model)
    stats = simplify(candidate, settings)
    dropped = _tidy_value_info(candidate)
    if dropped:
        stats.add("stale, untyped or repeated value_info dropped", dropped)
    return candidate, stats


def _combined(first, second):
    first.counts.update(second.counts)
    return first


def _check_samples(model: onnx.ModelProto, context: PassContext) -> tuple[list, str]:
    """Up to 4 samples to check weight folds on: the pipeline's data, else synthesized inputs."""
    from onnxshrink.calibration import open_data

    if context is not None and context.data is not None:
        try:
            return context.data.take(_CHECK_SAMPLES), context.data.origin
        except OnnxShrinkError:
            pass
    try:
        data = open_data(None, model, synthesize_count=2)
        return data.take(2), data.origin
    except OnnxShrinkError as exc:
        return [], str(exc)[:80]


def max_output_change(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: list,
                      expected: list | None = None) -> float | None:
    """The largest change of any output on `feeds`, relative to its largest magnitude (None: a
    model does not run; inf: an output changed shape or type). `expected`: the reference's outputs
    on `feeds`, where the caller has them already."""
    from onnxshrink.fidelity import output_metrics, summarize
    from onnxshrink.runtime import make_session, run_all

    try:
        if expected is None:
            expected = run_all(make_session(reference, threads=1), feeds)
        after = make_session(candidate, threads=1)
        names = [o.name for o in after.get_outputs()]
        got = run_all(after, feeds)
    except OnnxShrinkError:
        return None
    per_output = output_metrics(names, expected, got)
    if any("note" in metrics for metrics in per_output.values()):
        return float("inf")
    return summarize(per_output).get("max_rel", 0.0)


def _fix_input_shapes(model: onnx.ModelProto, specs: tuple[str, ...]) -> list[Note]:
    initializers = {t.name for t in model.graph.initializer}
    inputs = {i.name: i for i in model.graph.input if i.name not in initializers}
    notes = []
    for spec in specs:
        match = _SHAPE_SPEC.match(spec)
        name, dims = match.group("name"), match.group("dims")
        sizes = [int(d) for d in dims.split("x")] if dims else []
        value = inputs.get(name)
        if value is None:
            raise OnnxShrinkError(f"cleanup: input_shapes names '{name}', which is not a model input "
                                  f"(inputs: {', '.join(inputs)})")
        tensor_type = value.type.tensor_type
        declared = list(tensor_type.shape.dim) if tensor_type.HasField("shape") else None
        if declared is not None and len(declared) != len(sizes):
            raise OnnxShrinkError(f"cleanup: input_shapes gives '{name}' {len(sizes)} dims, the model declares "
                                  f"{len(declared)}")
        for axis, (dim, size) in enumerate(zip(declared or [], sizes)):
            if dim.HasField("dim_value") and dim.dim_value != size:
                raise OnnxShrinkError(f"cleanup: input_shapes gives '{name}' size {size} at axis {axis}, the model "
                                      f"fixes it to {dim.dim_value}")
        tensor_type.ClearField("shape")
        tensor_type.shape.SetInParent()
        for size in sizes:
            tensor_type.shape.dim.add().dim_value = size
        notes.append(Note(name, f"input fixed to {'x'.join(map(str, sizes)) or 'a scalar'}"))
    return notes


def _strip_metadata(model: onnx.ModelProto) -> list[Note]:
    removed = 0
    for graph in walk_graphs(model.graph):
        for node in graph.node:
            removed += len(node.doc_string) + sum(len(p.key) + len(p.value) for p in node.metadata_props)
            node.ClearField("doc_string")
            node.ClearField("metadata_props")
        for value in list(graph.value_info) + list(graph.input) + list(graph.output):
            removed += sum(len(p.key) + len(p.value) for p in value.metadata_props)
            value.ClearField("metadata_props")
    return [Note("(graph)", f"per-node metadata dropped: {removed} bytes")] if removed else []


def _tidy_value_info(model: onnx.ModelProto) -> int:
    """Keep only value_info that describes a value still computed in its graph: once per name, never
    with an unknown element type, never repeating a graph input or output. Returns how many it dropped."""
    dropped = 0
    for graph in walk_graphs(model.graph):
        produced = {o for node in graph.node for o in node.output if o}
        skip = {i.name for i in graph.input} | {o.name for o in graph.output} | {t.name for t in graph.initializer}
        seen, keep = set(), []
        for value in graph.value_info:
            if value.name in seen or value.name in skip or value.name not in produced:
                continue
            kind = value.type.WhichOneof("value")
            if kind is None or (kind == "tensor_type" and value.type.tensor_type.elem_type == 0):
                continue
            seen.add(value.name)
            keep.append(value)
        if len(keep) != len(graph.value_info):
            dropped += len(graph.value_info) - len(keep)
            del graph.value_info[:]
            graph.value_info.extend(keep)
    return dropped


def _fix_output_declarations(model: onnx.ModelProto, fill_sizes: bool = False) -> None:
    """Where a declared output shape contradicts what the graph computes, declare what it computes:
    the declaration was wrong, and onnx's full check would reject the file. With `fill_sizes` (inputs
    were fixed), sizes that became static are written into the declaration too."""
    inferred = onnx_inferred(model)
    for value in model.graph.output:
        found = inferred.get(value.name)
        if found is None or found[1] is None or not value.type.HasField("tensor_type"):
            continue
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        declared = list(tensor_type.shape.dim)
        dims = found[1]
        conflict = len(declared) != len(dims) or any(
            d.HasField("dim_value") and v is not None and d.dim_value != v for d, v in zip(declared, dims))
        if not conflict:
            if fill_sizes:
                for d, v in zip(declared, dims):
                    if v is not None and not d.HasField("dim_value"):
                        d.dim_value = v  # replaces a dim_param (a oneof)
            continue
        tensor_type.ClearField("shape")
        tensor_type.shape.SetInParent()
        for v in dims:
            entry = tensor_type.shape.dim.add()
            if v is not None:
                entry.dim_value = v


def _serialized_size(model: onnx.ModelProto, tensor_sizes: dict) -> int:
    """model.ByteSize(), without serializing the weights of every initializer each time (protobuf's
    ByteSize does, which costs a large model a third of a second per call): the graph's other fields
    are measured on a copy without initializers, and each initializer's size is remembered by name.
    Cleanup never gives a different value to an existing initializer name."""
    rest, graph = onnx.ModelProto(), onnx.GraphProto()
    _copy_fields(model, rest, skip="graph")
    _copy_fields(model.graph, graph, skip="initializer")
    graph_size = graph.ByteSize()
    for tensor in model.graph.initializer:
        key = (tensor.name, tensor.data_type, tuple(tensor.dims))
        size = tensor_sizes.get(key)
        if size is None:
            size = tensor_sizes[key] = _tensor_size(tensor)
        graph_size += 1 + _varint_size(size) + size  # field 5: one tag byte
    has_graph = model.HasField("graph")
    return rest.ByteSize() + ((1 + _varint_size(graph_size) + graph_size) if has_graph else 0)  # field 7


def _tensor_size(tensor: onnx.TensorProto) -> int:
    """tensor.ByteSize(); for raw data, from its length (ByteSize would serialize the weights)."""
    if not tensor.HasField("raw_data"):
        return tensor.ByteSize()
    header = onnx.TensorProto()
    _copy_fields(tensor, header, skip="raw_data")
    length = len(tensor.raw_data)
    return header.ByteSize() + 1 + _varint_size(length) + length  # field 9: one tag byte


def _copy_fields(source, target, skip: str) -> None:
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


