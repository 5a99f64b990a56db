"""Tests of the op library (ai.onnxshrink::DequantizePacked) and onnxshrink.packing.

Run against the installed package; the ORT tests are skipped when the package
was built with ONNXSHRINK_NO_KERNELS=1, except in CI (CI=true), where a missing
library is a failure: CI must build it.
"""

import os

import numpy as np
import pytest

from helpers import assert_cases_pass_forced_portable, library_isa
from onnxshrink import ops
from onnxshrink.errors import OnnxShrinkError
from onnxshrink.packing import (
    dequantize_packed_reference,
    pack_codes,
    quantize_blockwise,
    unpack_codes,
)

needs_lib = pytest.mark.skipif(not ops.has_library() and os.environ.get("CI", "").lower() != "true",
                               reason="built with ONNXSHRINK_NO_KERNELS=1")


def test_ci_builds_the_op_library():
    if os.environ.get("CI", "").lower() == "true":
        assert ops.has_library(), "CI must build the op library (ONNXSHRINK_NO_KERNELS must not be set)"


# ---------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 13, 1001])
def test_pack_unpack_roundtrip(bits, count):
    rng = np.random.default_rng(bits * 1000 + count)
    codes = rng.integers(0, 1 << bits, count).astype(np.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.ndim == 1
    assert packed.size == (count * bits + 7) // 8
    np.testing.assert_array_equal(unpack_codes(packed, bits, count), codes)


def test_pack_layout_lsb_first():
    # 3-bit codes 1..5: bits laid out LSB-first across bytes; code 2 straddles bytes 0 and 1.
    packed = pack_codes(np.array([1, 2, 3, 4, 5], np.uint8), 3)
    stream = 1 | (2 << 3) | (3 << 6) | (4 << 9) | (5 << 12)
    assert packed.tolist() == [stream & 0xFF, (stream >> 8) & 0xFF]


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_codes(np.array([4], np.uint8), 2)
    with pytest.raises(ValueError):
        pack_codes(np.array([0], np.uint8), 9)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape,block", [((4, 37), 16), ((1, 5), 8), ((2, 3, 40), 32), ((64,), 64)])
def test_quantize_blockwise_error_bound(bits, symmetric, shape, block):
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal(shape) * 3).astype(np.float32)
    packed, scales, zps = quantize_blockwise(w, bits, block, symmetric=symmetric)
    assert (zps is None) == symmetric
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    assert scales.shape == (rows, -(-cols // block)) and scales.dtype == np.float32
    deq = dequantize_packed_reference(packed, scales, zps, bits, block, shape)
    assert deq.shape == w.shape
    per_elem_scale = np.repeat(scales, block, axis=1)[:, :cols].reshape(shape)
    assert np.all(np.abs(deq - w) <= per_elem_scale / 2 * (1 + 1e-5) + 1e-7)


# ---------------------------------------------------------------- the op in ORT


def _model(bits, block_size, shape, with_zp):
    from onnx import TensorProto, helper

    inputs = [
        helper.make_tensor_value_info("codes", TensorProto.UINT8, [None]),
        helper.make_tensor_value_info("scales", TensorProto.FLOAT, [None, None]),
    ]
    names = ["codes", "scales"]
    if with_zp:
        inputs.append(helper.make_tensor_value_info("zero_points", TensorProto.UINT8, [None, None]))
        names.append("zero_points")
    node = helper.make_node(
        "DequantizePacked", names, ["y"], domain=ops.DOMAIN, bits=bits, block_size=block_size, shape=list(shape)
    )
    graph = helper.make_graph([node], "dq", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)]
    )


def _case(bits, block_size, shape, with_zp, seed=0):
    rng = np.random.default_rng(seed)
    rows, cols = int(np.prod(shape[:-1])), shape[-1]
    n_blocks = -(-cols // block_size)
    packed = pack_codes(rng.integers(0, 1 << bits, rows * cols).astype(np.uint8), bits)
    scales = (rng.random((rows, n_blocks)) * 2 - 0.5).astype(np.float32)
    zps = rng.integers(0, 1 << bits, (rows, n_blocks)).astype(np.uint8) if with_zp else None
    feed = {"codes": packed, "scales": scales}
    if with_zp:
        feed["zero_points"] = zps
    ref = dequantize_packed_reference(packed, scales, zps, bits, block_size, shape)
    return feed, ref


CASES = [
    (bits, block, shape, zp)
    for bits in (2, 3, 4, 8)
    for block, shape in ((16, (5, 37)), (8, (1, 13)), (32, (2, 3, 70)), (4, (1, 4)), (64, (300, 257)))
    for zp in (False, True)
]


def _check_cases():
    for bits, block, shape, zp in CASES:
        feed, ref = _case(bits, block, shape, zp)
        sess = ops.session(_model(bits, block, shape, zp), intra_op_num_threads=2)
        (y,) = sess.run(None, feed)
        assert y.dtype == np.float32 and y.shape == tuple(shape)
        np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6, err_msg=f"bits={bits} shape={shape} zp={zp}")


def _selected_isa():
    return library_isa("OnnxShrinkSelectedIsa")


@needs_lib
@pytest.mark.parametrize("bits,block,shape,zp", CASES)
def test_op_matches_reference_dispatched(bits, block, shape, zp):
    feed, ref = _case(bits, block, shape, zp)
    sess = ops.session(_model(bits, block, shape, zp), intra_op_num_threads=2)
    (y,) = sess.run(None, feed)
    assert y.dtype == np.float32 and y.shape == tuple(shape)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6)


@needs_lib
def test_op_matches_reference_forced_portable(tmp_path):
    assert_cases_pass_forced_portable("test_ops", "_selected_isa", tmp_path)


@needs_lib
def test_dispatch_env_var(monkeypatch):
    monkeypatch.delenv("ONNXSHRINK_FORCE_PORTABLE", raising=False)
    assert _selected_isa() in ("portable", "avx2", "avx512")
    monkeypatch.setenv("ONNXSHRINK_FORCE_PORTABLE", "1")
    assert _selected_isa() == "portable"


@needs_lib
def test_optional_zero_points_as_empty_name():
    feed, ref = _case(3, 4, (3, 10), False)
    model = _model(3, 4, (3, 10), False)
    model.graph.node[0].input.append("")  # zero_points present but unnamed = absent
    (y,) = ops.session(model).run(None, feed)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6)


@needs_lib
@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda f: f.update(codes=f["codes"][:-1]), "codes"),
        (lambda f: f.update(scales=f["scales"][:, :1]), "scales"),
        (lambda f: f.update(zero_points=f["zero_points"][:1]), "zero_points"),
    ],
)
def test_bad_input_raises_and_process_survives(mutate, needle):
    import onnxruntime as ort

    feed, ref = _case(3, 4, (3, 10), True)
    sess = ops.session(_model(3, 4, (3, 10), True))
    bad = dict(feed)
    mutate(bad)
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument) as exc:
        sess.run(None, bad)
    assert "DequantizePacked" in str(exc.value) and needle in str(exc.value)
    (y,) = sess.run(None, feed)  # still usable afterwards
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-6)


@needs_lib
def test_bad_attribute_raises():
    import onnxruntime as ort

    feed, _ = _case(3, 4, (3, 10), False)
    model = _model(3, 4, (3, 10), False)
    for a in model.graph.node[0].attribute:
        if a.name == "bits":
            a.i = 9
    with pytest.raises(ort.capi.onnxruntime_pybind11_state.InvalidArgument, match="DequantizePacked.*bits"):
        ops.session(model).run(None, feed)


@needs_lib
def test_session_accepts_path_bytes_and_proto(tmp_path):
    import onnxruntime as ort

    feed, ref = _case(4, 8, (2, 9), False)
    model = _model(4, 8, (2, 9), False)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    for src in (model, model.SerializeToString(), str(path), path):
        sess = ops.session(src, graph_optimization_level=ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
        assert sess.get_providers() == ["CPUExecutionProvider"]
        np.testing.assert_allclose(sess.run(None, feed)[0], ref, rtol=0, atol=1e-6)
    with pytest.raises(OnnxShrinkError):
        ops.session(model, no_such_option=1)


def test_library_path_or_error():
    if ops.has_library():
        assert os.path.isfile(ops.library_path())
    else:
        with pytest.raises(OnnxShrinkError, match="ONNXSHRINK_NO_KERNELS"):
            ops.library_path()
