"""Small graphs built in the tests themselves."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def mlp_model(opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """x[batch,8] -> Gemm -> Relu -> Identity -> Gemm -> y[batch,4], with a dead branch and a duplicate weight."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w2 = rng.standard_normal((16, 4)).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(w2.copy(), "w2_copy"), numpy_helper.from_array(np.zeros(4, np.float32), "unused")]
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"], name="gemm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Identity", ["r"], ["r_id"], name="identity"),
        helper.make_node("Gemm", ["r_id", "w2"], ["y"], name="gemm2"),
        helper.make_node("Gemm", ["r", "w2_copy"], ["dead"], name="dead_gemm"),
    ]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def if_model() -> onnx.ModelProto:
    """An If whose branches read an outer-scope weight: fp16 must keep that tensor float32."""
    w = numpy_helper.from_array(np.arange(64, dtype=np.float32).reshape(8, 8) / 64, "w")
    then_graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t_out"])], "then", [],
                                   [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    else_graph = helper.make_graph([helper.make_node("Neg", ["x"], ["e_out"])], "else", [],
                                   [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["branch"], then_branch=then_graph, else_branch=else_graph),
             helper.make_node("MatMul", ["branch", "w_out"], ["y"])]
    graph = helper.make_graph(nodes, "if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                              [w, numpy_helper.from_array(np.array(0, np.float32), "zero"),
                               numpy_helper.from_array(np.eye(8, dtype=np.float32), "w_out")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def run(model: onnx.ModelProto, feed: dict) -> list:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
