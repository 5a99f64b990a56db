"""`cluster` and `pq`: weight sharing, Deep Compression's second stage (Han et al. 2016).

* `cluster(bits=b)` replaces each large weight's values by the nearest of 2^b shared values, found
  by 1-D k-means (`scope=tensor`: one codebook per weight; `scope=channel`: one per output
  channel). Exact zeros, where a weight has many (a pruned one), keep a code of their own that
  stays 0.0, so pruning survives clustering. `init=linear` spreads the first centroids evenly
  between the smallest and largest weight (the paper found it best: the rare large weights
  matter most and density-based starts miss them); `kmeans++` draws them from the data.
* `method=gptq` assigns the codes of MatMul/Gemm/Conv weights GPTQ-style: one input row at a time,
  each rounding error spread over the rows not yet assigned through the layer-input Hessian, so
  the layer's outputs on calibration data move less than nearest-value codes make them. A Conv
  (group 1, 2-D) is a MatMul over its input patches (activations.conv_patch_rows); its Hessian is
  their Gram matrix; a depthwise Conv has one per channel. At 6 bits, one codebook per weight:
  YOLOv8n's class-score cosine 0.942 with nearest values, 0.990 with GPTQ; PP-OCRv4 det's text-mask
  IoU 0.647, 0.953 (measured). The default, `method=auto`, takes gptq whenever the pipeline has real
  calibration data and nearest values otherwise (synthesized inputs say nothing about what matters).
* `refit=r` (gptq, MatMul/Gemm/Conv of group 1): k-means fits the values to the weights, GPTQ then
  picks codes for the outputs; the values are refit by least squares to the layer's outputs for
  those codes, and the codes assigned again, r times, with a last refit. MiniLM at 4 bits per
  channel: embedding cosine 0.9860 -> 0.9869; PP-OCRv4 det at 6 bits: text-mask IoU 0.953 -> 0.958;
  YOLOv8n at 6 bits: class-score cosine 0.990 either way, 10.8 s -> 29.4 s (so not the default).
* `scope=channel,group=g`: one codebook per g consecutive weights of a channel (for a MatMul, g of
  a column's inputs), stored as float16, 2^bits * 16 / g bits per weight more. MiniLM at 4 bits with
  refit=1 and g=128: embedding cosine 0.9903 at 0.192x the file (one codebook per channel: 0.9869 at
  0.167x).
* `pq(subvector=d, centroids=k)`: product quantization. Each weight row (the weights one output
  reads: a Conv filter, a MatMul column, an embedding row) is cut into pieces of d consecutive
  values; the pieces at one position across all rows share a codebook of k vectors, and a row
  stores one byte per piece.

Storage runs in stock onnxruntime: the codes are stored bit-packed (pack_codes' LSB-first layout)
in a uint8 initializer and turned back into the weight, under its own name, by Reshape, Gather,
Div, Mod, Cast and Add nodes placed before the graph's nodes. All of them read only constants,
so onnxruntime folds them once when the session starts: the file shrinks to about bits/32 of the
weights and the session runs the float model it rebuilds. Weights that are graph inputs, not
float32, or smaller than `min_elements` stay as they are. Targets are the weights of MatMul, Gemm,
Conv and ConvTranspose and the tables of Gather (embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.activations import conv_input_grams, main_graph_tensors, patch_kind
from onnxshrink.errors import OnnxShrinkError, UsageError
from onnxshrink.graph import all_names, attribute, constants_to_initializers, opset_version, unique_name
from onnxshrink.options import PassOptions, option
from onnxshrink.packing import pack_codes
from onnxshrink.pass_base import Note, Pass, PassContext, PassOutput
from onnxshrink.registry import register_pass

# (op type, input position of the weight, axis of its output channels / rows)
_WEIGHT_INPUTS = {"MatMul": (1, -1), "Gemm": (1, None), "Conv": (1, 0), "ConvTranspose": (1, 1), "Gather": (0, 0)}
_MIN_OPSET = 11  # Gather/Reshape/Slice/Mod with the inputs the decoder uses
_FIT_SAMPLE = 200_000  # k-means fits on at most this many weights, then assigns them all
_ZERO_SHARE = 0.01  # a weight with at least this share of exact zeros keeps a code for 0.0
_ONEHOT_ELEMENTS = 2**22  # codebook refits build their one-hot code matrices in chunks of this size (32 MB)


@register_pass("cluster")
class Cluster(Pass):
    summary = "Share weights: k-means codebooks of 2^bits values, codes stored bit-packed (runs in stock ORT)."
    # Class-wide: method=gptq reads calibration data; an instance says what its own options need.
    needs_data = True

    @dataclass(frozen=True)
    class Options(PassOptions):
        bits: int = option(4, "code width: 2^bits shared values per codebook", low=2, high=8)
        scope: str = option("tensor", "one codebook per weight, or per output channel", choices=("tensor", "channel"))
        group: int = option(0, "scope=channel: one codebook per `group` consecutive weights of a channel (the inputs "
                               "of a MatMul column, a Conv filter's values), stored as float16; 0: one per channel",
                            low=0)
        init: str = option("linear", "first centroids: evenly spaced over the range, or k-means++ draws",
                           choices=("linear", "kmeans++"))
        iterations: int = option(30, "Lloyd iterations of k-means", low=1)
        method: str = option("auto", "kmeans: each weight takes its nearest value; gptq: MatMul/Gemm/Conv (group 1 "
                                     "or depthwise) rows take theirs in turn, each rounding error compensated on "
                                     "the rows left (GPTQ, from calibration Hessians); auto: gptq where the "
                                     "pipeline has real calibration data (--calib), else kmeans",
                             choices=("auto", "kmeans", "gptq"))
        max_samples: int = option(128, "gptq: calibration samples for the layer-input Hessians", low=1)
        refit: int = option(0, "gptq (MatMul/Gemm, Conv of group 1): rounds of refitting the codebook values to the "
                               "layer's outputs for the codes assigned, then assigning the codes again; a last refit "
                               "follows (0: the k-means values)", low=0)
        # Lower than svd's: the first decoder costs about 2 kB, later ones share its constants, and
        # 1,024 weights at 4 bits save 3.5 kB.
        min_elements: int = option(1024, "smaller weights are left as they are", low=1)
        exclude: tuple[str, ...] = option((), "op types or node names whose weights are left as they are")

        def __post_init__(self):
            super().__post_init__()
            if self.group and self.scope != "channel":
                raise UsageError("group= needs scope=channel")
            if self.group and self.group < 4 * 2 ** self.bits:
                raise UsageError(f"group={self.group} is too small for {2 ** self.bits} shared values "
                                 f"(at least {4 * 2 ** self.bits})")

    def __init__(self, options: PassOptions | None = None, **values):
        super().__init__(options, **values)
        self.needs_data = self.options.method == "gptq"

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassOutput:
        opts = self.options
        hessians: dict[str, np.ndarray] = {}
        notes: list[Note] = []
        method = opts.method
        if method == "auto":
            # Synthesized inputs say nothing about which outputs matter: nearest values then.
            method = "gptq" if context.data is not None and context.data_is_real else "kmeans"
            if method == "gptq":
                notes.append(Note("(graph)", "method=auto: GPTQ assignment, from the real calibration data given"))
        if method == "gptq":
            if context.data is None:
                raise OnnxShrinkError("cluster(method=gptq) needs calibration data (--calib)")
            constants_to_initializers(model.graph)
            hessians = _input_hessians(model, opts, context)
        result = _share(model, opts, lambda weight, axis, name: _cluster(weight, axis, opts, hessians.get(name)),
                        "cluster")
        return PassOutput(result.model, result.notes + notes)


@register_pass("pq")
class ProductQuantize(Pass):
    summary = "Product quantization of weight rows: pieces of `subvector` values share k-vector codebooks."

    @dataclass(frozen=True)
    class Options(PassOptions):
        subvector: int = option(4, "values per piece of a row", low=1)
        centroids: int = option(256, "codebook vectors per piece position (codes are bytes)", low=2, high=256)
        iterations: int = option(20, "Lloyd iterations of k-means", low=1)
        min_elements: int = option(4096, "smaller weights are left as they are", low=1)
        exclude: tuple[str, ...] = option((), "op types or node names whose weights are left as they are")

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassOutput:
        opts = self.options
        return _share(model, opts, lambda weight, axis, name: _product_quantize(weight, axis, opts), "pq")


# --------------------------------------------------------------------------
# Graph side: which weights, and the decoder that rebuilds each one
# --------------------------------------------------------------------------
def _share(model: onnx.ModelProto, opts, encode, name: str) -> PassOutput:
    version = opset_version(model)
    if version is None or version < _MIN_OPSET:
        return PassOutput(model, [Note("(graph)", f"left as is: opset {version} < {_MIN_OPSET}; the decoder needs "
                                                  f"opset {_MIN_OPSET} (convert the model first)")])
    constants_to_initializers(model.graph)
    targets, notes = _targets(model, opts)
    if not targets:
        return PassOutput(model, notes + [Note("(graph)", f"no weight of at least {opts.min_elements} elements to {name}")])
    taken = all_names(model)
    shared: dict = {}  # decoder constants that are the same for every weight (byte offsets, shifts)
    decoders, replaced = [], set()
    for tensor_name, (axis, where) in targets.items():
        tensor = next(t for t in model.graph.initializer if t.name == tensor_name)
        weight = numpy_helper.to_array(tensor)
        encoded = encode(weight, axis, tensor_name)
        if isinstance(encoded, str):
            notes.append(Note(where, f"left as is: {encoded}"))
            continue
        nodes, inits, message = encoded.decoder(tensor_name, weight.shape, taken, shared)
        decoders += nodes
        model.graph.initializer.extend(inits)
        replaced.add(tensor_name)
        notes.append(Note(where, message))
    if not replaced:
        return PassOutput(model, notes)
    kept = [t for t in model.graph.initializer if t.name not in replaced]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    nodes = decoders + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return PassOutput(model, notes)


def _targets(model: onnx.ModelProto, opts) -> tuple[dict[str, tuple[int, str]], list[Note]]:
    """weight name -> (axis of its output channels or rows, where to note it)."""
    weights = {t.name: t for t in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input}
    axes: dict[str, set] = {}
    wheres: dict[str, str] = {}
    notes = []
    for node in model.graph.node:
        spec = _WEIGHT_INPUTS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if spec is None or len(node.input) <= spec[0]:
            continue
        name = node.input[spec[0]]
        tensor = weights.get(name)
        if tensor is None or name in graph_inputs or tensor.data_type != TensorProto.FLOAT:
            continue
        if int(np.prod(tensor.dims)) < opts.min_elements or len(tensor.dims) < 2:
            continue
        where = node.name or node.output[0]
        if node.op_type in opts.exclude or node.name in opts.exclude:
            notes.append(Note(where, "left as is: excluded"))
            axes.setdefault(name, set()).add("excluded")
            continue
        axis = spec[1]
        if node.op_type == "Gemm":
            axis = 0 if attribute(node, "transB", 0) else 1
        if node.op_type == "Gather" and attribute(node, "axis", 0) != 0:
            axis = None  # rows along another axis: share per tensor only
        axes.setdefault(name, set()).add(axis % len(tensor.dims) if axis is not None else None)
        wheres.setdefault(name, where)
    targets = {}
    for name, found in axes.items():
        if "excluded" in found:
            continue
        # A weight read by several nodes is rebuilt once, under its name, for all of them; its rows
        # must mean the same to each (else: one codebook for the whole tensor).
        targets[name] = (found.pop() if len(found) == 1 else None, wheres[name])
    return targets, notes


class _Encoded:
    """Codes, codebook and how to rebuild the weight from them in the graph."""

    def __init__(self, codes: np.ndarray, bits: int, codebook: np.ndarray, axis: int | None, about: str,
                 rows_first: bool = False):
        self.codes, self.bits, self.codebook, self.axis, self.about = codes, bits, codebook, axis, about
        self.rows_first = rows_first  # pq: the codebook holds pieces (vectors), gathered into rows

    def decoder(self, name: str, shape: tuple, taken: set, shared: dict) -> tuple[list, list, str]:
        def fresh(suffix):
            new = unique_name(f"{name}__{suffix}", taken)
            taken.add(new)
            return new

        nodes, inits = [], []

        def const(suffix, array):
            array = np.asarray(array)
            if array.size <= 16:  # small constants are common to many weights: store each once
                key = (array.dtype.str, array.shape, array.tobytes())
                if key not in shared:
                    shared[key] = unique_name(f"weight_sharing__{suffix}", taken)
                    taken.add(shared[key])
                    inits.append(numpy_helper.from_array(array, shared[key]))
                return shared[key]
            tensor = numpy_helper.from_array(array, fresh(suffix))
            inits.append(tensor)
            return tensor.name

        def node(op, inputs, suffix, **attrs):
            out = fresh(suffix)
            nodes.append(helper.make_node(op, inputs, [out], name=fresh(f"{suffix}_node"), **attrs))
            return out

        count = self.codes.size
        padded = np.zeros(-(-count // 8) * 8, np.uint8)
        padded[:count] = self.codes.reshape(-1)
        packed = pack_codes(padded, self.bits)  # 8 codes fill exactly `bits` bytes
        flat = self._unpack(const("codes", packed.reshape(-1, self.bits) if self.bits < 8 else packed), count,
                            const, node)
        if self.rows_first:  # pq: codes [rows, pieces] -> rows of pieces
            rows, pieces = self.codes.shape
            offsets = const("offsets", (np.arange(pieces, dtype=np.int32) * self.codebook.shape[1])[None, :])
            index = node("Add", [node("Reshape", [flat, const("code_shape", np.array([rows, pieces], np.int64))],
                                      "code_grid"), offsets], "index")
            table = const("codebook", self.codebook.reshape(-1, self.codebook.shape[-1]).astype(np.float32))
            moved = node("Reshape", [node("Gather", [table, index], "pieces"),
                                     const("row_shape", np.array(self._moved_shape(shape), np.int64))], "rows")
        else:
            if self.codebook.ndim == 2:  # one codebook per channel: offset each channel's codes
                channels, size = self.codebook.shape
                grid = node("Reshape", [flat, const("code_shape", np.array([channels, -1], np.int64))], "code_grid")
                flat = node("Add", [grid, const("offsets", (np.arange(channels, dtype=np.int32) * size)[:, None])],
                            "index")
            elif self.codebook.ndim == 3:  # per channel and group: offsets of both, added in turn
                channels, groups, size = self.codebook.shape
                grid = node("Reshape", [flat, const("code_shape", np.array([channels, groups, -1], np.int64))],
                            "code_grid")
                by_group = node("Add", [grid, const("group_offsets", (np.arange(groups, dtype=np.int32)
                                                                      * size)[None, :, None])], "group_index")
                flat = node("Add", [by_group, const("offsets", (np.arange(channels, dtype=np.int32)
                                                                * groups * size)[:, None, None])], "index")
            stored = np.float16 if self.codebook.dtype == np.float16 else np.float32
            values = node("Gather", [const("codebook", self.codebook.reshape(-1).astype(stored)), flat], "values")
            if stored is np.float16:
                values = node("Cast", [values], "widened", to=TensorProto.FLOAT)
            moved = node("Reshape", [values, const("moved_shape", np.array(self._moved_shape(shape), np.int64))],
                         "moved")
        if self.axis not in (None, 0):
            perm = self._perm(len(shape))
            nodes.append(helper.make_node("Transpose", [moved], [name], name=fresh("restore_node"),
                                          perm=list(np.argsort(perm))))
        else:
            nodes.append(helper.make_node("Identity", [moved], [name], name=fresh("restore_node")))
        return nodes, inits, self.about

    def _perm(self, rank: int) -> list[int]:
        return [self.axis] + [d for d in range(rank) if d != self.axis]

    def _moved_shape(self, shape: tuple) -> list[int]:
        return [shape[d] for d in self._perm(len(shape))] if self.axis not in (None, 0) else list(shape)

    def _unpack(self, packed: str, count: int, const, node) -> str:
        """int32 codes [count] from the packed bytes, with stock integer ops (LSB-first layout)."""
        if self.bits == 8:
            wide = node("Cast", [packed], "wide", to=TensorProto.INT32)
        else:
            positions = np.arange(8) * self.bits
            low = np.minimum(positions // 8, self.bits - 1)
            # Past the group's last byte a code fits its low byte: any high byte is shifted off.
            high = np.minimum(positions // 8 + 1, self.bits - 1)
            grid = node("Cast", [packed], "wide", to=TensorProto.INT32)
            low_bytes = node("Gather", [grid, const("low", low.astype(np.int64))], "low_bytes", axis=1)
            high_bytes = node("Gather", [grid, const("high", high.astype(np.int64))], "high_bytes", axis=1)
            word = node("Add", [low_bytes, node("Mul", [high_bytes, const("byte", np.array(256, np.int32))],
                                                "shifted")], "word")
            shifted = node("Div", [word, const("shift", (2 ** (positions % 8)).astype(np.int32))], "aligned")
            wide = node("Mod", [shifted, const("mask", np.array(2 ** self.bits, np.int32))], "code")
        flat = node("Reshape", [wide, const("flat", np.array([-1], np.int64))], "flat")
        return node("Slice", [flat, const("start", np.array([0], np.int64)), const("stop", np.array([count], np.int64))],
                    "codes_int")


def decoder_of(model: onnx.ModelProto, name: str) -> tuple[list[onnx.NodeProto], onnx.TensorProto] | None:
    """The nodes that rebuild weight `name` from `cluster`'s codes (graph order) and its codebook;
    None for any other tensor."""
    producers = {out: node for node in model.graph.node for out in node.output}
    constants = {t.name: t for t in model.graph.initializer}
    decoder, pending = [], [name]
    while pending:
        tensor = pending.pop()
        node = producers.get(tensor)
        if node is None:
            if tensor in constants or not tensor:
                continue
            return None  # computed from the model's inputs: not a decoder
        if all(node is not seen for seen in decoder):
            decoder.append(node)
            pending.extend(node.input)
        if len(decoder) > 18:  # decoders have 16 nodes at most
            return None
    tables = [n.input[0] for n in decoder if n.op_type == "Gather" and "__codebook" in n.input[0]
              and n.input[0] in constants]
    if len(tables) != 1:
        return None
    order = [n for n in model.graph.node if any(n is d for d in decoder)]
    return order, constants[tables[0]]


def shared_weight(model: onnx.ModelProto, name: str) -> tuple[str, np.ndarray] | None:
    """For a weight that `cluster` rebuilds: (its codebook initializer, the codebook position of every
    entry, shaped like the weight); None for any other tensor. `reconstruct` refits codebooks with it."""
    found = decoder_of(model, name)
    if found is None:
        return None
    return found[1].name, codebook_positions(model, name, *found)


def code_rows(model: onnx.ModelProto, name: str) -> int | None:
    """For a weight `cluster` rebuilt: how many values each of its codebooks holds (codes index one
    codebook row of that many values); None where its codes cannot be rewritten (pq, or not clustered)."""
    layout = _code_layout(model, name)
    return None if layout is None else 1 << layout[1]


def recode(model: onnx.ModelProto, name: str, positions: np.ndarray) -> bool:
    """Rewrite, in place, the codes of weight `name` so that each entry reads codebook position
    `positions` (shaped like the weight; each within the codebook row it read before). Checked by
    decoding: False, with nothing changed, where the result would read anything else."""
    layout = _code_layout(model, name)
    if layout is None:
        return False
    codes, bits, restore = layout
    before = codes.SerializeToString()
    moved = np.transpose(positions, np.argsort(restore)) if restore is not None else positions
    local = (moved.reshape(-1) % (1 << bits)).astype(np.uint8)
    padded = np.zeros(-(-local.size // 8) * 8, np.uint8)
    padded[:local.size] = local
    packed = pack_codes(padded, bits)
    codes.CopyFrom(numpy_helper.from_array(packed.reshape(-1, bits) if bits < 8 else packed, codes.name))
    found = decoder_of(model, name)
    if found is None or not np.array_equal(codebook_positions(model, name, *found), positions):
        codes.ParseFromString(before)
        return False
    return True


def _code_layout(model: onnx.ModelProto, name: str):
    """(the codes initializer, bits per code, the restoring Transpose's perm or None) of a clustered weight."""
    found = decoder_of(model, name)
    if found is None or any(n.op_type == "Gather" and n.output[0].endswith("__pieces") for n in found[0]):
        return None
    constants = {t.name: t for t in model.graph.initializer}
    stored = [constants[i] for n in found[0] for i in n.input if i in constants and i.startswith(f"{name}__codes")]
    if len(stored) != 1 or stored[0].data_type != TensorProto.UINT8:
        return None
    codes = stored[0]
    bits = int(codes.dims[1]) if len(codes.dims) == 2 else 8
    last = found[0][-1]
    restore = list(attribute(last, "perm")) if last.op_type == "Transpose" else None
    return codes, bits, restore


def codebook_positions(model: onnx.ModelProto, name: str, decoder: list[onnx.NodeProto],
                       codebook: onnx.TensorProto) -> np.ndarray:
    """The codebook position every entry of weight `name` reads, shaped like the weight, from its
    decoder (as decoder_of gives it): the decoder runs with the codebook replaced by 0, 1, 2, ...,
    so whatever layout the codes were stored in, each entry then reads its own position."""
    used = {i for n in decoder for i in n.input}
    positions = numpy_helper.from_array(np.arange(int(np.prod(codebook.dims)), dtype=np.float32).reshape(
        tuple(codebook.dims)), codebook.name)
    inits = [positions] + [t for t in model.graph.initializer if t.name in used and t.name != codebook.name]
    graph = helper.make_graph(decoder, "decoder", [], [helper.make_tensor_value_info(name, TensorProto.FLOAT, None)],
                              inits)
    probe = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    from onnxshrink.runtime import make_session

    (values,) = make_session(probe, threads=1, optimization="none").run(None, {})
    return np.rint(values).astype(np.int64)


# --------------------------------------------------------------------------
# Numbers: k-means
# --------------------------------------------------------------------------
def _cluster(weight: np.ndarray, axis: int | None, opts, hessian: np.ndarray | None = None) -> _Encoded | str:
    rng = np.random.default_rng(0)
    levels = 2 ** opts.bits
    per_channel = opts.scope == "channel" and axis is not None
    moved = np.moveaxis(weight, axis, 0) if per_channel else weight  # codes follow this order
    # MatMul/Gemm W[K, N] (outputs on `axis`) or Conv W[O, C, kh, kw] (outputs on axis 0, K = C*kh*kw);
    # a depthwise Conv [O, 1, kh, kw] brings one Hessian per input channel, [C, kh*kw, kh*kw].
    depthwise = hessian is not None and hessian.ndim == 3 and axis == 0 and weight.ndim == 4 \
        and weight.shape[1] == 1 and weight.shape[0] % hessian.shape[0] == 0 and hessian.shape[1] == weight[0].size
    gptq = depthwise or (hessian is not None and hessian.ndim == 2 and axis is not None and
                         (weight.ndim == 2 or axis == 0) and hessian.shape[0] * weight.shape[axis] == weight.size)
    importance = None
    if depthwise:  # each output's input energy per tap, from its own channel's Hessian
        hessians = hessian[np.arange(weight.shape[0]) // (weight.shape[0] // hessian.shape[0])]
        energy = np.maximum(np.einsum("okk->ok", hessians), 0)
        importance = (energy / max(float(np.mean(energy)), 1e-30)).reshape(weight.shape)
    elif gptq:  # input energy of each weight's row of W[K, N], laid out like `moved`
        energy = np.maximum(np.diagonal(hessian), 0) / max(float(np.mean(np.diagonal(hessian))), 1e-30)
        if weight.ndim > 2:
            importance = energy.reshape((1,) + weight.shape[1:])
        else:
            importance = energy[None, :] if per_channel or axis == 0 else energy[:, None]
    fallback = ""
    if per_channel:
        rows = moved.reshape(moved.shape[0], -1).astype(np.float64)
        if rows.shape[1] < 4 * levels:
            return f"{rows.shape[1]} weights per channel are too few for {levels} shared values each"
        group = opts.group or rows.shape[1]
        if rows.shape[1] % group:
            fallback = f" (group={group} does not divide its {rows.shape[1]} weights per channel)"
            group = rows.shape[1]
        groups = rows.shape[1] // group
        pieces = rows.reshape(-1, group)  # [channels * groups, group]
        energy = None if importance is None else np.broadcast_to(importance, moved.shape).reshape(pieces.shape)
        books, codes = zip(*(_kmeans_1d(piece, levels, opts, rng, None if energy is None else energy[c])
                             for c, piece in enumerate(pieces)))
        codebook, codes = np.stack(books).reshape(rows.shape[0], groups, levels), np.stack(codes).reshape(rows.shape)
        scope = f"{rows.shape[0]} codebooks" if groups == 1 else f"{codebook.shape[0] * groups} codebooks of {group} weights"
    else:
        codebook, codes = _kmeans_1d(moved.reshape(-1).astype(np.float64), levels, opts, rng,
                                     None if importance is None else np.broadcast_to(importance, moved.shape).reshape(-1))
        scope = "1 codebook"
    assignment = ""
    if gptq:
        # [K, N] with the outputs as columns; each column reads its own codebooks (or the shared one).
        matrix = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1).T.astype(np.float64)
        books = codebook if per_channel else np.broadcast_to(codebook, (matrix.shape[1], 1, levels))
        if depthwise:  # each output column with its own channel's Hessian
            assigned = np.hstack([_gptq_assign(matrix[:, [o]], books[[o]], hessians[o])
                                  for o in range(matrix.shape[1])])
        else:
            assigned = _gptq_assign(matrix, books, hessian)  # [K, N]
            for _ in range(opts.refit):
                books = _refit_codebooks(matrix, books, assigned, hessian, shared=not per_channel)
                assigned = _gptq_assign(matrix, books, hessian)
            if opts.refit:  # the last codes get their own values
                books = _refit_codebooks(matrix, books, assigned, hessian, shared=not per_channel)
                assignment = f", {opts.refit} codebook refit{'s' if opts.refit > 1 else ''}"
            codebook = books if per_channel else books[0, 0]
        codes = assigned.T if per_channel else np.moveaxis(assigned.T, 0, axis).reshape(-1)
        assignment = ", GPTQ assignment" + assignment
    if per_channel:
        rebuilt = np.take_along_axis(codebook.reshape(codebook.shape[0], -1),
                                     codes + (np.arange(codes.shape[1]) // (codes.shape[1] // codebook.shape[1]))
                                     * levels, axis=1)
        if codebook.shape[1] == 1:
            codebook = codebook[:, 0]  # [channels, levels]
        elif _fits_float16(codebook):
            codebook = codebook.astype(np.float16)  # many small codebooks: half the bytes
        else:
            fallback += " (codebooks kept in float32: values outside float16's normal range)"
    else:
        rebuilt = codebook[codes]
    error = np.sqrt(np.mean((rebuilt.reshape(-1) - moved.reshape(-1)) ** 2)) / (np.sqrt(np.mean(moved ** 2)) or 1.0)
    book_bytes = codebook.size * (2 if codebook.dtype == np.float16 else 4)
    about = (f"{opts.bits}-bit codes, {scope} of {levels}{assignment}{fallback}: {weight.size:,} weights in "
             f"{(weight.size * opts.bits + 7) // 8 + book_bytes:,} bytes (of {weight.size * 4:,}); "
             f"relative RMS error {error:.4f}")
    return _Encoded(codes.astype(np.uint8), opts.bits, codebook, axis if per_channel else None, about)


def _fits_float16(books: np.ndarray) -> bool:
    """Whether float16 keeps every codebook [..., levels] within 2^-10 of its largest value: each
    largest |value| is a normal float16 (an all-zero codebook is exact too)."""
    largest = np.abs(books).max(axis=-1)
    return bool(np.all((largest == 0) | ((largest >= 2.0 ** -14) & (largest <= 60000.0))))


def _kmeans_1d(values: np.ndarray, levels: int, opts, rng,
               importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(sorted codebook [levels], codes [values.size]); exact zeros keep code 0 = 0.0 where they are many.

    With `importance` (one per value) k-means minimizes the importance-weighted squared error: gptq
    passes the layer input's energy per weight, so the values go where the outputs need them."""
    zeros = values == 0
    keep_zero = zeros.mean() >= _ZERO_SHARE
    weights = np.ones_like(values) if importance is None else importance
    data, weights = (values[~zeros], weights[~zeros]) if keep_zero else (values, weights)
    free = levels - 1 if keep_zero else levels
    if data.size == 0:
        return np.zeros(levels), np.zeros(values.size, np.int64)
    if data.size > _FIT_SAMPLE:
        picked = rng.choice(data.size, _FIT_SAMPLE, replace=False)
        data, weights = data[picked], weights[picked]
    by_value = np.argsort(data, kind="stable")
    sample, weights = data[by_value], weights[by_value]  # linear init reads the ends
    unique = np.unique(sample)
    if unique.size <= free:
        centroids = unique
    else:
        centroids = _initial(sample, free, opts.init, rng)
        for _ in range(opts.iterations):
            labels = np.searchsorted((centroids[1:] + centroids[:-1]) / 2, sample)
            sums = np.bincount(labels, weights=sample * weights, minlength=free)
            counts = np.bincount(labels, weights=weights, minlength=free)
            updated = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)  # an empty one stays put
            updated = np.sort(updated)
            if np.allclose(updated, centroids, rtol=0, atol=1e-12):
                break
            centroids = updated
    codebook = np.zeros(levels)
    offset = 1 if keep_zero else 0
    codebook[offset:offset + centroids.size] = centroids
    if centroids.size < free:  # fewer distinct values than codes: pad with the last one, never used
        codebook[offset + centroids.size:] = centroids[-1]
    codes = offset + np.clip(np.searchsorted((centroids[1:] + centroids[:-1]) / 2, values), 0, centroids.size - 1)
    if keep_zero:
        codes[zeros] = 0
    return codebook, codes


def _gptq_assign(matrix: np.ndarray, books: np.ndarray, hessian: np.ndarray) -> np.ndarray:
    """Codes [K, N] of W[K, N] in codebooks books[N, groups, levels], GPTQ-style (Frantar et al. 2022).

    Input row k reads group k // (K / groups) of its column's codebooks. Rows (inputs) are taken in
    act-order; each column's weight goes to its nearest value, and the row's error
    e = (w - q) / U[i, i] is spread over the rows left as w_j -= U[i, j] e, with U the upper
    Cholesky factor of H^-1 (quantize_weights.hessian_factor), so the layer's outputs on the
    calibration inputs, not its weights, stay close. Where a codebook keeps 0.0 for pruned weights
    (its value 0), those weights stay 0 and their loss is compensated like any other."""
    from .quantize_weights import hessian_factor

    factor = hessian_factor(hessian)
    upper, order = factor.upper, factor.order
    w = np.array(matrix, np.float64)
    w[factor.dead] = 0.0
    k, n = w.shape
    group = k // books.shape[1]
    row_books = books[:, np.arange(k) // group].transpose(1, 0, 2)  # [K, N, levels]
    pruned = (w == 0) & (row_books[:, :, 0] == 0)
    w, pruned, row_books = w[order], pruned[order], row_books[order]
    columns = np.arange(n)
    codes = np.empty((k, n), np.int64)
    for i in range(k):
        code = np.argmin(np.abs(w[i][:, None] - row_books[i]), axis=1)
        code[pruned[i]] = 0
        codes[i] = code
        error = (w[i] - row_books[i][columns, code]) / upper[i, i]
        w[i + 1:] -= np.outer(upper[i, i + 1:], error)
    assigned = np.empty_like(codes)
    assigned[order] = codes
    return assigned


def column_normal_equations(gram: np.ndarray, right: np.ndarray, codes: np.ndarray, levels: int,
                            groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per column c of a weight W[K, N] rebuilt from column-private values, W[:, c] = A_c v_c: the
    normal equations A_c^T gram A_c [N, P, P] and A_c^T right[:, c] [N, P] of its P = groups * levels
    values, where row k reads value (k // (K / groups)) * levels + codes[k, c].

    A_c is the one-hot of those positions, built for a chunk of columns at a time. Row k reads only
    its own group's levels, so gram A_c is formed a group of rows at a time: the products are
    `groups` times smaller than over all P positions at once (12x on MiniLM's 1536-input layers)."""
    k, n = codes.shape
    rows = k // groups
    normal = np.zeros((n, groups, levels, groups, levels))
    target = np.zeros((n, groups, levels))
    step = max(1, _ONEHOT_ELEMENTS // (k * levels))  # columns per chunk: bounds the one-hots' memory
    for c0 in range(0, n, step):
        c1 = min(n, c0 + step)
        onehot = np.zeros((k, c1 - c0, levels))
        np.put_along_axis(onehot, codes[:, c0:c1, None], 1.0, axis=2)
        by_group = onehot.reshape(groups, rows, c1 - c0, levels).transpose(2, 0, 3, 1)  # [n, G, L, rows]
        for g in range(groups):  # gram A for the codes of group g's rows, read by every row
            spread = gram[:, g * rows:(g + 1) * rows] @ onehot[g * rows:(g + 1) * rows].reshape(rows, -1)
            spread = spread.reshape(groups, rows, c1 - c0, levels).transpose(2, 0, 1, 3)  # [n, G, rows, L]
            normal[c0:c1, :, :, g, :] = by_group @ spread
        target[c0:c1] = (by_group @ right[:, c0:c1].T.reshape(c1 - c0, groups, rows, 1))[..., 0]
    size = groups * levels
    return normal.reshape(n, size, size), target.reshape(n, size)


def _refit_codebooks(matrix: np.ndarray, books: np.ndarray, codes: np.ndarray, hessian: np.ndarray,
                     shared: bool) -> np.ndarray:
    """Codebook values that minimize the layer's output error tr((W - Q)^T H (W - Q)) for fixed codes.

    Q is linear in the values: Q[:, n] = A_n c with A_n the one-hot [K, positions] of column n's
    codes, so c solves the normal equations (sum A^T H A) c = sum A^T H W[:, n], summed over the
    columns that share the codebook. GPTQ picked the codes against k-means values fit to the
    weights alone; these values fit the outputs. An exact 0.0 kept for pruned weights stays 0."""
    groups, levels = books.shape[1], books.shape[2]
    h = np.asarray(hessian, np.float64)
    normal, target = column_normal_equations(h, h @ matrix, codes, levels, groups)
    size = groups * levels
    if shared:
        normal, target = normal.sum(axis=0, keepdims=True), target.sum(axis=0, keepdims=True)
    values = np.array(books[:1] if shared else books, np.float64).reshape(-1, size)
    # A value no weight reads keeps what it had, and so does pruning's 0.0 code: its equation
    # becomes c = value. Dropping a 0.0's coupling to the other values changes nothing.
    diagonal = np.einsum("bii->bi", normal)
    pinned = diagonal <= 0
    pinned[:, 0::levels] |= values[:, 0::levels] == 0
    scale = np.maximum(diagonal.mean(axis=1), 1e-30)[:, None]
    normal[:, np.arange(size), np.arange(size)] += 1e-6 * scale  # keeps the systems well posed
    target += 1e-6 * scale * values
    for b, p in zip(*np.nonzero(pinned)):
        normal[b, p, :] = normal[b, :, p] = 0.0
        normal[b, p, p] = 1.0
        target[b, p] = values[b, p]
    solved = np.linalg.solve(normal, target[..., None])[..., 0]
    if shared:
        return np.broadcast_to(solved.reshape(1, groups, levels), books.shape)
    return solved.reshape(books.shape)


def _input_hessians(model: onnx.ModelProto, opts, context: PassContext) -> dict[str, np.ndarray]:
    """weight name -> sum x^T x of the one input that every reader multiplies it with (MatMul, Gemm
    without transA, or a 2-D Conv of group 1 or depthwise, whose rows x are its input patches; a
    depthwise Conv gets one per channel); weights read any other way keep the nearest-value assignment."""
    tappable = main_graph_tensors(model)
    weights = {t.name: t for t in model.graph.initializer}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            if name in weights:
                readers.setdefault(name, []).append((node, position))
    sizes: dict[str, int] = {}
    wanted: dict[str, str] = {}
    convs: list[onnx.NodeProto] = []
    for name, uses in readers.items():
        dims = list(weights[name].dims)
        sources = {node.input[0] for node, _ in uses}
        if len(sources) != 1 or next(iter(sources)) not in tappable:
            continue
        node = uses[0][0]
        if len(uses) == 1 and _patch_conv(node, uses[0][1], dims):
            convs.append(node)
            continue
        dense = all(node.op_type in ("MatMul", "Gemm") and position == 1 and not attribute(node, "transA", 0)
                    for node, position in uses)
        if not dense or len(dims) != 2:
            continue
        (source,) = sources
        sizes[source] = dims[1 if node.op_type == "Gemm" and attribute(node, "transB", 0) else 0]
        wanted[name] = source
    # prune's obs streams the same sums and leaves out the positions an attention_mask marks as padding.
    from .prune import _input_grams

    grams = _input_grams(model, None, sizes, opts.max_samples, context) if sizes else {}
    hessians = {name: grams[source][0][:-1, :-1] for name, source in wanted.items()}  # without the ones column
    return hessians | conv_input_grams(model, convs, context.data, opts.max_samples, context.progress)


def _patch_conv(node: onnx.NodeProto, position: int, dims: list[int]) -> bool:
    return node.domain in ("", "ai.onnx") and position == 1 and patch_kind(node, dims) is not None


def _initial(sorted_sample: np.ndarray, count: int, init: str, rng) -> np.ndarray:
    if init == "linear":
        return np.linspace(sorted_sample[0], sorted_sample[-1], count)
    # k-means++ in 1-D: draw each next centroid with probability proportional to the squared
    # distance to the nearest one drawn so far.
    chosen = [rng.choice(sorted_sample)]
    nearest = (sorted_sample - chosen[0]) ** 2
    for _ in range(count - 1):
        total = nearest.sum()
        pick = rng.choice(sorted_sample.size, p=nearest / total) if total > 0 else rng.integers(sorted_sample.size)
        chosen.append(sorted_sample[pick])
        nearest = np.minimum(nearest, (sorted_sample - sorted_sample[pick]) ** 2)
    return np.sort(np.array(chosen))


def _product_quantize(weight: np.ndarray, axis: int | None, opts) -> _Encoded | str:
    if axis is None:
        return "its rows do not mean the same to every reader"
    moved = np.moveaxis(weight, axis, 0)
    rows = moved.reshape(moved.shape[0], -1).astype(np.float64)
    d, k = opts.subvector, opts.centroids
    if rows.shape[1] % d:
        return f"rows of {rows.shape[1]} values do not split into pieces of {d}"
    if rows.shape[0] <= k:
        return f"{rows.shape[0]} rows are too few for codebooks of {k} vectors"
    pieces = rows.reshape(rows.shape[0], -1, d)  # [rows, positions, d]
    rng = np.random.default_rng(0)
    books, codes = [], []
    for position in range(pieces.shape[1]):
        book, code = _kmeans(pieces[:, position, :], k, opts.iterations, rng)
        books.append(book)
        codes.append(code)
    codebook, codes = np.stack(books), np.stack(codes, axis=1)  # [positions, k, d], [rows, positions]
    rebuilt = codebook[np.arange(pieces.shape[1])[None, :], codes]
    error = np.sqrt(np.mean((rebuilt - pieces) ** 2)) / (np.sqrt(np.mean(pieces ** 2)) or 1.0)
    stored = codes.size + codebook.size * 4
    about = (f"{codes.shape[1]} pieces of {d} per row, codebooks of {k}: {weight.size:,} weights in {stored:,} bytes "
             f"(of {weight.size * 4:,}); relative RMS error {error:.4f}")
    return _Encoded(codes.astype(np.uint8), 8, codebook, axis, about, rows_first=True)


def _kmeans(points: np.ndarray, k: int, iterations: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means on points [n, d] from k distinct points drawn at random: (centroids [k, d], codes [n])."""
    distinct = np.unique(points, axis=0)
    if len(distinct) <= k:  # as many codes as different pieces: exact
        centroids = np.concatenate([distinct, np.repeat(distinct[-1:], k - len(distinct), axis=0)])
        iterations = 1
    else:  # drawn from the distinct pieces: a repeated start would leave a code empty for good
        centroids = distinct[rng.choice(len(distinct), k, replace=False)].copy()
    squared = np.sum(points ** 2, axis=1)[:, None]
    codes = np.zeros(points.shape[0], np.int64)
    for step in range(iterations):
        distances = squared - 2 * points @ centroids.T + np.sum(centroids ** 2, axis=1)[None, :]
        new_codes = np.argmin(distances, axis=1)
        if step and np.array_equal(new_codes, codes):
            break
        codes = new_codes
        counts = np.bincount(codes, minlength=k)
        sums = np.zeros_like(centroids)
        np.add.at(sums, codes, points)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids, codes
