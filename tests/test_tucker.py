"""tucker: a Conv kernel of low multilinear rank is factored exactly, ranks follow the options, and
only k x k group-1 Convs that save are touched."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxshrink
from helpers import run
from onnxshrink.errors import UsageError


def conv_model(kernel: np.ndarray, bias: bool = True, **attrs) -> onnx.ModelProto:
    out_ch, in_ch = kernel.shape[:2]
    inits = [numpy_helper.from_array(kernel, "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(np.linspace(-1, 1, out_ch).astype(np.float32), "b"))
        inputs.append("b")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_ch, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def low_rank_kernel(out_ch=48, in_ch=40, r_out=6, r_in=5, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    core = rng.standard_normal((r_out, r_in, 3, 3))
    return np.einsum("rskl,or,is->oikl", core, rng.standard_normal((out_ch, r_out)),
                     rng.standard_normal((in_ch, r_in))).astype(np.float32)


@pytest.mark.parametrize("attrs", [{"pads": [1, 1, 1, 1]}, {"strides": [2, 2], "pads": [0, 1, 0, 1]},
                                   {"dilations": [2, 2]}])
def test_low_multilinear_rank_kernel_is_factored_exactly(attrs):
    kernel = low_rank_kernel()
    model = conv_model(kernel, **attrs)
    result = onnxshrink.compress(model, "tucker(energy=0.999999)", samples=1)
    (record,) = result.report.passes
    assert record.status == "applied", record.message
    assert "ranks 5 in, 6 out" in record.notes[0].message
    convs = [n for n in result.model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 3 and convs[-1].name == "conv"
    x = np.random.default_rng(1).standard_normal((1, 40, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-3)
    assert result.model.ByteSize() < 0.2 * model.ByteSize()


def test_ratio_bounds_the_factors_and_min_saving_is_kept():
    kernel = np.random.default_rng(2).standard_normal((64, 64, 3, 3)).astype(np.float32)
    result = onnxshrink.compress(conv_model(kernel, bias=False), "tucker(ratio=0.5)", samples=1)
    held = sum(int(np.prod(t.dims)) for t in result.model.graph.initializer)
    assert 0.4 * kernel.size < held <= 0.5 * kernel.size
    unchanged = onnxshrink.compress(conv_model(kernel), "tucker(ratio=0.95)", samples=1)  # saves < 10%
    assert unchanged.report.passes[0].status == "unchanged"
    assert "save 10%" in unchanged.report.passes[0].notes[0].message


def test_grouped_and_pointwise_convs_are_left_with_notes():
    grouped = conv_model(np.ones((64, 16, 3, 3), np.float32), group=4)
    grouped.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 64
    pointwise = conv_model(np.ones((96, 96, 1, 1), np.float32))
    for model, reason in ((grouped, "grouped"), (pointwise, "1x1")):
        record = onnxshrink.compress(model, "tucker(ratio=0.5)", samples=1).report.passes[0]
        assert record.status == "unchanged" and reason in record.notes[0].message


def test_bad_options():
    with pytest.raises(UsageError):
        onnxshrink.parse_pipeline("tucker(ratio=0.5,rank=4)")
    with pytest.raises(UsageError, match="larger than the channels"):
        onnxshrink.compress(conv_model(low_rank_kernel()), "tucker(rank=41)", samples=1)


def test_activation_aware_fits_the_outputs_where_inputs_span_few_channels():
    """Inputs that live in 6 of 40 channel directions: within the same budget the output fit keeps
    those, where the kernel's own HOSVD (blind to the inputs) loses most of the output."""
    rng = np.random.default_rng(3)
    kernel = rng.standard_normal((48, 40, 3, 3)).astype(np.float32)
    model = conv_model(kernel, pads=[1, 1, 1, 1])
    mixing = rng.standard_normal((40, 6))

    def sample():
        latent = rng.standard_normal((1, 6, 12, 12))
        return {"x": np.einsum("cl,nlhw->nchw", mixing, latent).astype(np.float32)}

    calibration, test = [sample() for _ in range(8)], sample()
    reference = run(model, test)[0]
    errors = {}
    for aware in (True, False):
        factored = onnxshrink.compress(model, f"tucker(ratio=0.3,activation_aware={str(aware).lower()})",
                                       calibration=calibration).model
        errors[aware] = np.linalg.norm(run(factored, test)[0] - reference) / np.linalg.norm(reference)
    assert errors[True] < 0.02 and errors[False] > 0.3, errors
