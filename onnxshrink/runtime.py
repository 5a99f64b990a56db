"""Building onnxruntime sessions for models in memory, with our op library where a model needs it."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .errors import OnnxShrinkError
from .graph import constant_tensors, tensor_elements
from .io import save
from .ops import DOMAIN, library_path

# onnxruntime logs to stderr on its own; our errors carry its message in one line instead.
# This also quiets the sessions graphsurgeon creates for constant folding.
ort.set_default_logger_severity(4)
_INLINE_LIMIT = 2**31 - 2**26


def session_options(threads: int | None = None, optimization: str = "all", spinning: bool = True) -> ort.SessionOptions:
    """`spinning=False` stops idle intra-op threads from busy-waiting: sessions timed in turn on a
    machine with as many cores as threads otherwise steal each other's cores while they spin."""
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = {
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    options.log_severity_level = 4
    return options


def serialized(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes, or None where they would pass protobuf's 2 GiB limit (save it instead).

    The size is estimated from the tensors' shapes first: ByteSize() costs as much as serializing
    (0.1 s on MiniLM's 90 MB), and the manager's check would otherwise pay both for every model."""
    payload = sum(tensor_elements(t) * _itemsize(t.data_type) for t in constant_tensors(model.graph))
    if payload >= _INLINE_LIMIT:
        return None
    data = model.SerializeToString()
    return data if len(data) < _INLINE_LIMIT else None


def _itemsize(data_type: int) -> int:
    try:
        return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except (KeyError, ValueError, TypeError):  # UNDEFINED and types numpy has no dtype for
        return 8


def make_session(model: onnx.ModelProto, threads: int | None = None, optimization: str = "all",
                 model_bytes: bytes | None = None, spinning: bool = True) -> ort.InferenceSession:
    """An InferenceSession on the CPU; registers the onnxshrink op library when the model uses its ops.

    `model_bytes`, when the caller already holds serialized(model), saves serializing it again."""
    options = session_options(threads, optimization, spinning)
    if any(entry.domain == DOMAIN for entry in model.opset_import):
        options.register_custom_ops_library(library_path())
    try:
        data = model_bytes if model_bytes is not None else serialized(model)
        if data is not None:
            return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        with tempfile.TemporaryDirectory() as folder:
            path = save(model, Path(folder) / "model.onnx")
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
            ort.capi.onnxruntime_pybind11_state.NotImplemented, ort.capi.onnxruntime_pybind11_state.InvalidArgument) as exc:
        raise OnnxShrinkError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0]}") from None


def run_all(session: ort.InferenceSession, feeds) -> list[list[np.ndarray]]:
    """Outputs of every feed, in the session's output order."""
    try:
        return [session.run(None, feed) for feed in feeds]
    except Exception as exc:  # ORT raises its own exception types for bad feeds and kernel failures
        raise OnnxShrinkError(f"onnxruntime failed to run the model: {str(exc).splitlines()[0]}") from None


def adapt_feeds(feeds: list[dict], session) -> list[dict]:
    """Cast float feeds to a candidate's float input type (a pass may make the model take float16)."""
    wanted = {i.name: i.type for i in session.get_inputs()}
    dtypes = {"tensor(float16)": np.float16, "tensor(float)": np.float32, "tensor(double)": np.float64}
    def adapt(name, value):
        target = dtypes.get(wanted.get(name))
        return value.astype(target) if target is not None and value.dtype.kind == "f" and value.dtype != target else value
    return [{name: adapt(name, value) for name, value in feed.items()} for feed in feeds]


def interleaved_latency(sessions: list[ort.InferenceSession], feed, repeats: int = 30, warmup: int = 3,
                        settled=None, min_repeats: int = 5) -> list[float]:
    """Median seconds per run of each session, timed in turn so that machine noise hits all alike.

    `feed` is one feed for all sessions, or a list with one feed per session. `settled(medians)`,
    asked after each round from `min_repeats` on, may stop the timing early once the answer that
    the caller needs no longer depends on the rounds left."""
    feeds = feed if isinstance(feed, list) else [feed] * len(sessions)
    for session, feed in zip(sessions, feeds):
        for _ in range(warmup):
            session.run(None, feed)
    times = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for done in range(1, repeats + 1):
        for index in order:  # reversed every round: no session always runs right after the same one
            session = sessions[index]
            start = time.perf_counter()
            session.run(None, feeds[index])
            times[index].append(time.perf_counter() - start)
        order.reverse()
        if settled is not None and min_repeats <= done < repeats and settled([float(np.median(t)) for t in times]):
            break
    return [float(np.median(t)) for t in times]


def u8s8_saturates() -> bool:
    """True on x86 CPUs without VNNI: ORT's uint8 x int8 kernels there add pairs of products in
    int16 and saturate with full 8-bit weights (7-bit weights, "reduce_range", avoid it)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686"):
        return False
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512_vnni" not in flags and "avx_vnni" not in flags
