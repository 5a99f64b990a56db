"""Runs ONE quantization in this fresh process and reports its wall time and peak memory.

    python benchmarks/_peak_rss.py '<job as JSON>'

The job: {"tool": "ours" | "ort-static" | "ort-dynamic" | "ort-nbits", "model": path,
"out": path, "calib": stacked .npz path or null, "pipeline": text (ours), "samples": int (ours),
"settings": {...} (the ORT call's options)}.

Prints one JSON line last on stdout: {"ok": true, "wall_s", "rss_mb", "base_mb", "note"} (ours adds
"pass_s": the passes' own time, without compress()'s check of the result) or
{"ok": false, "error", "unavailable"}. `rss_mb` is the peak RSS of the process (its high-water
mark, see peak_rss_mb()) minus its value after the imports, so every tool is charged for what it
loads and allocates (the model, calibration activations, the output) and not for the Python
libraries. One process per job, so one tool's peak never hides or inflates another's.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
import zipfile

# Everything every tool needs is imported before the baseline, so all jobs subtract the same libraries.
import numpy as np
import onnx
import onnxruntime  # noqa: F401
from onnxruntime import quantization as ortq

import onnxshrink
import onnxshrink.passes  # noqa: F401  (the passes import scipy, as the peer's quantizer imports its modules above)
from onnxshrink.calibration import InputSpec, NpzSamples
from _report import peak_rss_mb


def stacked_inputs(path: str) -> list[InputSpec]:
    """Input specs read from the .npz headers alone (arrays are [samples, *feed shape]), so the
    reader below can stream the file without the model having to be loaded to describe it."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    specs = []
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            with archive.open(member) as handle:
                shape, _, dtype = readers[np.lib.format.read_magic(handle)](handle)
            specs.append(InputSpec(member.removesuffix(".npy"), np.dtype(dtype), (None,) * (len(shape) - 1)))
    return specs


class StreamingReader(ortq.CalibrationDataReader):
    """ORT's calibration input, one sample read from the .npz at a time (onnxshrink's NpzSamples),
    so the reader itself holds no more than one feed whatever the sample count."""

    def __init__(self, path: str):
        self._samples = iter(NpzSamples(path, stacked_inputs(path)))

    def get_next(self):
        return next(self._samples, None)


def run_ours(job: dict) -> dict:
    result = onnxshrink.compress(job["model"], job["pipeline"], calibration=job["calib"], samples=job["samples"])
    onnxshrink.save(result.model, job["out"])
    problems = [p.message or f"{p.spec}: {p.status}" for p in result.report.rolled_back]
    unchanged = [p.spec for p in result.report.passes if p.status == "unchanged"]
    return {"note": "; ".join(problems + [f"{spec}: unchanged" for spec in unchanged]),
            "pass_s": sum(p.wall_s for p in result.report.passes)}


def run_ort_static(job: dict) -> dict:
    settings = job["settings"]
    ortq.quantize_static(
        job["model"], job["out"], StreamingReader(job["calib"]),
        quant_format=ortq.QuantFormat.QDQ, per_channel=settings.get("per_channel", True),
        activation_type=getattr(ortq.QuantType, settings.get("activation_type", "QInt8")),
        weight_type=getattr(ortq.QuantType, settings.get("weight_type", "QInt8")),
        calibrate_method=getattr(ortq.CalibrationMethod, settings.get("calibrate_method", "MinMax")))
    return {"note": ""}


def run_ort_dynamic(job: dict) -> dict:
    settings = job["settings"]
    ortq.quantize_dynamic(job["model"], job["out"], per_channel=settings.get("per_channel", True),
                          weight_type=getattr(ortq.QuantType, settings.get("weight_type", "QInt8")))
    return {"note": ""}


def run_ort_nbits(job: dict) -> dict:
    # Imported here: this module needs the optional package onnx_ir, the other tools do not.
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as exc:
        raise Unavailable(f"onnxruntime's MatMulNBitsQuantizer cannot be imported ({exc}; pip install onnx-ir)") from None
    settings = job["settings"]
    quantizer = MatMulNBitsQuantizer(onnx.load(job["model"]), bits=settings.get("bits", 4),
                                     block_size=settings.get("block_size", 32),
                                     is_symmetric=settings.get("symmetric", True),
                                     accuracy_level=settings.get("accuracy_level"))
    quantizer.process()
    quantizer.model.save_model_to_file(job["out"], use_external_data_format=False)
    return {"note": ""}


class Unavailable(Exception):
    pass


TOOLS = {"ours": run_ours, "ort-static": run_ort_static, "ort-dynamic": run_ort_dynamic, "ort-nbits": run_ort_nbits}


def main() -> int:
    job = json.loads(sys.argv[1])
    base = peak_rss_mb()
    start = time.perf_counter()
    try:
        extra = TOOLS[job["tool"]](job)
    except Unavailable as exc:
        print(json.dumps({"ok": False, "unavailable": True, "error": str(exc)}))
        return 0
    except Exception as exc:  # every tool raises its own types; the row shows the message
        traceback.print_exc(file=sys.stderr)
        message = str(exc).strip().splitlines()
        print(json.dumps({"ok": False, "unavailable": False,
                          "error": f"{type(exc).__name__}: {message[0] if message else ''}"}))
        return 0
    wall = time.perf_counter() - start
    print(json.dumps({"ok": True, "wall_s": wall, "rss_mb": peak_rss_mb() - base, "base_mb": base, **extra}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
