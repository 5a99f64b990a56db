"""The activation pair that moves the outputs most is found by measurement and left float; the
drift it is judged by does not let a large channel hide a small one."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from helpers import run
from onnxshrink.pass_base import Note
from onnxshrink.passes import sensitive_float


def chain(scales: dict[str, float] | None) -> onnx.ModelProto:
    """x -> Mul 2 -> a -> Add 1 -> b -> Mul 0.5 -> c -> Tanh -> y; with `scales`, a uint8 QuantizeLinear/
    DequantizeLinear pair (zero point 128) after each of a, b and c, as quantize-int8 places them."""
    inits = [numpy_helper.from_array(np.float32(v), n) for n, v in (("two", 2), ("one", 1), ("half", 0.5))]
    steps = [("Mul", "x", "two", "a"), ("Add", "a", "one", "b"), ("Mul", "b", "half", "c")]
    nodes, current = [], "x"
    for op, _, constant, name in steps:
        nodes.append(helper.make_node(op, [current, constant], [name]))
        current = name
        if scales:
            inits += [numpy_helper.from_array(np.float32(scales[name]), f"{name}_s"),
                      numpy_helper.from_array(np.uint8(128), f"{name}_z")]
            nodes += [helper.make_node("QuantizeLinear", [name, f"{name}_s", f"{name}_z"], [f"{name}_q"]),
                      helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"])]
            current = f"{name}_dq"
    nodes.append(helper.make_node("Tanh", [current], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_pair_that_costs_most_is_left_float():
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.uniform(-1, 1, (1, 4, 16)).astype(np.float32)} for _ in range(4)]
    # a and c are quantized finely; b's step (0.25) is far too coarse for its values (-1..3)
    quantized = chain({"a": 1 / 32, "b": 0.25, "c": 1 / 64})
    notes: list[Note] = []
    result = sensitive_float.keep_sensitive_float(chain(None), quantized, feeds, limit=1, notes=notes)
    quantizers = [n.input[0] for n in result.graph.node if n.op_type == "QuantizeLinear"]
    assert sorted(quantizers) == ["a", "c"], quantizers
    assert any(note.where == "b" and "left float" in note.message for note in notes)
    assert "1 activation tensor(s) left float of 3" in notes[-1].message
    x = feeds[0]["x"]
    assert np.abs(run(result, {"x": x})[0] - run(chain(None), {"x": x})[0]).max() < 0.02


def test_balanced_drift_sees_a_small_channel():
    rng = np.random.default_rng(1)
    reference = [[np.stack([1000 * rng.standard_normal(50), rng.standard_normal(50)])[None]]]
    candidate = [[reference[0][0].copy()]]
    candidate[0][0][0, 1] = rng.standard_normal(50)  # the small channel is now unrelated noise
    a, b = reference[0][0].ravel(), candidate[0][0].ravel()
    assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.9999  # the whole output hides it
    assert sensitive_float.balanced_drift(reference, candidate) > 0.3
