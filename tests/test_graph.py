"""graph.layer_bias: the one place passes find the bias a layer adds to its own output."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxshrink.graph import layer_bias, tensor_reads

F = TensorProto.FLOAT


def _graph(nodes, initializers: dict, outputs=("y",), inputs=("x",)) -> onnx.GraphProto:
    return helper.make_graph(nodes, "g", [helper.make_tensor_value_info(i, F, None) for i in inputs],
                             [helper.make_tensor_value_info(o, F, None) for o in outputs],
                             [numpy_helper.from_array(np.ones(shape, np.float32), name)
                              for name, shape in initializers.items()])


def _bias_of(graph: onnx.GraphProto, layer: int = 0) -> str | None:
    initializers = {t.name: t for t in graph.initializer}
    return layer_bias(graph, graph.node[layer], initializers, tensor_reads(graph))


def test_matmul_then_add_of_a_vector():
    graph = _graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["b", "h"], ["y"])],
                   {"w": (4, 3), "b": (3,)})
    assert _bias_of(graph) == "b"


def test_gemm_conv_and_convtranspose_read_input_2():
    for op, weight, bias in (("Gemm", (4, 3), (3,)), ("Conv", (3, 2, 1, 1), (3,)), ("ConvTranspose", (2, 3, 1, 1), (3,))):
        graph = _graph([helper.make_node(op, ["x", "w", "b"], ["y"])], {"w": weight, "b": bias})
        assert _bias_of(graph) == "b", op


def test_gemm_without_c_takes_the_add_after_it():
    graph = _graph([helper.make_node("Gemm", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
                   {"w": (4, 3), "b": (3,)})
    assert _bias_of(graph) == "b"


def test_gemm_with_scaled_c_has_no_bias():
    graph = _graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"], beta=0.5)], {"w": (4, 3), "b": (3,)})
    assert _bias_of(graph) is None


def test_a_bias_read_elsewhere_is_not_the_layers_own():
    shared = _graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"]),
                     helper.make_node("Mul", ["y", "b"], ["z"])], {"w": (4, 3), "b": (3,)}, outputs=("z",))
    assert _bias_of(shared) is None
    as_output = _graph([helper.make_node("Gemm", ["x", "w", "b"], ["y"])], {"w": (4, 3), "b": (3,)},
                       outputs=("y", "b"))
    assert _bias_of(as_output) is None


def test_a_matmul_result_read_twice_has_no_bias():
    graph = _graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"]),
                    helper.make_node("Relu", ["h"], ["z"])], {"w": (4, 3), "b": (3,)}, outputs=("y", "z"))
    assert _bias_of(graph) is None
    also_output = _graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
                         {"w": (4, 3), "b": (3,)}, outputs=("y", "h"))
    assert _bias_of(also_output) is None


def test_a_subgraph_reading_the_bias_counts():
    branch = helper.make_graph([helper.make_node("Identity", ["b"], ["o"])], "then", [],
                               [helper.make_tensor_value_info("o", F, None)])
    graph = _graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"]),
                    helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch)],
                   {"w": (4, 3), "b": (3,)}, outputs=("y", "z"), inputs=("x", "c"))
    assert tensor_reads(graph)["b"] == 3
    assert _bias_of(graph) is None


def test_no_vector_no_bias():
    computed = _graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "x"], ["y"])],
                      {"w": (4, 3)})
    assert _bias_of(computed) is None
    matrix = _graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
                    {"w": (4, 3), "b": (2, 3)})
    assert _bias_of(matrix) is None
    sub = _graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Sub", ["h", "b"], ["y"])],
                 {"w": (4, 3), "b": (3,)})
    assert _bias_of(sub) is None
    no_c = _graph([helper.make_node("Conv", ["x", "w"], ["y"])], {"w": (3, 2, 1, 1)})
    assert _bias_of(no_c) is None
