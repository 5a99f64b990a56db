"""Train the reference digits MLP and export it as a hand-built ONNX graph.

Run from the repository root::

    python models/digits_mlp.py

Data: scikit-learn's ``load_digits`` (1797 real 8x8 handwritten digits).
Split: stratified 70/30, ``random_state=0``.  Inputs are scaled to [0, 1]
(pixel / 16).  Model: 64-256-128-10 MLP with ReLU, trained with
scikit-learn's ``MLPClassifier`` (fixed seed).

Writes (deterministically):

* ``onnxshrink/data/digits_mlp.onnx`` -- input ``input`` float32 [batch, 64],
  output ``logits`` float32 [batch, 10]; Gemm(transB=1)+Relu x2 + Gemm,
  opset 17, IR version 8.
* ``onnxshrink/data/digits_test.npz`` -- ``input`` float32 [n, 64],
  ``label`` int64 [n] (the test split).
"""

from __future__ import annotations

import io
import os
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np

SEED = 0
TEST_SIZE = 0.3
HIDDEN = (256, 128)
OPSET = 17
IR_VERSION = 8

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO / "onnxshrink" / "data"
MODEL_PATH = DATA_DIR / "digits_mlp.onnx"
TEST_PATH = DATA_DIR / "digits_test.npz"


def load_split():
    """Return (X_train, X_test, y_train, y_test); X float32 in [0,1], y int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    return train_test_split(
        X, y, test_size=TEST_SIZE, stratify=y, random_state=SEED
    )


def train(X_train, y_train):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(
        hidden_layer_sizes=HIDDEN,
        activation="relu",
        solver="adam",
        alpha=1e-4,
        batch_size=64,
        learning_rate_init=1e-3,
        max_iter=200,
        random_state=SEED,
        tol=1e-6,
        n_iter_no_change=200,
    )
    # Train in float64 (sklearn's default); weights are cast to float32 on export.
    # A fixed epoch budget (no early stop) keeps re-runs identical.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X_train.astype(np.float64), y_train)
    return clf


def build_onnx(weights, biases):
    """Build the ONNX model from per-layer weights ([in, out]) and biases."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = []
    inits = []
    prev = "input"
    n_layers = len(weights)
    for i, (w, b) in enumerate(zip(weights, biases)):
        # Store B as [out, in] and use transB=1, like a typical framework export.
        w_name, b_name = f"fc{i + 1}.weight", f"fc{i + 1}.bias"
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T, dtype=np.float32), w_name))
        inits.append(numpy_helper.from_array(np.asarray(b, dtype=np.float32), b_name))
        last = i == n_layers - 1
        gemm_out = "logits" if last else f"fc{i + 1}_out"
        nodes.append(
            helper.make_node(
                "Gemm", [prev, w_name, b_name], [gemm_out],
                name=f"fc{i + 1}", alpha=1.0, beta=1.0, transB=1,
            )
        )
        if not last:
            relu_out = f"relu{i + 1}_out"
            nodes.append(helper.make_node("Relu", [gemm_out], [relu_out], name=f"relu{i + 1}"))
            prev = relu_out

    n_in = weights[0].shape[0]
    n_out = weights[-1].shape[1]
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_out])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="onnxshrink-models",
        producer_version="1",
        doc_string="64-256-128-10 ReLU MLP trained on sklearn load_digits (inputs pixel/16).",
    )
    model.ir_version = IR_VERSION
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _npz_bytes(arrays: dict) -> bytes:
    """Deterministic .npz (fixed zip timestamps), readable by numpy.load."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def onnx_accuracy(model_bytes: bytes, X, y) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input": X})[0]
    return float((logits.argmax(axis=1) == y).mean())


def main() -> int:
    X_train, X_test, y_train, y_test = load_split()
    clf = train(X_train, y_train)
    sk_acc = float(clf.score(X_test.astype(np.float64), y_test))
    model = build_onnx(
        [np.asarray(w) for w in clf.coefs_], [np.asarray(b) for b in clf.intercepts_]
    )
    model_bytes = model.SerializeToString()
    acc = onnx_accuracy(model_bytes, X_test, y_test)
    _write_atomic(MODEL_PATH, model_bytes)
    _write_atomic(
        TEST_PATH,
        _npz_bytes({"input": X_test.astype(np.float32), "label": y_test.astype(np.int64)}),
    )
    print(f"train n={len(y_train)} test n={len(y_test)} iters={clf.n_iter_}")
    print(f"sklearn test accuracy {sk_acc:.4f}; onnxruntime test accuracy {acc:.4f}")
    print(f"wrote {MODEL_PATH} ({MODEL_PATH.stat().st_size} B), "
          f"{TEST_PATH} ({TEST_PATH.stat().st_size} B)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
