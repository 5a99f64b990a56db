"""The rewriter behind `cleanup`: one forward sweep per graph (subgraphs included, with the enclosing
graphs' constants, sizes and renames visible) that folds constants and shape computations, inlines
If nodes whose condition is known, drops ops that provably return their input, merges duplicate
nodes, then removes dead nodes, runs the weight folds of cleanup_fuse when asked, and writes the
graph back (constants as initializers, or Constant nodes in subgraphs).

A sweep is repeated (`simplify`) until it changes nothing, since each fold can expose more. The
rewrites here keep every output bit for bit: integer and data-movement results are computed exactly
in numpy, other folded values by onnxruntime itself (cleanup_eval).
"""

from __future__ import annotations

import hashlib
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxshrink.graph import attribute, outer_scope_names, subgraphs, unique_name, walk_graphs

from .cleanup_eval import NONDETERMINISTIC, NotFoldable, evaluate
from .cleanup_fuse import WeightFolds
from .cleanup_shapes import (Inputs, Partial, Sym, _slice_params, fresh, infer, onnx_inferred, partial_from_array,
                             propagate)

T = onnx.TensorProto
_SMALL = 1024  # bytes: a folded value this small is always kept
_COMPARE_OPS = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Not", "IsNaN",
                "IsInf"}
_RESHAPE_LIKE = {"Reshape", "Squeeze", "Unsqueeze", "Flatten"}
_DECOMPRESSING = {"Cast", "CastLike", "DequantizeLinear", "DynamicQuantizeLinear", "Expand", "Tile", "Resize",
                  "Upsample", "Pad", "ConstantOfShape", "Range", "OneHot"}


@dataclass
class Settings:
    fold_constants: bool = True
    remove_identity: bool = True
    fuse: bool = True
    subgraphs: bool = True
    dedup: bool = True
    # "size": a fold may grow what it replaces by at most 1 KiB (shape tensors, masks), never by widening
    # a weight; "strict": a fold may not grow at all (the retry when a file came out larger).
    fold_limit: str = "size"


@dataclass
class Stats:
    counts: Counter = field(default_factory=Counter)

    def add(self, kind: str, n: int = 1) -> None:
        self.counts[kind] += n


class Const:
    """A constant value: an original TensorProto (converted on first use) or a computed array."""

    __slots__ = ("proto", "_array", "origin")

    def __init__(self, proto: onnx.TensorProto | None = None, array: np.ndarray | None = None, origin: str = "folded"):
        self.proto, self._array, self.origin = proto, array, origin

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = numpy_helper.to_array(self.proto)
        return self._array

    @property
    def shape(self) -> tuple:
        return tuple(self.proto.dims) if self._array is None else self._array.shape

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def elem_type(self) -> int:
        if self._array is None:
            return self.proto.data_type
        return onnx.helper.np_dtype_to_tensor_dtype(self._array.dtype)

    @property
    def loadable(self) -> bool:
        if self._array is not None:
            return True
        return self.proto.data_type not in (T.STRING, T.UNDEFINED) and self.proto.data_location != T.EXTERNAL


class Scope:
    """What is known about the names visible in one graph: its own plus its enclosing graphs'."""

    def __init__(self, parent: "Scope | None", graph: onnx.GraphProto):
        self.parent, self.graph = parent, graph
        self.consts: dict[str, Const] = {}
        self.shapes: dict[str, object] = {}
        self.types: dict[str, int] = {}
        self.partials: dict[str, Partial] = {}
        self.alias: dict[str, str] = {}
        self.cse: dict[tuple, list[str]] = {}
        self.small_consts: dict[tuple, str] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.outputs = {o.name for o in graph.output}

    def chain(self):
        scope = self
        while scope is not None:
            yield scope
            scope = scope.parent

    def find(self, table: str, name: str):
        for scope in self.chain():
            value = getattr(scope, table).get(name)
            if value is not None:
                return value
        return None

    def resolve(self, name: str) -> str:
        seen = 0
        while name:
            target = self.find("alias", name)
            if target is None or target == name or seen > 1000:
                return name
            name, seen = target, seen + 1
        return name


class Rewriter(WeightFolds):
    def __init__(self, model: onnx.ModelProto, settings: Settings, stats: Stats):
        self.model, self.settings, self.stats = model, settings, stats
        self.opsets = {e.domain or "": e.version for e in model.opset_import}
        self.opset = self.opsets.get("", self.opsets.get("ai.onnx", 1))
        self.ir_version = model.ir_version
        self.inferred = onnx_inferred(model)
        self.taken = _all_names(model)
        self.definitions = _definition_counts(model)
        self.changed = False

    # ------------------------------------------------------------------ entry
    def run(self, dedup_initializers: bool = True) -> bool:
        if self.settings.dedup and dedup_initializers:
            self._dedup_initializers(self.model.graph)
        self.process(self.model.graph, None, main=True)
        return self.changed

    # ------------------------------------------------------------------ one graph
    def process(self, graph: onnx.GraphProto, parent: Scope | None, main: bool) -> None:
        scope = Scope(parent, graph)
        overridable = {i.name for i in graph.input}
        for tensor in graph.initializer:
            if tensor.name not in overridable:
                scope.consts[tensor.name] = Const(proto=tensor, origin="initializer")
        for value in graph.input:
            scope.types[value.name] = value.type.tensor_type.elem_type if value.type.HasField("tensor_type") else 0
            scope.shapes[value.name] = self._input_shape(value, main)
        work = deque(graph.node)
        kept: list[onnx.NodeProto] = []
        while work:
            node = work.popleft()
            for index, name in enumerate(node.input):
                if name:
                    resolved = scope.resolve(name)
                    if resolved != name:
                        node.input[index] = resolved
            if self._take_constant(node, scope):
                continue
            if node.op_type == "If" and node.domain in ("", "ai.onnx") and self._inline_if(node, scope, work):
                continue
            if self.settings.subgraphs:
                for sub in subgraphs(node):
                    self.process(sub, scope, main=False)
            else:
                for sub in subgraphs(node):
                    _resolve_outer(sub, scope)
            self._record_outputs(node, scope)
            if self.settings.fold_constants and self._fold(node, scope):
                continue
            if self._simplify(node, scope):
                continue
            if self._merge_duplicate(node, scope):
                continue
            kept.append(node)
            for name in node.output:
                if name:
                    scope.producer[name] = node
        kept = self._finish_outputs(graph, kept, scope, main)
        kept = self._remove_dead(graph, kept)
        if self.settings.fuse:
            kept = self._fuse(graph, kept, scope)
        self._write_back(graph, kept, scope, main)

    def _input_shape(self, value: onnx.ValueInfoProto, main: bool):
        if not value.type.HasField("tensor_type") or not value.type.tensor_type.HasField("shape"):
            inferred = self.inferred.get(value.name)
            return _from_inferred(value.name, inferred[1]) if inferred and inferred[1] is not None else None
        if not main:
            inferred = self.inferred.get(value.name)
            return _from_inferred(value.name, inferred[1]) if inferred and inferred[1] is not None else None
        dims = []
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                dims.append(dim.dim_value)
            elif dim.HasField("dim_param") and dim.dim_param:
                # The ONNX IR binds a dim_param to one value across all of the model's inputs.
                dims.append(Sym(("param", dim.dim_param)))
            else:
                dims.append(Sym(("in", value.name, axis)))
        return tuple(dims)

    # ------------------------------------------------------------------ lookups
    def const_of(self, scope: Scope, name: str) -> np.ndarray | None:
        const = scope.find("consts", name)
        if const is None or not const.loadable:
            return None
        return const.array

    def is_const(self, scope: Scope, name: str) -> bool:
        const = scope.find("consts", name)
        return const is not None and const.loadable

    def shape_of(self, scope: Scope, name: str):
        const = scope.find("consts", name)
        if const is not None:
            return tuple(int(d) for d in const.shape)
        return scope.find("shapes", name)

    def type_of(self, scope: Scope, name: str) -> int:
        const = scope.find("consts", name)
        if const is not None:
            return const.elem_type
        found = scope.find("types", name)
        if found:
            return found
        inferred = self.inferred.get(name)
        return inferred[0] if inferred else 0

    def partial_of(self, scope: Scope, name: str) -> Partial | None:
        found = scope.find("partials", name)
        if found is not None:
            return found
        const = scope.find("consts", name)
        if const is not None and const.loadable and const.size <= 64 and len(const.shape) <= 1 \
                and const.elem_type in _PARTIAL_ELEMS:
            return partial_from_array(const.array)
        return None

    def inputs(self, node: onnx.NodeProto, scope: Scope) -> Inputs:
        return Inputs(node, lambda n: self.shape_of(scope, n), lambda n: self.const_of(scope, n),
                      lambda n: self.partial_of(scope, n), lambda n: self.type_of(scope, n), self.opset)

    # ------------------------------------------------------------------ constants
    def _take_constant(self, node: onnx.NodeProto, scope: Scope) -> bool:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
            return False
        value = _constant_value(node)
        if value is None:
            return False
        name = node.output[0]
        if isinstance(value, onnx.TensorProto):
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value)
            tensor.name = name
            const = Const(proto=tensor, origin="constant")
        else:
            const = Const(array=value, origin="constant")
        if not const.loadable:
            return False
        self._add_const(scope, name, const)
        return True

    def _add_const(self, scope: Scope, name: str, const: Const) -> None:
        """Record a constant; a small one equal to a constant already known becomes an alias of it."""
        if self.settings.dedup and const.size * _itemsize(const.elem_type) <= 4096 and const.loadable:
            array = const.array
            key = (array.dtype.str, array.shape, array.tobytes())
            for s in scope.chain():
                existing = s.small_consts.get(key)
                if existing is not None and existing != name:
                    scope.alias[name] = existing
                    return
            scope.small_consts[key] = name
        scope.consts[name] = const

    def _record_outputs(self, node: onnx.NodeProto, scope: Scope) -> None:
        inputs = self.inputs(node, scope)
        partials = propagate(node, inputs, lambda: None)
        for name, part in zip(node.output, partials):
            if name and part is not None:
                scope.partials[name] = part
        shapes = infer(node, inputs, lambda k: partials[k] if k < len(partials) else None)
        for k, name in enumerate(node.output):
            if not name:
                continue
            mine = shapes[k] if k < len(shapes) else None
            inferred = self.inferred.get(name)
            scope.shapes[name] = _merge(name, mine, inferred[1] if inferred else None)
            scope.types[name] = self._output_type(node, k, inputs, inferred)

    def _output_type(self, node, k, inputs: Inputs, inferred) -> int:
        op = node.op_type
        if node.domain in ("", "ai.onnx"):
            if op == "Cast" and k == 0:
                return attribute(node, "to", 0)
            if op in ("Shape", "Size", "ArgMax", "ArgMin", "NonZero", "NonMaxSuppression"):
                return T.INT64
            if op in _COMPARE_OPS:
                return T.BOOL
            if op == "CastLike":
                return inputs.elem_type(1)
        if inferred and inferred[0]:
            return inferred[0]
        if node.domain in ("", "ai.onnx") and k == 0 and op in _SAME_TYPE_OPS and inputs.has(0):
            return inputs.elem_type(0)
        return 0

    # ------------------------------------------------------------------ folding
    def _fold(self, node: onnx.NodeProto, scope: Scope) -> bool:
        if node.domain not in ("", "ai.onnx") or not node.output or node.op_type in NONDETERMINISTIC:
            return False
        if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2]:
            return False  # training_mode given: it may draw random masks
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return False
        outputs = [n for n in node.output if n]
        # Shape computations whose values are all known (from static dims) fold without evaluating.
        parts = [scope.partials.get(n) for n in outputs]
        if parts and all(p is not None and p.known for p in parts):
            try:
                arrays = [p.array() for p in parts]
            except (ValueError, OverflowError, TypeError):
                arrays = None
            if arrays is not None:
                for name, array in zip(outputs, arrays):
                    self._add_const(scope, name, Const(array=array))
                self._folded(node)
                return True
        names = [n for n in node.input if n]
        if not names and node.op_type not in ("Range",):
            return False
        if not all(self.is_const(scope, n) for n in names):
            return False
        consts = [scope.find("consts", n) for n in names]
        input_bytes = sum(c.size * _itemsize(c.elem_type) for c in consts)
        if node.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "LSTM", "GRU", "RNN") and input_bytes > 1 << 24:
            return False  # heavy compute on large weights; leave it to the runtime
        values = [self.const_of(scope, n) if n else None for n in node.input]
        try:
            results = evaluate(node, values, self.opset, self.opsets, self.ir_version)
        except NotFoldable:
            return False
        out_bytes = sum(r.nbytes for r in results if r is not None)
        if out_bytes > input_bytes and (self.settings.fold_limit == "strict" or out_bytes > _SMALL or
                                        node.op_type in _DECOMPRESSING and max(c.size for c in consts) > 64):
            return False  # a model that stores small weights and widens them on load means to stay small
        for name, result in zip(node.output, results):
            if name and result is not None:
                self._add_const(scope, name, Const(array=np.array(result, copy=True, order="C")))
        self._folded(node)
        return True

    def _folded(self, node: onnx.NodeProto) -> None:
        self.changed = True
        self.stats.add("folded")

    # ------------------------------------------------------------------ If with a known condition
    def _inline_if(self, node: onnx.NodeProto, scope: Scope, work: deque) -> bool:
        if not (self.settings.fold_constants and self.settings.subgraphs):
            return False
        cond = self.const_of(scope, node.input[0]) if node.input else None
        if cond is None:
            part = self.partial_of(scope, node.input[0]) if node.input else None
            if part is None or not part.known or len(part.items) != 1:
                return False
            cond = np.array(part.items)
        if cond.size != 1:
            return False
        branch_name = "then_branch" if bool(cond.reshape(-1)[0]) else "else_branch"
        branch = next((a.g for a in node.attribute if a.name == branch_name), None)
        if branch is None or len(branch.output) != len(node.output):
            return False
        branch = _copy_graph(branch)
        self._rename_collisions(branch)
        for tensor in branch.initializer:
            self._add_const(scope, tensor.name, Const(proto=tensor, origin="initializer"))
        for out_name, value in zip(node.output, branch.output):
            if out_name:
                scope.alias[out_name] = value.name
        work.extendleft(reversed(list(branch.node)))
        self.changed = True
        self.stats.add("If inlined")
        return True

    def _rename_collisions(self, branch: onnx.GraphProto) -> None:
        local = [t.name for t in branch.initializer] + [o for n in branch.node for o in n.output if o]
        mapping = {}
        for name in local:
            if self.definitions[name] > 1:
                mapping[name] = unique_name(name, self.taken)
                self.definitions[mapping[name]] += 1
                self.definitions[name] -= 1
        if not mapping:
            return
        for tensor in branch.initializer:
            tensor.name = mapping.get(tensor.name, tensor.name)
        for value in branch.output:
            value.name = mapping.get(value.name, value.name)
        for node in branch.node:
            for i, name in enumerate(node.output):
                if name in mapping:
                    node.output[i] = mapping[name]
        _rename_uses(branch, mapping)

    # ------------------------------------------------------------------ ops that return their input
    def _alias(self, node: onnx.NodeProto, scope: Scope, source: str, why: str) -> bool:
        if node.output[0] in scope.outputs and not self._can_take_output_name(scope, source):
            return False  # it would come back as an Identity: leave the node
        scope.alias[node.output[0]] = source
        self.changed = True
        self.stats.add(why)
        return True

    def _can_take_output_name(self, scope: Scope, source: str) -> bool:
        """Whether a graph output aliased to `source` can be written without an Identity."""
        if source in scope.producer and source not in scope.outputs:
            return True
        const = scope.find("consts", source)
        return const is not None and const.loadable and const.size * _itemsize(const.elem_type) <= 1 << 16

    def _simplify(self, node: onnx.NodeProto, scope: Scope) -> bool:
        if node.domain not in ("", "ai.onnx") or not node.output or not node.output[0]:
            return False
        op = node.op_type
        outputs = [o for o in node.output if o]
        if not self.settings.remove_identity:
            return self._rewrite_shape_inputs(node, scope)
        x = node.input[0] if node.input else ""
        if op == "Identity" and x:
            return self._alias(node, scope, x, "Identity removed")
        if op == "Dropout" and x and len(outputs) == 1 and node.output[0]:
            training = node.input[2] if len(node.input) > 2 else ""
            if not training or (self.const_of(scope, training) is not None and not self.const_of(scope, training).any()):
                return self._alias(node, scope, x, "Dropout removed")
            return False
        if len(outputs) != 1 or not x:
            return self._rewrite_shape_inputs(node, scope)
        out = node.output[0]
        same_shape = _same_shape(self.shape_of(scope, x), self.shape_of(scope, out))
        if op == "Cast" and attribute(node, "to") == self.type_of(scope, x) != 0:
            return self._alias(node, scope, x, "Cast to the same type removed")
        if op == "Cast":
            return self._cast_round_trip(node, scope)
        if op in ("Reshape", "Squeeze", "Unsqueeze", "Flatten", "Expand") and same_shape:
            return self._alias(node, scope, x, f"{op} to the same shape removed")
        if op == "Transpose":
            return self._transpose(node, scope)
        if op == "Slice" and self._slice_is_whole(node, scope):
            return self._alias(node, scope, x, "Slice of everything removed")
        if op == "Slice":
            return self._merge_slices(node, scope)
        if op in ("Concat", "Max", "Min", "Sum", "Mean") and len([i for i in node.input if i]) == 1:
            return self._alias(node, scope, x, f"{op} of one input removed")
        if op in ("Split", "Tile", "Pad") and same_shape and self._pure_copy(node, scope):
            return self._alias(node, scope, x, f"{op} that copies removed")
        if op in ("Add", "Sub", "Mul", "Div", "Pow") and self._neutral_operand(node, scope):
            return True
        if op == "Where" and self._where_known(node, scope):
            return True
        if op in _REDUCE_OPS and same_shape and self._reduce_noop(node, scope):
            return self._alias(node, scope, x, f"{op} over no axes removed")
        if op in ("Not", "Neg") and self._double_negation(node, scope):
            return True
        return self._rewrite_shape_inputs(node, scope)

    def _cast_round_trip(self, node, scope) -> bool:
        # Cast(Cast(x, wider), type of x) is x when the first cast loses nothing.
        inner = scope.producer.get(node.input[0])
        if inner is None or inner.op_type != "Cast" or inner.domain not in ("", "ai.onnx"):
            return False
        source = self.type_of(scope, inner.input[0])
        middle = attribute(inner, "to")
        if attribute(node, "to") != source or (source, middle) not in _LOSSLESS_WIDENING:
            return False
        return self._alias(node, scope, inner.input[0], "Cast round trip removed")

    def _transpose(self, node, scope) -> bool:
        perm = attribute(node, "perm")
        if perm is None:
            return False
        perm = list(perm)
        if perm == list(range(len(perm))):
            return self._alias(node, scope, node.input[0], "Transpose with identity perm removed")
        inner = scope.producer.get(node.input[0])
        if inner is not None and inner.op_type == "Transpose" and inner.domain in ("", "ai.onnx"):
            inner_perm = attribute(inner, "perm")
            if inner_perm is not None and len(inner_perm) == len(perm):
                combined = [list(inner_perm)[p] for p in perm]
                if combined == list(range(len(combined))):
                    return self._alias(node, scope, inner.input[0], "Transpose pair removed")
                node.input[0] = inner.input[0]
                _set_ints(node, "perm", combined)
                self.changed = True
                self.stats.add("Transposes merged")
                return False
        return self._transpose_as_reshape(node, scope, perm)

    def _transpose_as_reshape(self, node, scope, perm: list) -> bool:
        # A Transpose that only moves size-1 axes keeps the memory order: it is a Reshape (free).
        dims = self.shape_of(scope, node.input[0])
        out_dims = self.shape_of(scope, node.output[0])
        if dims is None or out_dims is None or len(dims) != len(perm) or not self.settings.fold_constants:
            return False
        moved = [p for p in perm if dims[p] != 1]
        if moved != sorted(moved):
            return False
        target = _reshape_target(out_dims, dims, dims, copies=False, same_input=True)
        if target is None:
            return False
        self._make_reshape(node, scope, node.input[0], target)
        self.stats.add("Transpose of size-1 axes made a Reshape")
        return False

    def _merge_slices(self, node, scope) -> bool:
        """Slice(Slice(x)) over different axes -> one Slice."""
        inner = scope.producer.get(node.input[0])
        if inner is None or inner.op_type != "Slice" or inner.domain not in ("", "ai.onnx") or self.opset < 10:
            return False
        shape = self.shape_of(scope, inner.input[0])
        if shape is None:
            return False
        outer_params = _slice_params(self.inputs(node, scope), len(shape))
        inner_params = _slice_params(self.inputs(inner, scope), len(shape))
        if outer_params is None or inner_params is None:
            return False
        if set(outer_params[2]) & set(inner_params[2]) or len(set(outer_params[2])) != len(outer_params[2]):
            return False
        starts, ends, axes, steps = (list(a) + list(b) for a, b in zip(inner_params, outer_params))
        fields = [(starts, "_starts"), (ends, "_ends"), (axes, "_axes")] + ([(steps, "_steps")] if set(steps) != {1} else [])
        names = [self._new_const(scope, np.array(values, dtype=np.int64), node.output[0] + suffix)
                 for values, suffix in fields]
        del node.input[:]
        node.input.extend([inner.input[0]] + names)
        self.changed = True
        self.stats.add("Slices merged")
        return False

    def _slice_is_whole(self, node, scope) -> bool:
        shape = self.shape_of(scope, node.input[0])
        if shape is None:
            return False
        params = _slice_params(self.inputs(node, scope), len(shape))
        if params is None:
            return False
        for start, end, axis, step in zip(*params):
            if step != 1 or axis >= len(shape):
                return False
            dim = shape[axis]
            starts_at_zero = start == 0 or (isinstance(dim, int) and start <= -dim)
            to_end = end >= 2**62 or (isinstance(dim, int) and end >= dim)
            if not (starts_at_zero and to_end):
                return False
        return True

    def _pure_copy(self, node, scope) -> bool:
        op = node.op_type
        if op == "Pad":  # no padding copies the input whatever the mode
            pads = list(attribute(node, "pads")) if self.opset < 11 and attribute(node, "pads") is not None else (
                self.inputs(node, scope).ints(1))
            return pads is not None and not any(pads)
        if op == "Tile":
            repeats = self.inputs(node, scope).ints(1)
            return repeats is not None and all(r == 1 for r in repeats)
        if op == "Split":
            return len([o for o in node.output if o]) == 1 and len(node.output) == 1
        return False

    def _neutral_operand(self, node, scope) -> bool:
        """x+0, 0+x, x-0, x*1, 1*x, x/1, x^1: the output is x when the constant broadcasts nothing."""
        op = node.op_type
        if len(node.input) != 2:
            return False
        out_shape = self.shape_of(scope, node.output[0])
        candidates = [(0, 1)] if op in ("Sub", "Div", "Pow") else [(0, 1), (1, 0)]
        neutral = 0 if op in ("Add", "Sub") else 1
        for keep, other in candidates:
            value = self.const_of(scope, node.input[other])
            if value is None or value.size == 0 or value.dtype.kind not in "fiu":
                continue
            if value.size > 1 and not np.all(value == value.reshape(-1)[0]):
                continue
            if value.reshape(-1)[0] != neutral:
                continue
            kept = node.input[keep]
            if self.type_of(scope, kept) != onnx.helper.np_dtype_to_tensor_dtype(value.dtype):
                continue
            if not _same_shape(self.shape_of(scope, kept), out_shape):
                continue
            return self._alias(node, scope, kept, f"{op} by a neutral constant removed")
        return False

    def _where_known(self, node, scope) -> bool:
        cond = self.const_of(scope, node.input[0])
        if cond is None or cond.size == 0 or not (cond.all() or not cond.any()):
            return False
        chosen = node.input[1] if cond.all() else node.input[2]
        if not _same_shape(self.shape_of(scope, chosen), self.shape_of(scope, node.output[0])):
            return False
        return self._alias(node, scope, chosen, "Where with a constant condition removed")

    def _reduce_noop(self, node, scope) -> bool:
        if not attribute(node, "noop_with_empty_axes", 0):
            return False
        return len(node.input) < 2 or not node.input[1] or (
            self.const_of(scope, node.input[1]) is not None and self.const_of(scope, node.input[1]).size == 0)

    def _double_negation(self, node, scope) -> bool:
        inner = scope.producer.get(node.input[0])
        if inner is None or inner.op_type != node.op_type or inner.domain not in ("", "ai.onnx"):
            return False
        return self._alias(node, scope, inner.input[0], f"{node.op_type} pair removed")

    # ------------------------------------------------------------------ shape inputs made constant
    def _rewrite_shape_inputs(self, node, scope) -> bool:
        op = node.op_type
        if not self.settings.fold_constants:
            return False
        if op in _RESHAPE_LIKE and len([o for o in node.output if o]) == 1:
            return self._reshape_from_dims(node, scope)
        if op == "Expand" and len(node.input) == 2 and not self.is_const(scope, node.input[1]):
            return self._expand_from_dims(node, scope)
        return False

    def _reshape_from_dims(self, node, scope) -> bool:
        """Give a Reshape a constant target (sizes known as ints stay ints, a size equal to the input's
        at the same axis becomes 0, "copy"), or merge a chain of reshaping ops into one Reshape of the
        chain's input."""
        out_dims = self.shape_of(scope, node.output[0])
        if out_dims is None:
            return False
        x = node.input[0]
        x_dims = self.shape_of(scope, x)
        copies = node.op_type == "Reshape" and not attribute(node, "allowzero", 0)
        items = None
        if node.op_type == "Reshape" and len(node.input) > 1:
            part = self.partial_of(scope, node.input[1])
            if part is not None and part.rank == 1 and len(part.items) == len(out_dims):
                items = part.items
        if items is None:
            items, copies = out_dims, False
        candidates = []
        inner = scope.producer.get(x)
        if inner is not None and inner.op_type in _RESHAPE_LIKE and inner.domain in ("", "ai.onnx") \
                and len(inner.output) == 1 and inner.input and inner.input[0]:
            candidates.append(inner.input[0])
        if node.op_type == "Reshape" and len(node.input) > 1 and not self.is_const(scope, node.input[1]):
            candidates.append(x)
        for candidate in candidates:
            src_dims = self.shape_of(scope, candidate)
            if candidate != x and _same_shape(src_dims, out_dims) and self.type_of(scope, candidate) == self.type_of(scope, x):
                return self._alias(node, scope, candidate, "reshape chain that restores its input removed")
            target = _reshape_target(items, x_dims, src_dims, copies, same_input=candidate == x)
            if target is None:
                continue
            self._make_reshape(node, scope, candidate, target)
            self.stats.add("Reshape target made constant" if candidate == x else "reshape chain merged")
            return False
        return False

    def _make_reshape(self, node, scope, data: str, target: list) -> None:
        name = self._new_const(scope, np.array(target, dtype=np.int64), node.output[0] + "_shape")
        node.op_type = "Reshape"
        del node.attribute[:]
        del node.input[:]
        node.input.extend([data, name])
        self.changed = True

    def _expand_from_dims(self, node, scope) -> bool:
        x_dims, out_dims = self.shape_of(scope, node.input[0]), self.shape_of(scope, node.output[0])
        target = self.partial_of(scope, node.input[1])
        if x_dims is None or out_dims is None or target is None or target.rank != 1:
            return False
        offset = len(target.items) - len(x_dims)
        values = []
        for j, item in enumerate(target.items):
            if isinstance(item, int) and not isinstance(item, bool):
                values.append(item)
                continue
            k = j - offset
            if isinstance(item, Sym) and k >= 0 and x_dims[k] == item:
                values.append(1)  # Expand keeps the input's size where the target says 1
            else:
                return False
        name = self._new_const(scope, np.array(values, dtype=np.int64), node.output[0] + "_shape")
        node.input[1] = name
        self.changed = True
        self.stats.add("Expand target made constant")
        return False

    def _new_const(self, scope: Scope, array: np.ndarray, base: str) -> str:
        name = unique_name(base, self.taken)
        self.definitions[name] += 1
        self._add_const(scope, name, Const(array=array))
        return scope.resolve(name)

    # ------------------------------------------------------------------ duplicate nodes
    def _merge_duplicate(self, node, scope) -> bool:
        if node.op_type in NONDETERMINISTIC or node.op_type == "Dropout" or not node.input or any(
                a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return False
        key = (node.domain, node.op_type, tuple(node.input), len(node.output),
               tuple(sorted((a.name, a.SerializeToString(deterministic=True)) for a in node.attribute)))
        if any(o in scope.outputs for o in node.output):
            return False
        for s in scope.chain():
            outputs = s.cse.get(key)
            if outputs is not None:
                if any(mine and not theirs for mine, theirs in zip(node.output, outputs)):
                    return False
                for mine, theirs in zip(node.output, outputs):
                    if mine:
                        scope.alias[mine] = theirs
                self.changed = True
                self.stats.add("duplicate node merged")
                return True
        scope.cse[key] = list(node.output)
        return False

    # ------------------------------------------------------------------ graph outputs, dead nodes
    def _finish_outputs(self, graph, kept, scope: Scope, main: bool) -> list:
        """Make every graph output name a value again after its producer was aliased away: rename the
        producer (subgraph outputs match by position, so there the output entry takes the name),
        or write a Constant, or, failing both, an Identity."""
        local_producers = {name: node for node in kept for name in node.output if name}
        claimed = {o.name for o in graph.output if scope.resolve(o.name) == o.name and o.name in local_producers}
        renamed: dict[str, str] = {}
        extra_front, extra_back = [], []
        for value in graph.output:
            target = scope.resolve(value.name)
            target = renamed.get(target, target)
            if target == value.name:
                continue  # produced here, a constant of this graph, an input, or as the original had it
            const = scope.find("consts", target)
            if const is not None and const.loadable and const.size * _itemsize(const.elem_type) <= 1 << 16:
                extra_front.append(_constant_node(value.name, numpy_helper.from_array(const.array)))
                continue
            producer = local_producers.get(target)
            if producer is not None and target not in claimed:
                claimed.add(target)
                if not main:
                    value.name = target
                    continue
                mapping = {target: value.name}
                for i, name in enumerate(producer.output):
                    if name == target:
                        producer.output[i] = value.name
                for node in kept:
                    for i, name in enumerate(node.input):
                        if name == target:
                            node.input[i] = value.name
                    for sub in subgraphs(node):
                        _rename_uses(sub, mapping)
                renamed[target] = value.name
                local_producers[value.name] = producer
                claimed.add(value.name)
                continue
            extra_back.append(self._identity(target, value.name))
        return extra_front + kept + extra_back

    def _identity(self, source: str, target: str) -> onnx.NodeProto:
        return onnx.helper.make_node("Identity", [source], [target], name=unique_name(target + "_identity", self.taken))

    def _remove_dead(self, graph, kept: list) -> list:
        live = {o.name for o in graph.output}
        survivors = []
        for node in reversed(kept):
            outputs = [o for o in node.output if o]
            if outputs and not any(o in live for o in outputs):
                self.changed = True
                self.stats.add("dead node removed")
                continue
            if node.op_type == "If" and node.domain in ("", "ai.onnx"):
                self._prune_if_outputs(node, live)
            survivors.append(node)
            live.update(i for i in node.input if i)
            for sub in subgraphs(node):
                live |= outer_scope_names(sub)
        survivors.reverse()
        return survivors

    def _prune_if_outputs(self, node, live: set) -> None:
        unused = [k for k, name in enumerate(node.output) if name and name not in live]
        if not unused or len(unused) == len([o for o in node.output if o]):
            return
        branches = [a.g for a in node.attribute if a.name in ("then_branch", "else_branch")]
        if len(branches) != 2 or any(len(b.output) != len(node.output) for b in branches):
            return
        for k in reversed(unused):
            del node.output[k]
            for branch in branches:
                del branch.output[k]
        self.changed = True
        self.stats.add("unused If output removed", len(unused))

    # ------------------------------------------------------------------ writing the graph back
    def _write_back(self, graph, kept: list, scope: Scope, main: bool) -> None:
        used: set[str] = set()
        for node in kept:
            used.update(i for i in node.input if i)
            for sub in subgraphs(node):
                used |= outer_scope_names(sub)
        produced = {o for node in kept for o in node.output if o}
        used.update(o.name for o in graph.output if o.name not in produced)
        overridable = {i.name for i in graph.input}
        initializers, constant_nodes = [], []
        for name, const in scope.consts.items():
            if name not in used or name in produced or scope.resolve(name) != name:
                continue
            if const.proto is not None and const.proto.name == name:
                tensor = const.proto
            else:
                tensor = numpy_helper.from_array(const.array, name)
            if (main and self.ir_version >= 4) or (not main and const.origin == "initializer"):
                initializers.append(tensor)
            else:
                constant_nodes.append(_constant_node(name, tensor))
        self._set_initializers(graph, initializers, overridable)
        del graph.node[:]
        graph.node.extend(constant_nodes + kept)

    @staticmethod
    def _set_initializers(graph, wanted: list, overridable: set) -> None:
        """Make graph.initializer hold the overridable ones plus `wanted`, keeping the original order and
        not copying tensors that stay (copying a large model's weights is most of a sweep's time)."""
        wanted_names = {t.name for t in wanted}
        current = list(graph.initializer)
        drop = [k for k, t in enumerate(current) if t.name not in wanted_names and t.name not in overridable]
        for k in reversed(drop):
            del graph.initializer[k]
        present = {t.name for t in graph.initializer}
        graph.initializer.extend(t for t in wanted if t.name not in present)

    # ------------------------------------------------------------------ identical initializers
    def _dedup_initializers(self, graph) -> None:
        pinned = {i.name for i in graph.input} | {o.name for o in graph.output}
        # Only tensors that agree in type, dims and stored size can be equal: hash just those.
        groups: dict[tuple, list] = {}
        for tensor in graph.initializer:
            if tensor.name in pinned or tensor.data_location == T.EXTERNAL:
                continue
            groups.setdefault((tensor.data_type, tuple(tensor.dims)), []).append(tensor)
        mapping = {}
        for group in groups.values():
            if len(group) < 2:
                continue
            seen: dict[bytes, str] = {}
            for tensor in group:
                if tensor.HasField("raw_data"):
                    digest = b"raw" + hashlib.sha256(tensor.raw_data).digest()
                else:
                    copy = onnx.TensorProto()
                    copy.CopyFrom(tensor)
                    copy.ClearField("name")
                    copy.ClearField("doc_string")
                    digest = hashlib.sha256(copy.SerializeToString(deterministic=True)).digest()
                if digest in seen:
                    mapping[tensor.name] = seen[digest]
                else:
                    seen[digest] = tensor.name
        if not mapping:
            return
        for k in reversed([k for k, t in enumerate(graph.initializer) if t.name in mapping]):
            del graph.initializer[k]  # in place: rebuilding the list would copy every weight
        for g in walk_graphs(graph):
            for node in g.node:
                for i, name in enumerate(node.input):
                    if name in mapping:
                        node.input[i] = mapping[name]
        self.changed = True
        self.stats.add("duplicate initializer stored once", len(mapping))


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
_PARTIAL_ELEMS = {T.INT64, T.INT32, T.INT16, T.INT8, T.UINT64, T.UINT32, T.UINT16, T.UINT8, T.BOOL}
_REDUCE_OPS = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
               "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}
_SAME_TYPE_OPS = {"Relu", "Sigmoid", "Tanh", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Floor", "Ceil",
                  "Round", "Erf", "Sin", "Cos", "Identity", "Dropout", "Softmax", "LogSoftmax", "Clip", "Add", "Sub",
                  "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Reshape", "Squeeze", "Unsqueeze", "Flatten",
                  "Transpose", "Concat", "Split", "Slice", "Gather", "Expand", "Tile", "Pad", "MatMul", "Gemm",
                  "Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                  "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "LayerNormalization",
                  "BatchNormalization", "InstanceNormalization", "LeakyRelu", "HardSigmoid", "HardSwish", "PRelu",
                  "Where", "Resize", "Upsample", "CumSum", "TopK", "GatherElements", "GatherND", "ScatterND",
                  "ScatterElements", "DepthToSpace", "SpaceToDepth", "Softplus", "Elu", "Selu", "Gelu", "Mod"}
_LOSSLESS_WIDENING = {(T.INT8, T.INT16), (T.INT8, T.INT32), (T.INT8, T.INT64), (T.INT16, T.INT32),
                      (T.INT16, T.INT64), (T.INT32, T.INT64), (T.UINT8, T.INT16), (T.UINT8, T.INT32),
                      (T.UINT8, T.INT64), (T.UINT8, T.UINT16), (T.UINT8, T.UINT32), (T.UINT8, T.UINT64),
                      (T.UINT16, T.INT32), (T.UINT16, T.INT64), (T.UINT32, T.INT64), (T.FLOAT16, T.FLOAT),
                      (T.FLOAT16, T.DOUBLE), (T.FLOAT, T.DOUBLE), (T.BOOL, T.INT32), (T.BOOL, T.INT64),
                      (T.BOOL, T.UINT8), (T.BOOL, T.INT8)}


def _itemsize(elem_type: int) -> int:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return 8


def _from_inferred(name: str, dims) -> tuple:
    return tuple(d if d is not None else fresh(name, axis) for axis, d in enumerate(dims))


def _merge(name: str, mine, inferred):
    """Combine a rule's dims with onnx's: onnx's integer fills in an unknown; disagreement -> unknown."""
    if inferred is None:
        return mine
    if mine is None:
        return _from_inferred(name, inferred)
    if len(mine) != len(inferred):
        return mine
    out = []
    for axis, (m, t) in enumerate(zip(mine, inferred)):
        if t is None:
            out.append(m)
        elif isinstance(m, int):
            out.append(m if m == t else fresh(name, axis))
        else:
            out.append(t)
    return tuple(out)


def _same_shape(a, b) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(x == y for x, y in zip(a, b))


def _reshape_target(items, x_dims, src_dims, copies: bool, same_input: bool) -> list | None:
    """A constant Reshape target that gives a tensor of `src_dims` the sizes `items` describe, or None.

    `items` are the wanted sizes: ints, symbols, None (unknown) and, when `copies`, 0 for "the size of
    x at this axis" and -1 for "whatever is left" (x has `x_dims`; `same_input` when src is x)."""
    if src_dims is None:
        return None
    target, unresolved = [], []
    for j, item in enumerate(items):
        if isinstance(item, Sym):
            if j < len(src_dims) and src_dims[j] == item:
                target.append(0)
            else:
                unresolved.append(j)
                target.append(None)
            continue
        if item is None or isinstance(item, bool):
            unresolved.append(j)
            target.append(None)
            continue
        item = int(item)
        if item == 0:
            if not copies:
                return None  # a literal 0 would mean "copy" without allowzero
            if same_input:
                target.append(0)
                continue
            size = x_dims[j] if x_dims is not None and j < len(x_dims) else None
            if isinstance(size, int) and size > 0:
                target.append(size)
            elif size is not None and j < len(src_dims) and src_dims[j] == size:
                target.append(0)
            else:
                unresolved.append(j)
                target.append(None)
        elif item == -1 and copies:
            target.append(-1)
        elif item > 0:
            target.append(item)
        else:
            return None
    if not unresolved:
        return target
    if len(unresolved) > 1 or -1 in target:
        return None
    if not all(isinstance(v, int) and v > 0 for k, v in enumerate(target) if k != unresolved[0]):
        return None  # a new -1 is only as safe as the other sizes are non-zero
    target[unresolved[0]] = -1
    return target


def _set_ints(node: onnx.NodeProto, name: str, values: list) -> None:
    for attr in node.attribute:
        if attr.name == name:
            del attr.ints[:]
            attr.ints.extend(values)
            return
    node.attribute.append(onnx.helper.make_attribute(name, values))


def _constant_node(name: str, tensor: onnx.TensorProto) -> onnx.NodeProto:
    """A Constant node for `name`; no node name and no tensor name (both optional) to keep files small."""
    value = onnx.TensorProto()
    value.CopyFrom(tensor)
    value.ClearField("name")
    return onnx.helper.make_node("Constant", [], [name], value=value)


def _constant_value(node: onnx.NodeProto):
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return attr.t
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


def _copy_graph(graph: onnx.GraphProto) -> onnx.GraphProto:
    copy = onnx.GraphProto()
    copy.CopyFrom(graph)
    return copy


def _rename_uses(graph: onnx.GraphProto, mapping: dict) -> None:
    """Rename reads of names in `mapping` in `graph` and its subgraphs (names are SSA: no shadowing)."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        for sub in subgraphs(node):
            _rename_uses(sub, mapping)
    for value in graph.output:
        if value.name in mapping and value.name not in {o for n in graph.node for o in n.output}:
            value.name = mapping[value.name]


def _resolve_outer(graph: onnx.GraphProto, scope: Scope) -> None:
    """Apply the enclosing graphs' renames to a subgraph that is not otherwise processed."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name:
                node.input[i] = scope.resolve(name)
        for sub in subgraphs(node):
            _resolve_outer(sub, scope)


def _all_names(model: onnx.ModelProto) -> set:
    names: set = set()
    for g in walk_graphs(model.graph):
        names.update(i.name for i in g.input)
        names.update(o.name for o in g.output)
        names.update(t.name for t in g.initializer)
        for node in g.node:
            names.update(node.output)
            names.update(node.input)
            names.add(node.name)
    return names


def _definition_counts(model: onnx.ModelProto) -> Counter:
    counts: Counter = Counter()
    for g in walk_graphs(model.graph):
        counts.update(i.name for i in g.input)
        counts.update(t.name for t in g.initializer)
        for node in g.node:
            counts.update(o for o in node.output if o)
    return counts


def simplify(model: onnx.ModelProto, settings: Settings, max_rounds: int = 12) -> Stats:
    """Rewrite `model` in place until a sweep changes nothing (or `max_rounds`)."""
    stats = Stats()
    for round_index in range(max_rounds):
        if not Rewriter(model, settings, stats).run(dedup_initializers=round_index == 0):
            break
    return stats
