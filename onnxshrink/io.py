"""Reading and writing models: never touch the input, never leave a half-written output."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import OnnxShrinkError

# protobuf cannot serialize a message past 2 GiB; above this the weights go to a side file.
_PROTOBUF_LIMIT = 2**31 - 1
_EXTERNAL_DATA_MARGIN = 64 * 2**20



def load(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """Return a private copy of `model` (a path or a ModelProto); the input is never modified."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    if not isinstance(model, (str, os.PathLike)):
        raise OnnxShrinkError(f"expected a path or an onnx.ModelProto, got {type(model).__name__}")
    path = Path(model)
    if not path.is_file():
        raise OnnxShrinkError(f"{path}: no such file")
    from .onnxz import is_packed, unpack_bytes  # here: onnxz writes its files with save_bytes below

    try:
        packed = is_packed(path)
        if packed:  # an entropy-coded model (onnxshrink pack) reads like the model it holds
            proto = onnx.load_from_string(unpack_bytes(path.read_bytes(), str(path)))
        else:
            proto = onnx.load(str(path), load_external_data=True)
    except (DecodeError, RuntimeWarning) as exc:
        raise OnnxShrinkError(f"{path}: not an ONNX model (protobuf parse failed: {_first_line(exc)})") from None
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise OnnxShrinkError(f"{path}: cannot read the model ({_first_line(exc)})") from None
    _check_loaded(proto, path, checkable_file=not packed)
    return proto


def _check_loaded(proto: onnx.ModelProto, path: Path, checkable_file: bool) -> None:
    # A truncated or foreign file can still parse as an (empty or partial) protobuf message.
    if proto.ir_version <= 0 or not proto.opset_import or not proto.graph.output:
        raise OnnxShrinkError(f"{path}: not an ONNX model (no ir_version, opset or graph outputs; truncated or another format?)")
    try:
        # The checker reads a file faster than the model it was parsed into serializes again.
        onnx.checker.check_model(str(path) if checkable_file else proto)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise OnnxShrinkError(f"{path}: invalid ONNX model ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def save(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write `model` to `path` atomically: all of it or nothing, an old file untouched on failure.

    Models over 2 GiB are written with their weights in `<name>.data` beside the model.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise OnnxShrinkError(f"{path}: output folder {directory} does not exist")
    with tempfile.TemporaryDirectory(dir=directory, prefix=f".{path.name}.") as staging:
        staged = Path(staging) / path.name
        if model.ByteSize() > _PROTOBUF_LIMIT - _EXTERNAL_DATA_MARGIN:
            copy = load(model)  # conversion rewrites tensors in place; the caller's proto keeps them inline
            onnx.external_data_helper.convert_model_to_external_data(
                copy, all_tensors_to_one_file=True, location=path.name + ".data", size_threshold=1024
            )
            onnx.save_model(copy, str(staged))
            _fsync(Path(staging) / (path.name + ".data"))
            os.replace(Path(staging) / (path.name + ".data"), directory / (path.name + ".data"))
        else:
            staged.write_bytes(model.SerializeToString())
        _fsync(staged)
        os.replace(staged, path)
    return path


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def save_text(path: str | os.PathLike, text: str) -> None:
    """Atomic write of a text file (reports, recipes)."""
    save_bytes(path, text.encode())


def save_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Atomic write of a file: all of it or nothing, an old file untouched on failure."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise OnnxShrinkError(f"{path}: folder {directory} does not exist")
    handle = tempfile.NamedTemporaryFile("wb", dir=directory, prefix=f".{path.name}.", delete=False)
    try:
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        os.unlink(handle.name)
        raise
