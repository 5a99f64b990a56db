""".onnxz: an ONNX file entropy-coded losslessly, Deep Compression's third stage.

The file is cut, by walking protobuf's wire format, into structure (everything but tensor
payloads) and the `raw_data` payloads of tensors (initializers, Constant attributes, subgraphs).
Payloads are grouped by element width and byte-shuffled (byte 0 of every element, then byte 1, ...),
so that slowly varying bytes such as float exponents sit together; structure is one more stream.
Each stream is coded by whichever of zstd and LZMA (Python's lzma, raw LZMA2 with two
literal-context settings) comes out smaller: LZMA's context-modelled literals code sparse or
clustered weight codes and protobuf structure 5-25% smaller than zstd (YOLOv8n clustered to 6 bits:
1.85 MB of codes -> 1.64 MB), while zstd is as small and far faster on float weights. Large streams
are tried on a slice first, so float-heavy models pay only the zstd time. Unpacking interleaves
the pieces back in their original order, so the result is the input file byte for byte, whatever
wrote it; a SHA-256 of the original checks that.

Layout: MAGIC, u32 header length, header (JSON, zstd-compressed: sizes, pieces, streams with
their codec, digest), streams. Files of the first layout (MAGIC_V1: plain JSON header, all
streams zstd) still unpack.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import OnnxShrinkError, UsageError
from .io import save_bytes

MAGIC = b"ONNXZ\x00\x02\x00"
MAGIC_V1 = b"ONNXZ\x00\x01\x00"
LEVEL = 12  # zstd's; 19 packs MiniLM 20x slower (140 s) for 1% less
# LZMA literal-context bits tried per stream: 0 suits 4-bit codes packed two to a byte, 4 a code
# per byte (measured on the digits MLP and YOLOv8n after prune and cluster).
_LZMA_CONTEXTS = (0, 4)
# Streams longer than twice _TRIAL_BYTES try LZMA first on that many bytes, in 8 slices spread over
# the stream, and are LZMA-coded whole only if those came out 5% smaller than with zstd: LZMA packs
# about 1 MB/s, and would take 66 s instead of 3 s on MiniLM's float weights for 0.9% less.
_TRIAL_BYTES, _TRIAL_SLICES, _LZMA_GAIN = 2 << 20, 8, 0.95
_LZMA_DICTIONARY = 16 << 20  # at most; packing needs about 11x this, unpacking 1x
# 1-byte streams are also tried as bit plane + remainder where one symbol is at least this common.
_PLANE_SHARE = 0.4

# TensorProto.data_type -> bytes per element in raw_data (packed 4-bit and 8-bit types: 1).
_ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2,
                  17: 1, 18: 1, 19: 1, 20: 1, 21: 1, 22: 1, 23: 1}

# Where tensors live, as (message, field number) -> message type of that field.
_MESSAGES = {
    ("model", 7): "graph",  # ModelProto.graph
    ("model", 25): "function",  # ModelProto.functions
    ("function", 7): "node",  # FunctionProto.node
    ("graph", 1): "node",  # GraphProto.node
    ("graph", 5): "tensor",  # GraphProto.initializer
    ("graph", 15): "sparse",  # GraphProto.sparse_initializer
    ("sparse", 1): "tensor",  # SparseTensorProto.values
    ("sparse", 2): "tensor",  # SparseTensorProto.indices
    ("node", 5): "attribute",  # NodeProto.attribute
    ("attribute", 5): "tensor",  # AttributeProto.t
    ("attribute", 6): "graph",  # AttributeProto.g
    ("attribute", 10): "tensor",  # AttributeProto.tensors
    ("attribute", 11): "graph",  # AttributeProto.graphs
}
_DATA_TYPE, _RAW_DATA = 2, 9  # TensorProto fields


@dataclass
class PackReport:
    original_bytes: int
    packed_bytes: int
    groups: dict  # element width -> {"tensors", "elements", "bytes", "packed", "codec"}
    structure: tuple[int, int, str]  # (bytes, packed, codec)

    def lines(self) -> list[str]:
        out = [f"{self.original_bytes:,} -> {self.packed_bytes:,} bytes "
               f"({self.packed_bytes / max(self.original_bytes, 1):.3f}x)"]
        for width, g in sorted(self.groups.items()):
            out.append(f"  {g['tensors']} tensors of {width}-byte elements: {g['bytes']:,} -> {g['packed']:,} bytes "
                       f"({g['codec']}), {8 * g['packed'] / max(g['elements'], 1):.2f} bits per element "
                       f"(stored {8 * width})")
        out.append(f"  structure: {self.structure[0]:,} -> {self.structure[1]:,} bytes ({self.structure[2]})")
        return out


def pack_bytes(data: bytes, level: int = LEVEL) -> tuple[bytes, PackReport]:
    import zstandard

    pieces = _split(data)
    structure, groups = bytearray(), {}
    order = []  # ("s", length) or (width, length)
    for kind, start, end, width in pieces:
        if kind == "s":
            structure += data[start:end]
            order.append(("s", end - start))
        else:
            groups.setdefault(width, []).append(_shuffle(data[start:end], width))
            order.append((width, end - start))
    raw = [("s", bytes(structure))] + [(width, b"".join(parts)) for width, parts in sorted(groups.items())]
    streams = [(key, *(_encode_codes(blob, level) if key == 1 else _encode(blob, level))) for key, blob in raw]
    header = json.dumps({"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pieces": order,
                         "streams": [[key, len(blob), codec] for key, codec, blob in streams]},
                        separators=(",", ":")).encode()
    header = zstandard.ZstdCompressor(level=19).compress(header)  # hundreds of pieces: a small model's 5%
    packed = MAGIC + struct.pack("<I", len(header)) + header + b"".join(blob for _, _, blob in streams)
    if unpack_bytes(packed, "pack") != data:  # a fraction of the packing time, and nothing is ever lost
        raise OnnxShrinkError("pack: the packed bytes do not unpack to the input (a codec fault); nothing written")
    coded = {key: (len(blob), _codec_name(codec)) for key, codec, blob in streams}
    report = PackReport(len(data), len(packed), {
        width: {"tensors": len(parts), "bytes": sum(map(len, parts)), "packed": coded[width][0],
                "codec": coded[width][1], "elements": sum(map(len, parts)) // width}
        for width, parts in groups.items()},
        (len(structure), *coded["s"]))
    return packed, report


def unpack_bytes(packed: bytes, origin: str = "input") -> bytes:
    import zstandard

    if not is_packed_bytes(packed):
        raise OnnxShrinkError(f"{origin}: not an .onnxz file (bad magic)")
    try:
        (length,) = struct.unpack_from("<I", packed, len(MAGIC))
        start = len(MAGIC) + 4
        header = packed[start:start + length]
        if packed.startswith(MAGIC):
            header = zstandard.ZstdDecompressor().decompress(header)
        header = json.loads(header)
        offset = start + length
        streams = {}
        for key, size, *codec in header["streams"]:  # the first layout names no codec: zstd
            if offset + size > len(packed):
                raise ValueError("truncated")
            streams[key] = _decode(packed[offset:offset + size], codec[0] if codec else "zstd")
            offset += size
        if offset != len(packed):
            raise ValueError("trailing bytes")
    except (struct.error, ValueError, KeyError, TypeError, IndexError, zstandard.ZstdError, lzma.LZMAError) as exc:
        raise OnnxShrinkError(f"{origin}: truncated or corrupt .onnxz ({exc})") from None
    cursors = dict.fromkeys(streams, 0)
    out = bytearray()
    try:
        # Payloads of one width were shuffled one by one, so they unshuffle one by one, in order.
        for key, size in header["pieces"]:
            chunk = streams[key][cursors[key]:cursors[key] + size]
            if len(chunk) != size:
                raise ValueError("a stream is shorter than its pieces")
            cursors[key] += size
            out += chunk if key == "s" else _unshuffle(chunk, key)
    except (KeyError, ValueError, TypeError) as exc:
        raise OnnxShrinkError(f"{origin}: corrupt .onnxz ({exc})") from None
    if len(out) != header["size"] or hashlib.sha256(out).hexdigest() != header["sha256"]:
        raise OnnxShrinkError(f"{origin}: corrupt .onnxz (content does not match its checksum)")
    return bytes(out)


def is_packed_bytes(data: bytes) -> bool:
    return data.startswith(MAGIC) or data.startswith(MAGIC_V1)


def is_packed(path: str | os.PathLike) -> bool:
    with open(path, "rb") as handle:
        return is_packed_bytes(handle.read(len(MAGIC)))


def pack_file(source: str | os.PathLike, target: str | os.PathLike, level: int = LEVEL) -> PackReport:
    from .io import load

    source, target = Path(source), Path(target)
    if source.resolve() == target.resolve():
        raise UsageError("the output path is the input path; onnxshrink never overwrites its input")
    load(source)  # refuse what is not a valid ONNX model before spending time on it
    if (source.parent / (source.name + ".data")).exists() or _has_external_data(source):
        raise OnnxShrinkError(f"{source}: weights in an external data file are not packed; pack a single-file model")
    packed, report = pack_bytes(source.read_bytes(), level)
    save_bytes(target, packed)
    return report


def unpack_file(source: str | os.PathLike, target: str | os.PathLike) -> int:
    source, target = Path(source), Path(target)
    if source.resolve() == target.resolve():
        raise UsageError("the output path is the input path; onnxshrink never overwrites its input")
    if not source.is_file():
        raise OnnxShrinkError(f"{source}: no such file")
    data = unpack_bytes(source.read_bytes(), str(source))
    save_bytes(target, data)
    return len(data)


# ---------------------------------------------------------------- stream codecs
def _encode(blob: bytes, level: int) -> tuple[str | list, bytes]:
    """(codec, coded bytes): zstd at `level`, or raw LZMA2 where that comes out smaller. A codec is
    "zstd" or ["lzma2", literal-context bits, dictionary size]: what the decoder must be told."""
    import zstandard

    best: tuple = ("zstd", zstandard.ZstdCompressor(level=level).compress(blob))
    contexts = _LZMA_CONTEXTS
    if len(blob) > 2 * _TRIAL_BYTES:
        step, width = len(blob) // _TRIAL_SLICES, _TRIAL_BYTES // _TRIAL_SLICES
        trial = b"".join(blob[i * step:i * step + width] for i in range(_TRIAL_SLICES))
        zstd_trial = len(zstandard.ZstdCompressor(level=level).compress(trial))
        sizes = {lc: len(_lzma(trial, lc, _dictionary(trial))[1]) for lc in contexts}
        lc = min(sizes, key=sizes.get)
        contexts = (lc,) if sizes[lc] < _LZMA_GAIN * zstd_trial else ()
    for lc in contexts:
        codec, coded = _lzma(blob, lc, _dictionary(blob))
        if len(coded) < len(best[1]):
            best = (codec, coded)
    return best


def _encode_codes(blob: bytes, level: int) -> tuple[str | list, bytes]:
    """A stream of 1-byte elements (clustered codes, 4 bits to a byte, or int8 weights): as _encode,
    or, where it codes smaller, as two planes: a bit per symbol (4-bit nibble or byte) for whether
    it differs from the most common symbol (a pruned weight's code), and the symbols that differ.
    LZMA models the sparse bit plane and the dense remainder apart far better than their mix: the
    digits MLP's codes after prune(0.9) and cluster(bits=4), 4,759 -> 4,285 bytes.
    Codec: ["planes", bits, symbol, length, coded bit-plane length, its codec, the rest's codec]."""
    best = _encode(blob, level)
    data = np.frombuffer(blob, np.uint8)
    for bits in (4, 8):
        symbols = _symbols(data, bits)
        counts = np.bincount(symbols, minlength=1 << bits)
        symbol = int(np.argmax(counts))
        if counts[symbol] < _PLANE_SHARE * symbols.size:
            continue
        differs = symbols != symbol
        rest = symbols[differs]
        if bits == 4:
            rest = np.append(rest, np.zeros(rest.size % 2, np.uint8))
            rest = rest[0::2] | (rest[1::2] << 4)
        plane_codec, plane = _encode(np.packbits(differs).tobytes(), level)
        rest_codec, coded = _encode(rest.astype(np.uint8).tobytes(), level)
        if len(plane) + len(coded) < len(best[1]):
            best = (["planes", bits, symbol, len(blob), len(plane), plane_codec, rest_codec], plane + coded)
    return best


def _symbols(data: np.ndarray, bits: int) -> np.ndarray:
    """Bytes as 4-bit symbols (low nibble first) or as they are."""
    if bits == 8:
        return data
    return np.stack([data & 15, data >> 4], axis=1).reshape(-1)


def _unplanes(blob: bytes, codec) -> bytes:
    _, bits, symbol, length, plane_size, plane_codec, rest_codec = codec
    if bits not in (4, 8) or not 0 <= symbol < (1 << bits) or not 0 <= plane_size <= len(blob) or length < 0 \
            or "planes" in (plane_codec[0], rest_codec[0]):  # planes are coded by zstd or LZMA, never nested
        raise ValueError(f"unknown stream codec {codec!r}")
    count = length * 8 // bits
    differs = np.unpackbits(np.frombuffer(_decode(blob[:plane_size], plane_codec), np.uint8))[:count].astype(bool)
    rest = np.frombuffer(_decode(blob[plane_size:], rest_codec), np.uint8)
    if bits == 4:
        rest = _symbols(rest, 4)
    if differs.size != count or rest.size < differs.sum():
        raise ValueError("a code plane is shorter than its stream")
    symbols = np.full(count, symbol, np.uint8)
    symbols[differs] = rest[:int(differs.sum())]
    if bits == 4:
        symbols = symbols[0::2] | (symbols[1::2] << 4)
    return symbols.tobytes()


def _decode(blob: bytes, codec) -> bytes:
    import zstandard

    if codec == "zstd":
        return zstandard.ZstdDecompressor().decompress(blob)
    if codec[0] == "planes":
        return _unplanes(blob, codec)
    name, lc, dictionary = codec
    if name != "lzma2" or not (0 <= lc <= 4 and 4096 <= dictionary <= _LZMA_DICTIONARY):
        raise ValueError(f"unknown stream codec {codec!r}")
    return lzma.decompress(blob, format=lzma.FORMAT_RAW, filters=[
        {"id": lzma.FILTER_LZMA2, "lc": lc, "lp": 0, "pb": 0, "dict_size": dictionary}])


def _lzma(blob: bytes, lc: int, dictionary: int) -> tuple[list, bytes]:
    coded = lzma.compress(blob, format=lzma.FORMAT_RAW, filters=[
        {"id": lzma.FILTER_LZMA2, "preset": 9, "lc": lc, "lp": 0, "pb": 0, "dict_size": dictionary}])
    return ["lzma2", lc, dictionary], coded


def _dictionary(blob: bytes) -> int:
    """The smallest power of two that holds the stream (4 KiB at least, _LZMA_DICTIONARY at most):
    all LZMA can use, and what unpacking then allocates."""
    return min(max(4096, 1 << max(len(blob) - 1, 1).bit_length()), _LZMA_DICTIONARY)


def _codec_name(codec) -> str:
    if isinstance(codec, str):
        return codec
    if codec[0] == "planes":
        return f"{codec[1]}-bit planes: {_codec_name(codec[5])} + {_codec_name(codec[6])}"
    return f"lzma2 lc={codec[1]}"


# ---------------------------------------------------------------- wire format
def _split(data: bytes) -> list[tuple[str, int, int, int]]:
    """[("s", start, end, 0) | ("p", start, end, width)] covering `data` in order."""
    payloads: list[tuple[int, int, int]] = []
    _walk(data, 0, len(data), "model", payloads)
    pieces, cursor = [], 0
    for start, end, width in payloads:
        if start > cursor:
            pieces.append(("s", cursor, start, 0))
        pieces.append(("p", start, end, width))
        cursor = end
    if cursor < len(data):
        pieces.append(("s", cursor, len(data), 0))
    return pieces


def _walk(data: bytes, start: int, end: int, kind: str, payloads: list) -> None:
    position, data_type, raw = start, None, None
    while position < end:
        key, position = _varint(data, position, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, position = _varint(data, position, end)
            if kind == "tensor" and field == _DATA_TYPE:
                data_type = value
        elif wire == 1:
            position += 8
        elif wire == 5:
            position += 4
        elif wire == 2:
            length, position = _varint(data, position, end)
            if position + length > end:
                raise OnnxShrinkError("not an ONNX model (a field runs past the end of its message)")
            child = _MESSAGES.get((kind, field))
            if child:
                _walk(data, position, position + length, child, payloads)
            elif kind == "tensor" and field == _RAW_DATA:
                raw = (position, position + length)
            position += length
        else:
            raise OnnxShrinkError(f"not an ONNX model (protobuf wire type {wire} at byte {position})")
    if raw and raw[1] > raw[0]:
        width = _ELEMENT_BYTES.get(data_type, 1)
        payloads.append((raw[0], raw[1], width if (raw[1] - raw[0]) % width == 0 else 1))


def _varint(data: bytes, position: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if position >= end:
            raise OnnxShrinkError("not an ONNX model (a protobuf varint runs past its message)")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _shuffle(chunk: bytes, width: int) -> bytes:
    if width == 1:
        return chunk
    return np.frombuffer(chunk, np.uint8).reshape(-1, width).T.tobytes()


def _unshuffle(chunk: bytes, width: int) -> bytes:
    if width == 1:
        return chunk
    return np.frombuffer(chunk, np.uint8).reshape(width, -1).T.tobytes()


def _has_external_data(path: Path) -> bool:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
