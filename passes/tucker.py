"""`tucker`: factor a k x k Conv into 1x1 -> k x k -> 1x1 convolutions (Tucker-2), where it saves.

The low-rank family's Conv member (`svd` in low_rank.py factors MatMul/Gemm). A kernel
W[O, I, kh, kw] is approximated by HOSVD on its two channel modes: U_out [O, r_out] and U_in
[I, r_in] are the leading left singular vectors of W unfolded along outputs and along inputs,
and the core C = W x_0 U_out^T x_1 U_in^T [r_out, r_in, kh, kw]. Then

    conv(x, W) ~ conv1x1(conv(conv1x1(x, U_in^T), C), U_out)

with the middle convolution keeping the original's strides, pads and dilations and the last one
the bias. The ranks come from `ratio` (the largest ranks, in proportion to O and I, whose three
factors hold at most that fraction of W's parameters), `energy` (per mode, the smallest rank
keeping that fraction of the squared singular values) or `rank` (both modes). A layer is
factored only where the factors hold at most (1 - min_saving) of its parameters. Grouped and
depthwise Convs, 1x1 kernels and 1-D/3-D Convs are left as they are, with a note.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxshrink.errors import UsageError
from onnxshrink.graph import all_names, attribute, constants_to_initializers, outer_scope_names, subgraphs, \
    unique_name
from onnxshrink.options import PassOptions, option
from onnxshrink.pass_base import Note, Pass, PassContext, PassOutput
from onnxshrink.registry import register_pass

_KEPT_ATTRIBUTES = ("strides", "pads", "dilations", "auto_pad", "kernel_shape")


@register_pass("tucker")
class Tucker(Pass):
    summary = "Factor k x k Convs into 1x1 -> k x k -> 1x1 by Tucker-2 (HOSVD on the channel modes) where it saves."

    @dataclass(frozen=True)
    class Options(PassOptions):
        ratio: float = option(0.0, "the three factors hold at most this fraction of each kernel's parameters "
                                   "(0: use energy or rank)", low=0, high=1)
        energy: float = option(0.0, "per channel mode, keep this fraction of the squared singular values "
                                    "(0: use ratio or rank)", low=0, high=1)
        rank: int = option(0, "fixed rank of both channel modes (0: use ratio or energy)", low=0)
        min_saving: float = option(0.1, "factor a Conv only where it saves at least this fraction", low=0, high=1,
                                   high_exclusive=True)
        min_elements: int = option(4096, "smaller kernels are left as they are", low=1)
        exclude: tuple[str, ...] = option((), "node names left as they are")

        def __post_init__(self):
            super().__post_init__()
            given = [name for name in ("ratio", "energy", "rank") if getattr(self, name)]
            if len(given) != 1:
                raise UsageError("give exactly one of ratio=, energy= or rank= (e.g. tucker(ratio=0.5))")

    def run(self, model: onnx.ModelProto, context: PassContext) -> PassOutput:
        opts = self.options
        constants_to_initializers(model.graph)
        weights = {t.name: t for t in model.graph.initializer}
        readers: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                readers[name] = readers.get(name, 0) + 1
        for node in model.graph.node:
            for sub in subgraphs(node):
                for name in outer_scope_names(sub):
                    readers[name] = readers.get(name, 0) + 2  # read inside a subgraph: keep it
        graph_inputs = {i.name for i in model.graph.input}
        taken = all_names(model)
        notes, replaced = [], {}
        for position, node in enumerate(model.graph.node):
            if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
                continue
            where = node.name or node.output[0]
            tensor = weights.get(node.input[1])
            if tensor is None or node.input[1] in graph_inputs or tensor.data_type != onnx.TensorProto.FLOAT:
                continue
            problem = _refusal(node, tensor, readers, opts)
            if problem:
                if problem != "small":
                    notes.append(Note(where, f"left as is: {problem}"))
                continue
            kernel = numpy_helper.to_array(tensor).astype(np.float64)
            factors = _tucker2(kernel, opts)
            if factors is None:
                notes.append(Note(where, f"left as is: no ranks of {kernel.shape} save {opts.min_saving:.0%}"))
                continue
            first, core, last, kept = factors
            replaced[position] = _factored_convs(node, first, core, last, model.graph, taken)
            held = first.size + core.size + last.size
            notes.append(Note(where, f"ranks {core.shape[1]} in, {core.shape[0]} out of {kernel.shape[1]}, "
                                     f"{kernel.shape[0]}: {held:,} of {kernel.size:,} weights, {kept:.1%} energy kept"))
        if not replaced:
            return PassOutput(model, notes or [Note("(graph)", "no k x k Conv to factor")])
        nodes = []
        for position, node in enumerate(model.graph.node):
            nodes += replaced.get(position, [node])
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        needed = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
        needed |= {name for node in model.graph.node for sub in subgraphs(node) for name in outer_scope_names(sub)}
        kept_inits = [t for t in model.graph.initializer if t.name in needed]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept_inits)
        return PassOutput(model, notes)


def _refusal(node, tensor, readers, opts) -> str:
    """Why this Conv is not factored ("small" is not worth a note), or ''."""
    if node.name in opts.exclude:
        return "excluded"
    if len(tensor.dims) != 4:
        return f"{len(tensor.dims) - 2}-D convolution (only 2-D is factored)"
    if int(np.prod(tensor.dims)) < opts.min_elements:
        return "small"
    if attribute(node, "group", 1) != 1:
        return "grouped or depthwise Conv"
    if tensor.dims[2] * tensor.dims[3] == 1:
        return "1x1 kernel (nothing to gain over a channel-mode SVD)"
    if readers.get(node.input[1], 0) > 1:
        return "its kernel is shared with other nodes"
    return ""


def _tucker2(kernel: np.ndarray, opts) -> tuple[np.ndarray, np.ndarray, np.ndarray, float] | None:
    """(U_in^T as [r_in, I, 1, 1], core [r_out, r_in, kh, kw], U_out as [O, r_out, 1, 1], energy kept) or None."""
    out_ch, in_ch, kh, kw = kernel.shape
    u_out, s_out, _ = np.linalg.svd(kernel.reshape(out_ch, -1), full_matrices=False)
    u_in, s_in, _ = np.linalg.svd(kernel.transpose(1, 0, 2, 3).reshape(in_ch, -1), full_matrices=False)

    def held(r_out, r_in):
        return in_ch * r_in + r_in * r_out * kh * kw + r_out * out_ch

    if opts.rank:
        if opts.rank > min(out_ch, in_ch):
            raise UsageError(f"tucker: rank={opts.rank} is larger than the channels ({out_ch} out, {in_ch} in) "
                             "of a Conv it would factor; give a smaller rank or ratio=")
        r_out = r_in = opts.rank
    elif opts.energy:
        r_out = _energy_rank(s_out, opts.energy)
        r_in = _energy_rank(s_in, opts.energy)
    else:  # the largest ranks in proportion to the channel counts that fit the budget
        budget = opts.ratio * kernel.size
        scale = 0.0
        for candidate in np.linspace(1.0, 0.0, 401)[:-1]:
            if held(max(1, round(candidate * out_ch)), max(1, round(candidate * in_ch))) <= budget:
                scale = candidate
                break
        r_out, r_in = max(1, round(scale * out_ch)), max(1, round(scale * in_ch))
    if held(r_out, r_in) > (1 - opts.min_saving) * kernel.size:
        return None
    u_out, u_in = u_out[:, :r_out], u_in[:, :r_in]
    core = np.einsum("oikl,or,is->rskl", kernel, u_out, u_in)
    kept = float(np.sum(core ** 2) / max(np.sum(kernel ** 2), 1e-300))
    first = u_in.T[:, :, None, None]
    last = u_out[:, :, None, None]
    return first.astype(np.float32), core.astype(np.float32), last.astype(np.float32), kept


def _energy_rank(singular: np.ndarray, energy: float) -> int:
    share = np.cumsum(singular ** 2) / max(float(np.sum(singular ** 2)), 1e-300)
    return int(np.searchsorted(share, energy - 1e-12) + 1)


def _factored_convs(node, first, core, last, graph, taken) -> list[onnx.NodeProto]:
    base = node.name or node.output[0]
    names = {part: unique_name(f"{base}_tucker_{part}", taken) for part in ("in_w", "core_w", "out_w", "in", "core")}
    taken.update(names.values())
    graph.initializer.extend([numpy_helper.from_array(first, names["in_w"]),
                              numpy_helper.from_array(core, names["core_w"]),
                              numpy_helper.from_array(last, names["out_w"])])
    kept = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name in _KEPT_ATTRIBUTES}
    if "kernel_shape" in kept:
        kept["kernel_shape"] = list(core.shape[2:])
    reduce_in = helper.make_node("Conv", [node.input[0], names["in_w"]], [names["in"]],
                                 name=unique_name(f"{base}_tucker_in", taken))
    spatial = helper.make_node("Conv", [names["in"], names["core_w"]], [names["core"]],
                               name=unique_name(f"{base}_tucker_core", taken), **kept)
    expand = helper.make_node("Conv", [names["core"], names["out_w"], *node.input[2:3]], list(node.output),
                              name=node.name or None)
    return [reduce_in, spatial, expand]
