"""Access to the onnxshrink custom-op library (domain ``ai.onnxshrink``).

The library (``libonnxshrink_ops.so``) is built from ``kernels/`` and installed
next to this module. It is loaded into onnxruntime per session with
``SessionOptions.register_custom_ops_library``.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional, Sequence, Union

from onnxshrink.errors import OnnxShrinkError

__all__ = ["DOMAIN", "library_path", "has_library", "session"]

DOMAIN = "ai.onnxshrink"

if sys.platform == "win32":
    _LIB_NAMES = ("onnxshrink_ops.dll",)
elif sys.platform == "darwin":
    _LIB_NAMES = ("libonnxshrink_ops.dylib", "libonnxshrink_ops.so")
else:
    _LIB_NAMES = ("libonnxshrink_ops.so",)


def _find_library() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    for name in _LIB_NAMES:
        path = os.path.join(here, name)
        if os.path.isfile(path):
            return path
    return None


def has_library() -> bool:
    """True when the op library is installed next to this module."""
    return _find_library() is not None


def library_path() -> str:
    """Path of the installed op library; raises OnnxShrinkError when it is missing."""
    path = _find_library()
    if path is None:
        raise OnnxShrinkError(
            "the onnxshrink op library is not installed (built with ONNXSHRINK_NO_KERNELS=1?); "
            f"reinstall without it to use {DOMAIN} ops such as DequantizePacked"
        )
    return path


def kernel_variant(symbol: str) -> str:
    """The kernel variant ("portable", "avx2", "avx512", "avx512_bf16") a session created now would use, from one of the
    library's diagnostic exports: OnnxShrinkSelectedIsa, OnnxShrinkSparseMatMulIsa, OnnxShrinkLowBitMatMulIsa."""
    import ctypes

    function = getattr(ctypes.CDLL(library_path()), symbol)
    function.restype = ctypes.c_char_p
    return function().decode()


def session(
    model: Union[str, os.PathLike, bytes, Any],
    providers: Optional[Sequence[Any]] = None,
    **session_options_kwargs: Any,
):
    """An ``onnxruntime.InferenceSession`` with the op library registered.

    ``model`` is a path, serialized bytes or an ``onnx.ModelProto``. Extra
    keyword arguments are set as ``SessionOptions`` attributes, e.g.
    ``intra_op_num_threads=1`` or ``graph_optimization_level=...``.
    """
    import onnxruntime as ort  # imported lazily: packing/reference code must not need it

    opts = ort.SessionOptions()
    opts.register_custom_ops_library(library_path())
    for name, value in session_options_kwargs.items():
        if not hasattr(opts, name):
            raise OnnxShrinkError(f"onnxruntime.SessionOptions has no attribute {name!r}")
        setattr(opts, name, value)

    from .onnxz import is_packed, is_packed_bytes, unpack_bytes

    if isinstance(model, (str, os.PathLike)):
        source: Union[str, bytes] = os.fspath(model)
        if os.path.isfile(source) and is_packed(source):  # .onnxz: ORT gets the exact bytes it holds
            with open(source, "rb") as handle:
                source = unpack_bytes(handle.read(), source)
    elif isinstance(model, (bytes, bytearray)):
        source = bytes(model)
        if is_packed_bytes(source):
            source = unpack_bytes(source)
    elif hasattr(model, "SerializeToString"):  # onnx.ModelProto, without importing onnx here
        source = model.SerializeToString()
    else:
        raise OnnxShrinkError(f"session() takes a path, bytes or onnx.ModelProto, not {type(model).__name__}")

    if providers is None:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(source, sess_options=opts, providers=list(providers))
