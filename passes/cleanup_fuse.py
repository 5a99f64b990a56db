"""Weight folds for `cleanup`: a scalar or per-channel Mul/Add/Sub/Div or BatchNormalization after a
Conv, ConvTranspose or Gemm goes into its weights and bias, and x * Clip(x + 3, 0, 6) / 6 becomes
x * HardSigmoid(x). Each changes rounding (weights are computed in float64 and rounded once), so
`cleanup` applies them as a second stage and keeps them only if the outputs stay within its tolerance.

A mixin of the rewriter (cleanup_rewrite.Rewriter): it uses the rewriter's constant lookups.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx

from onnxshrink.graph import attribute, outer_scope_names, subgraphs, unique_name

T = onnx.TensorProto


class WeightFolds:
    def _fuse(self, graph, kept: list, scope) -> list:
        uses = Counter(i for node in kept for i in node.input if i)
        for node in kept:
            for sub in subgraphs(node):
                for name in outer_scope_names(sub):
                    uses[name] += 2  # read inside a subgraph: never fold it away
        outputs = {o.name for o in graph.output}
        producers = {name: node for node in kept for name in node.output if name}
        removed = set()
        for node in kept:
            if id(node) in removed or node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type not in ("Mul", "Add", "Sub", "Div", "BatchNormalization") or not node.input:
                continue
            for position, data in enumerate(node.input[:2] if node.op_type in ("Mul", "Add") else node.input[:1]):
                conv = producers.get(data)
                if conv is None or id(conv) in removed or conv.op_type not in ("Conv", "ConvTranspose", "Gemm"):
                    continue
                if conv.domain not in ("", "ai.onnx") or uses[data] != 1 or data in outputs:
                    continue
                fold = self._fold_into_gemm if conv.op_type == "Gemm" else self._fold_into_conv
                if fold(conv, node, position, scope, uses):
                    conv.output[0] = node.output[0]
                    producers[node.output[0]] = conv  # a Mul then an Add fold in the same sweep
                    removed.add(id(node))
                    self.changed = True
                    self.stats.add(f"{node.op_type} folded into {conv.op_type}")
                    break
        kept = [n for n in kept if id(n) not in removed]
        return self._hard_swish(kept, scope, uses, producers, outputs)

    def _hard_swish(self, kept: list, scope, uses: Counter, producers: dict, outputs: set) -> list:
        """x * Clip(x + 3, 0, 6) / 6 (4 nodes) -> x * HardSigmoid(x, 1/6, 1/2) (2 nodes)."""
        removed, added = set(), {}
        def single(name):
            node = producers.get(name)
            ok = node is not None and id(node) not in removed and uses[name] == 1 and name not in outputs
            return node if ok and node.domain in ("", "ai.onnx") else None
        def scalar(name, value):
            array = self.const_of(scope, name)
            return array is not None and array.size == 1 and array.dtype.kind == "f" and \
                np.isclose(float(array.reshape(-1)[0]), value, rtol=1e-6, atol=0)
        for node in kept:
            if id(node) in removed or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
                continue
            if node.op_type == "Div" and scalar(node.input[1], 6.0):
                product = single(node.input[0])
            elif node.op_type == "Mul" and scalar(node.input[1], 1 / 6):
                product = single(node.input[0])
            elif node.op_type == "Mul" and scalar(node.input[0], 1 / 6):
                product = single(node.input[1])
            else:
                continue
            if product is None or product.op_type != "Mul" or len(product.input) != 2 or self.opset < 6:
                continue
            for k in (0, 1):
                x, clip = product.input[k], single(product.input[1 - k])
                if clip is None or clip.op_type != "Clip" or not self._clips_to(clip, scope, 0.0, 6.0):
                    continue
                add = single(clip.input[0])
                if add is None or add.op_type != "Add" or len(add.input) != 2:
                    continue
                if not ((add.input[0] == x and scalar(add.input[1], 3.0)) or (add.input[1] == x and scalar(add.input[0], 3.0))):
                    continue
                if self.type_of(scope, x) not in (T.FLOAT, T.FLOAT16, T.DOUBLE):
                    continue
                gate = unique_name(node.output[0] + "_hardsigmoid", self.taken)
                added[id(node)] = onnx.helper.make_node("HardSigmoid", [x], [gate], alpha=1 / 6, beta=0.5,
                                                        name=unique_name(gate, self.taken))
                node.op_type = "Mul"
                del node.input[:]
                node.input.extend([x, gate])
                del node.attribute[:]
                removed.update({id(product), id(clip), id(add)})
                self.changed = True
                self.stats.add("x*Clip(x+3,0,6)/6 made x*HardSigmoid(x)")
                break
        out = []
        for n in kept:
            if id(n) in removed:
                continue
            if id(n) in added:
                out.append(added[id(n)])
            out.append(n)
        return out

    def _clips_to(self, clip, scope, low: float, high: float) -> bool:
        if self.opset < 11:
            return attribute(clip, "min") == low and attribute(clip, "max") == high
        if len(clip.input) != 3:
            return False
        lo, hi = self.const_of(scope, clip.input[1]), self.const_of(scope, clip.input[2])
        return lo is not None and hi is not None and lo.size == 1 and hi.size == 1 and \
            float(lo.reshape(-1)[0]) == low and float(hi.reshape(-1)[0]) == high

    def _channel_affine(self, node, position: int, channels: int, rank: int, dtype, scope):
        """The per-channel (axis 1) y = x * scale + shift that `node` applies to its input `position`,
        as float64 arrays of length `channels`, or None."""
        op = node.op_type
        if op == "BatchNormalization":
            if len(node.output) != 1 or attribute(node, "training_mode", 0):
                return None
            if attribute(node, "spatial", 1) != 1 or len(node.input) != 5:
                return None
            params = [self.const_of(scope, n) for n in node.input[1:]]
            if any(p is None or p.shape != (channels,) or p.dtype != dtype for p in params):
                return None
            gamma, beta, mean, var = (p.astype(np.float64) for p in params)
            scale = gamma / np.sqrt(var + np.float64(np.float32(attribute(node, "epsilon", 1e-5))))
            return scale, beta - mean * scale
        value = self.const_of(scope, node.input[1 - position])
        if value is None or value.dtype != dtype or value.ndim > rank or value.size == 0:
            return None
        aligned = (1,) * (rank - value.ndim) + value.shape
        if any(d != 1 for i, d in enumerate(aligned) if i != 1) or aligned[1] not in (1, channels):
            return None
        per_channel = np.broadcast_to(value.reshape(-1).astype(np.float64), (channels,))
        if op == "Mul":
            return per_channel, np.zeros(channels)
        if op == "Add":
            return np.ones(channels), per_channel
        if position != 0:
            return None  # c / x and c - x are not affine in x
        if op == "Div":
            return (None if np.any(per_channel == 0) else (1.0 / per_channel, np.zeros(channels)))
        return np.ones(channels), -per_channel  # Sub

    def _fold_into_conv(self, conv, node, position: int, scope, uses: Counter) -> bool:
        if len(conv.input) < 2 or not self.is_const(scope, conv.input[1]) or uses[conv.input[1]] != 1:
            return False
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        if has_bias and (not self.is_const(scope, conv.input[2]) or uses[conv.input[2]] != 1):
            return False
        weight = self.const_of(scope, conv.input[1])
        if weight.dtype.kind != "f" or weight.ndim < 3:
            return False
        transposed = conv.op_type == "ConvTranspose"
        if transposed and attribute(conv, "group", 1) != 1:
            return False
        channels = weight.shape[1] if transposed else weight.shape[0]
        affine = self._channel_affine(node, position, channels, weight.ndim, weight.dtype, scope)
        if affine is None:
            return False
        scale, shift = affine
        view = [1] * weight.ndim
        view[1 if transposed else 0] = channels
        bias = self.const_of(scope, conv.input[2]) if has_bias else None
        if np.any(scale != 1):
            conv.input[1] = self._new_const(scope, (weight.astype(np.float64) * scale.reshape(view)).astype(weight.dtype),
                                            conv.input[1])
        if has_bias or np.any(shift != 0):
            base = bias.astype(np.float64) if bias is not None else np.zeros(channels)
            name = self._new_const(scope, (base * scale + shift).astype(weight.dtype),
                                   conv.input[2] if has_bias else conv.output[0] + "_bias")
            while len(conv.input) < 3:
                conv.input.append("")
            conv.input[2] = name
        return True

    def _fold_into_gemm(self, gemm, node, position: int, scope, uses: Counter) -> bool:
        """Gemm -> per-column Mul/Add/Sub/Div or BatchNormalization: into B and C."""
        if len(gemm.input) < 2 or not self.is_const(scope, gemm.input[1]) or uses[gemm.input[1]] != 1:
            return False
        has_bias = len(gemm.input) > 2 and bool(gemm.input[2])
        if has_bias and (not self.is_const(scope, gemm.input[2]) or uses[gemm.input[2]] != 1):
            return False
        weight = self.const_of(scope, gemm.input[1])
        if weight.dtype.kind != "f" or weight.ndim != 2:
            return False
        trans_b = attribute(gemm, "transB", 0)
        columns = weight.shape[0] if trans_b else weight.shape[1]
        affine = self._channel_affine(node, position, columns, 2, weight.dtype, scope)
        if affine is None:
            return False
        scale, shift = affine
        bias = self.const_of(scope, gemm.input[2]) if has_bias else None
        if bias is not None and bias.shape not in ((), (1,), (columns,), (1, columns)) and \
                not (bias.ndim == 2 and bias.shape[1] == columns):
            return False
        beta = float(attribute(gemm, "beta", 1.0))
        new_weight = weight.astype(np.float64) * (scale.reshape(-1, 1) if trans_b else scale.reshape(1, -1))
        gemm.input[1] = self._new_const(scope, new_weight.astype(weight.dtype), gemm.input[1])
        base = beta * bias.astype(np.float64) if bias is not None else np.zeros(columns)
        new_bias = (base * scale + shift).astype(weight.dtype)
        name = self._new_const(scope, new_bias, gemm.input[2] if has_bias else gemm.output[0] + "_bias")
        while len(gemm.input) < 3:
            gemm.input.append("")
        gemm.input[2] = name
        kept = [a for a in gemm.attribute if a.name != "beta"]
        del gemm.attribute[:]
        gemm.attribute.extend(kept)  # beta 1 (the default): it is in the new C
        return True
