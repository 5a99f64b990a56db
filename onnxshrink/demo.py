"""`onnxshrink demo`: the embedded digits network, compressed, measured before and after."""

from __future__ import annotations

from importlib import resources

import numpy as np
import onnx

from .io import load
from .manager import compress
from .report import human_bytes, table
from .runtime import interleaved_latency, make_session

DEFAULT_PIPELINE = "cleanup,dedup,fp16"


def digits_model() -> onnx.ModelProto:
    with resources.as_file(resources.files("onnxshrink") / "data" / "digits_mlp.onnx") as path:
        return load(path)


def digits_test_split() -> tuple[np.ndarray, np.ndarray]:
    with resources.as_file(resources.files("onnxshrink") / "data" / "digits_test.npz") as path:
        with np.load(path) as data:
            return data["input"], data["label"]


def accuracy(model: onnx.ModelProto, images: np.ndarray, labels: np.ndarray) -> float:
    session = make_session(model)
    logits = session.run(None, {session.get_inputs()[0].name: images})[0]
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def run_demo(pipeline: str = DEFAULT_PIPELINE, max_drift: str | None = "top1>=0.99") -> tuple[str, dict]:
    model = digits_model()
    images, labels = digits_test_split()
    samples = [{"input": images[i:i + 1]} for i in range(64)]
    result = compress(model, pipeline, calibration=samples, max_drift=max_drift, samples=64)
    before_acc, after_acc = accuracy(model, images, labels), accuracy(result.model, images, labels)
    sessions = [make_session(model, threads=1), make_session(result.model, threads=1)]
    before_ms, after_ms = (t * 1e3 for t in interleaved_latency(sessions, {"input": images[:1]}, repeats=200))
    figures = {"pipeline": pipeline, "size_before": model.ByteSize(), "size_after": result.model.ByteSize(),
               "accuracy_before": before_acc, "accuracy_after": after_acc, "latency_ms_before": before_ms,
               "latency_ms_after": after_ms, "test_samples": len(labels)}
    summary = table(
        ["model", "size", "accuracy", "latency (batch 1, 1 thread)"],
        [["digits MLP fp32", human_bytes(figures["size_before"]), f"{before_acc:.2%}", f"{before_ms:.4f} ms"],
         ["compressed", human_bytes(figures["size_after"]), f"{after_acc:.2%}", f"{after_ms:.4f} ms"],
         ["ratio", f"{figures['size_after'] / figures['size_before']:.3f}x", f"{(after_acc - before_acc) * 100:+.2f} pt",
          f"{after_ms / before_ms:.3f}x"]])
    text = (f"onnxshrink demo: MLP 64-256-128-10 on scikit-learn's digits ({len(labels)} held-out images)\n"
            f"pipeline: {pipeline}\n\n{result.report.table()}\n\n{summary}")
    return text, figures
