"""The first passes on the four reference models, with real inputs.

Margins: cleanup and dedup must not change outputs (max error within 1e-6 of the output's
largest magnitude); fp16 must at least halve the file (<= 0.52 of it) at cosine >= 0.999.
"""

import onnx
import pytest

import inputs
import onnxshrink

pytestmark = pytest.mark.realmodel

FEEDS = {
    "digits_mlp_path": lambda: inputs.digits_inputs(16),
    "yolov8n_path": lambda: inputs.yolov8n_inputs(3),
    "ppocr_det_path": lambda: inputs.ppocr_det_inputs(2),
    "minilm_path": lambda: inputs.minilm_inputs(6),
}


@pytest.fixture(params=list(FEEDS), scope="module")
def real_model(request):
    path = request.getfixturevalue(request.param)
    return request.param.removesuffix("_path"), path, FEEDS[request.param]()


@pytest.mark.parametrize("pipeline", ["cleanup", "dedup"])
def test_lossless_passes_keep_outputs(real_model, pipeline):
    name, path, feeds = real_model
    result = onnxshrink.compress(path, pipeline, calibration=feeds, samples=len(feeds))
    (record,) = result.report.passes
    assert record.status in ("applied", "unchanged"), record.message
    assert record.fidelity["max_rel"] <= 1e-6, (name, record.fidelity)
    assert record.after.bytes <= record.before.bytes
    onnx.checker.check_model(result.model, full_check=True)


def test_fp16_halves_the_file_at_cosine_0999(real_model):
    name, path, feeds = real_model
    result = onnxshrink.compress(path, "fp16", calibration=feeds, samples=len(feeds), max_drift="cosine>=0.999")
    (record,) = result.report.passes
    assert record.status == "applied", record.message
    assert record.after.bytes <= 0.52 * record.before.bytes, (name, record.after.bytes / record.before.bytes)
    assert record.fidelity["cosine"] >= 0.999
    onnx.checker.check_model(result.model, full_check=True)


def test_max_drift_rolls_back_fp16_on_yolov8n(yolov8n_path):
    feeds = inputs.yolov8n_inputs(2)
    result = onnxshrink.compress(yolov8n_path, "cleanup,fp16", calibration=feeds, samples=2,
                                 max_drift="max-abs<=1e-4")
    cleanup, fp16 = result.report.passes
    assert cleanup.status in ("applied", "unchanged") and fp16.status == "rolled back"
    assert fp16.fidelity["max_abs"] > 1e-4 and "max-abs" in fp16.message and "<=0.0001" in fp16.message
    assert result.report.output.bytes == cleanup.after.bytes  # the fp16 model was not kept
