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


def tensor_value(model: onnx.ModelProto, name: str) -> np.ndarray:
    """Tensor `name` as onnxruntime computes it (a clustered weight's decoder output, say), read as a
    graph output on zero float inputs."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))  # ORT needs no shape
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: np.zeros([d.dim_value or 1 for d in i.type.tensor_type.shape.dim], np.float32)
            for i in probe.graph.input}
    return session.run(None, feed)[0]


def run(model: onnx.ModelProto, feed: dict) -> list:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def class_score_cosines(model: onnx.ModelProto, specs: dict[str, str], calibration: list, feeds: list) -> dict:
    """name -> (YOLOv8n's class-score cosine against `model` on `feeds`, compress's result) for each
    pipeline in `specs` (name -> pipeline), calibrated on `calibration`; output0's rows 4.. are the
    80 class scores."""
    import onnxshrink
    from onnxshrink.task_metrics import part_cosine

    reference = np.concatenate([run(model, f)[0] for f in feeds])
    found = {}
    for name, spec in specs.items():
        result = onnxshrink.compress(model, spec, calibration=calibration, samples=2)
        compressed = np.concatenate([run(result.model, f)[0] for f in feeds])
        found[name] = part_cosine(reference, compressed, axis=1, start=4), result
    return found


def sentence_embeddings(model: onnx.ModelProto, feeds: list) -> np.ndarray:
    """MiniLM's `sentence_embedding` rows for each feed, from one single-threaded session."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["sentence_embedding"], feed)[0] for feed in feeds])


def library_isa(symbol: str) -> str:
    """The kernel variant the op library picked, from one of its diagnostic exports (e.g. "avx2")."""
    from onnxshrink import ops

    return ops.kernel_variant(symbol)


def assert_cases_pass_forced_portable(test_module: str, isa_function: str, tmp_path) -> None:
    """Runs `test_module._check_cases()` with ONNXSHRINK_FORCE_PORTABLE=1 (see assert_cases_pass_under)."""
    assert_cases_pass_under(test_module, isa_function, tmp_path, {"ONNXSHRINK_FORCE_PORTABLE": "1"}, "portable")


def assert_cases_pass_under(test_module: str, isa_function: str, tmp_path, env: dict, isa: str) -> None:
    """Runs `test_module._check_cases()` in a fresh interpreter with `env` set before any session
    exists (dispatch is decided per kernel, at session creation), after checking that
    `test_module.<isa_function>()` says `isa`. cwd=tmp_path, so that a source checkout in the
    current directory cannot shadow the installed package."""
    import os
    import subprocess
    import sys

    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = (f"import sys; sys.path.insert(0, {tests_dir!r}); import {test_module} as m; "
            f"isa = m.{isa_function}(); assert isa == {isa!r}, isa; m._check_cases(); print('CASES-OK')")
    environment = {k: v for k, v in os.environ.items() if k not in ("ONNXSHRINK_FORCE_PORTABLE", "ONNXSHRINK_MAX_ISA")}
    proc = subprocess.run([sys.executable, "-c", code], env={**environment, **env}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "CASES-OK" in proc.stdout, proc.stdout + proc.stderr


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as info:
            return set(next((line for line in info if line.startswith("flags")), "").split())
    except OSError:
        return set()


def smooth_images(rng, count: int, channels: int, size: int, mix=None, name: str = "x") -> list[dict]:
    """Feeds {name: [1, channels, size, size]} smooth like photos: each pixel the sum of a 3x3
    neighbourhood of normal draws (mixed across channels by `mix` [channels, channels] if given),
    so that a Conv patch's taps correlate as they do on real images."""
    x = rng.standard_normal((count, size + 2, size + 2, channels))
    if mix is not None:
        x = x @ mix
    x = sum(x[:, i:i + size, j:j + size] for i in range(3) for j in range(3))
    return [{name: image[None].transpose(0, 3, 1, 2).astype(np.float32)} for image in x]
