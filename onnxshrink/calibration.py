"""Sample and calibration data: streamed from .npz files, checked against the model up front.

An .npz holds one array per model input. An array of the input's rank + 1 is a stack of
exact feeds (the way to give scalar or non-batch-first inputs such as an RNN state); an array
of the input's own rank whose first axis is the batch is split into batch-1 samples.
Samples are read one at a time from the file, so memory does not grow with the sample count.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx

from .errors import OnnxShrinkError

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple  # ints for fixed dims, None for dynamic ones
    dim_names: tuple = ()  # the dynamic dims' symbolic names (dim_param), None where unnamed

    @property
    def batch_first(self) -> bool:
        return bool(self.shape) and self.shape[0] is None


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:  # old exporters list weights as inputs too
            continue
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise OnnxShrinkError(f"input '{value.name}' is not a tensor (sequence/map inputs are not supported)")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                      for d in tensor_type.shape.dim) if tensor_type.HasField("shape") else None
        names = tuple(d.dim_param or None for d in tensor_type.shape.dim) if tensor_type.HasField("shape") else ()
        specs.append(InputSpec(value.name, np.dtype(dtype), shape, names))
    return specs


class CalibrationData:
    """A re-iterable stream of feeds (dict input name -> array), checked against the model's inputs."""

    def __init__(self, open_stream: Callable[[], Iterator[Feed]], inputs: list[InputSpec], real: bool, origin: str):
        self._open = open_stream
        self.inputs = inputs
        self.real = real
        self.origin = origin

    def __iter__(self) -> Iterator[Feed]:
        for index, feed in enumerate(self._open()):
            yield check_feed(feed, self.inputs, f"{self.origin} sample {index}")

    def take(self, count: int) -> list[Feed]:
        return list(islice(iter(self), count))


def open_data(source, model: onnx.ModelProto, synthesize_count: int = 8) -> CalibrationData:
    """`source`: None (synthesized), an .npz path, a folder of .npz files, an iterable of feeds or a callable returning one."""
    inputs = model_inputs(model)
    if source is None:
        return CalibrationData(lambda: synthesize(inputs, synthesize_count), inputs, real=False, origin="synthesized data")
    if isinstance(source, CalibrationData):
        return CalibrationData(source._open, inputs, source.real, source.origin)
    if isinstance(source, (str, Path)):
        path = Path(source)
        files = sorted(path.glob("*.npz")) if path.is_dir() else [path]
        if not path.exists():
            raise OnnxShrinkError(f"{path}: no such calibration file or folder")
        if not files:
            raise OnnxShrinkError(f"{path}: folder holds no .npz files")
        for file in files:  # open each once now so a bad file fails before any pass runs
            NpzSamples(file, inputs).count
        return CalibrationData(lambda: (s for f in files for s in NpzSamples(f, inputs)), inputs, True, str(path))
    if callable(source):
        return CalibrationData(source, inputs, True, "calibration data")
    if isinstance(source, dict):
        raise OnnxShrinkError("calibration data: give an iterable of feed dicts (a list of one dict is fine), not a dict")
    if iter(source) is source:  # a one-shot iterator cannot be replayed: keep what it yields
        source = list(source)
    return CalibrationData(lambda: iter(source), inputs, True, "calibration data")


def check_feed(feed: Feed, inputs: list[InputSpec], where: str) -> Feed:
    if not isinstance(feed, dict):
        raise OnnxShrinkError(f"{where}: expected a dict of input name -> array, got {type(feed).__name__}")
    names = {spec.name for spec in inputs}
    extra = sorted(set(feed) - names)
    if extra:
        raise OnnxShrinkError(f"{where}: '{extra[0]}' is not a model input (inputs: {', '.join(sorted(names))})")
    checked = {}
    for spec in inputs:
        if spec.name not in feed:
            raise OnnxShrinkError(f"{where}: input '{spec.name}' is missing")
        value = np.asarray(feed[spec.name])
        if value.dtype != spec.dtype:
            raise OnnxShrinkError(f"{where}: input '{spec.name}' is {value.dtype}, the model takes {spec.dtype}")
        _check_shape(spec, value.shape, where)
        checked[spec.name] = value
    return checked


def _check_shape(spec: InputSpec, shape: tuple, where: str) -> None:
    if spec.shape is None:
        return
    if len(shape) != len(spec.shape) or any(want is not None and want != got for want, got in zip(spec.shape, shape)):
        want = "x".join("?" if d is None else str(d) for d in spec.shape) or "scalar"
        got = "x".join(map(str, shape)) or "scalar"
        raise OnnxShrinkError(f"{where}: input '{spec.name}' has shape {got}, the model takes {want}")


class NpzSamples:
    """Reads samples from one .npz lazily: each sample is a seek and a read, never the whole array."""

    def __init__(self, path: Path, inputs: list[InputSpec]):
        self.path = path
        try:
            with zipfile.ZipFile(path) as archive:
                members = {Path(n).stem: n for n in archive.namelist() if n.endswith(".npy")}
                headers = {name: _npy_header(archive, member) for name, member in members.items()}
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise OnnxShrinkError(f"{path}: not a readable .npz file ({exc})") from None
        names = {spec.name for spec in inputs}
        extra = sorted(set(headers) - names)
        if extra:
            raise OnnxShrinkError(f"{path}: array '{extra[0]}' is not a model input (inputs: {', '.join(sorted(names))})")
        self.layout = {}
        counts = set()
        for spec in inputs:
            if spec.name not in headers:
                raise OnnxShrinkError(f"{path}: no array for input '{spec.name}'")
            shape, dtype, offset = headers[spec.name]
            if dtype != spec.dtype:
                raise OnnxShrinkError(f"{path}: array '{spec.name}' is {dtype}, the model takes {spec.dtype}")
            rank = len(spec.shape) if spec.shape is not None else len(shape) - 1
            if len(shape) == rank + 1:
                sample_shape, keep_axis = shape[1:], False
            elif len(shape) == rank and spec.batch_first:
                sample_shape, keep_axis = (1,) + shape[1:], True
            else:
                raise OnnxShrinkError(
                    f"{path}: array '{spec.name}' has rank {len(shape)}; the input has rank {rank}: stack samples "
                    f"on a new leading axis (rank {rank + 1})" + (" or give a batch (same rank)" if spec.batch_first else ""))
            _check_shape(spec, sample_shape, f"{path}")
            counts.add(shape[0])
            self.layout[spec.name] = (members[spec.name], sample_shape, dtype, offset, keep_axis)
        if len(counts) > 1:
            raise OnnxShrinkError(f"{path}: arrays hold different sample counts {sorted(counts)}")
        self.count = counts.pop() if counts else 0

    def __iter__(self) -> Iterator[Feed]:
        with zipfile.ZipFile(self.path) as archive:
            handles = {name: archive.open(member) for name, (member, *_rest) in self.layout.items()}
            try:
                for index in range(self.count):
                    yield {name: self._read(handles[name], index, *self.layout[name][1:]) for name in self.layout}
            finally:
                for handle in handles.values():
                    handle.close()

    @staticmethod
    def _read(handle, index, sample_shape, dtype, offset, keep_axis) -> np.ndarray:
        size = int(np.prod(sample_shape, dtype=np.int64)) * dtype.itemsize
        handle.seek(offset + index * size)
        return np.frombuffer(handle.read(size), dtype=dtype).reshape(sample_shape).copy()


def _npy_header(archive: zipfile.ZipFile, member: str):
    with archive.open(member) as handle:
        version = np.lib.format.read_magic(handle)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"array '{member}' uses .npy format {version}; save it with numpy's default format")
        shape, fortran, dtype = readers[version](handle)
        if fortran and len(shape) > 1:
            raise ValueError(f"array '{member}' is Fortran-ordered; save it C-ordered")
        if dtype.hasobject:
            raise ValueError(f"array '{member}' holds Python objects")
        return tuple(shape), dtype, handle.tell()


def synthesize(inputs: list[InputSpec], count: int, seed: int = 0) -> Iterator[Feed]:
    """Stand-in feeds from the declared types: normal floats, ones for integers (safe as ids and masks).

    A symbolic dim gets one value across all inputs (a batch dim shared by an input and an RNN
    state must agree): 1 where it is a batch dim, else 32."""
    rng = np.random.default_rng(seed)
    batch_like = {spec.dim_names[0] for spec in inputs if spec.dim_names and spec.dim_names[0]}
    def size(name, axis):
        if name:
            return 1 if name in batch_like or "batch" in name.lower() else 32
        return 1 if axis == 0 else 32
    for _ in range(count):
        feed = {}
        for spec in inputs:
            names = spec.dim_names or (None,) * len(spec.shape or ())
            shape = tuple(d if d is not None else size(names[axis], axis) for axis, d in enumerate(spec.shape or ()))
            if spec.dtype.kind == "f":
                feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            elif spec.dtype.kind == "b":
                feed[spec.name] = np.ones(shape, dtype=bool)
            else:
                feed[spec.name] = np.ones(shape, dtype=spec.dtype)
        yield feed
