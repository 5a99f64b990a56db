"""Sub-byte code packing and block-wise quantization (pure numpy, no onnxruntime).

Bit layout (shared with the ``ai.onnxshrink::DequantizePacked`` op): codes form
a flat row-major stream; code ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of
the little-endian bit stream (LSB-first within each byte), so a code may
straddle two bytes. The packed size is ``ceil(count * bits / 8)`` bytes.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "pack_codes",
    "unpack_codes",
    "packed_nbytes",
    "dequantize_packed_reference",
    "quantize_blockwise",
]


def _check_bits(bits: int) -> int:
    bits = int(bits)
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return bits


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes needed to pack ``count`` codes of width ``bits``."""
    return (int(count) * _check_bits(bits) + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 codes (any shape, flattened row-major) into a 1-D uint8 stream."""
    bits = _check_bits(bits)
    codes = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    if codes.size and int(codes.max()) >> bits:
        raise ValueError(f"codes do not fit in {bits} bits (max {int(codes.max())})")
    if bits == 8:
        return codes.copy()
    # Expand every code into its bits (LSB first), concatenate, and let
    # np.packbits(bitorder="little") rebuild bytes; this is exactly the
    # LSB-first stream layout, including codes that straddle bytes.
    bit_matrix = (codes[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(bit_matrix.reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: the first ``count`` codes as a 1-D uint8 array."""
    bits = _check_bits(bits)
    count = int(count)
    packed = np.ascontiguousarray(packed, dtype=np.uint8).reshape(-1)
    need = packed_nbytes(count, bits)
    if packed.size < need:
        raise ValueError(f"packed stream has {packed.size} bytes, {count} codes of {bits} bits need {need}")
    if bits == 8:
        return packed[:count].copy()
    stream = np.unpackbits(packed[:need], bitorder="little")[: count * bits]
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (stream.reshape(count, bits).astype(np.uint16) @ weights).astype(np.uint8)


def _rows_cols(shape: Sequence[int]) -> Tuple[int, int]:
    shape = [int(d) for d in shape]
    if not shape or any(d < 0 for d in shape):
        raise ValueError(f"bad shape {shape}")
    return math.prod(shape[:-1]), shape[-1]


def dequantize_packed_reference(
    codes: np.ndarray,
    scales: np.ndarray,
    zero_points: Optional[np.ndarray],
    bits: int,
    block_size: int,
    shape: Sequence[int],
) -> np.ndarray:
    """Numpy reference of ``ai.onnxshrink::DequantizePacked`` (float32 of ``shape``).

    ``out[r, c] = (code[r*cols + c] - zp[r, c // block_size]) * scale[r, c // block_size]``;
    ``zero_points=None`` means ``2**(bits-1)``.
    """
    bits = _check_bits(bits)
    if int(block_size) <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    rows, cols = _rows_cols(shape)
    n_blocks = -(-cols // int(block_size))
    scales = np.asarray(scales, dtype=np.float32)
    if scales.shape != (rows, n_blocks):
        raise ValueError(f"scales must have shape {(rows, n_blocks)}, got {scales.shape}")
    q = unpack_codes(codes, bits, rows * cols).reshape(rows, cols).astype(np.int32)
    block_of_col = np.arange(cols) // int(block_size)
    if zero_points is None:
        zp = np.full((rows, n_blocks), 1 << (bits - 1), dtype=np.int32)
    else:
        zp = np.asarray(zero_points, dtype=np.uint8)
        if zp.shape != (rows, n_blocks):
            raise ValueError(f"zero_points must have shape {(rows, n_blocks)}, got {zp.shape}")
        zp = zp.astype(np.int32)
    # Integer subtract, then one float32 multiply: the op computes it the same way.
    diff = (q - zp[:, block_of_col]).astype(np.float32)
    out = diff * scales[:, block_of_col]
    return out.reshape([int(d) for d in shape])


def quantize_blockwise(
    w: np.ndarray, bits: int, block_size: int, symmetric: bool = True
) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """Round-to-nearest block-wise quantization along the last axis.

    Returns ``(packed, scales[rows, n_blocks], zero_points or None)`` such that
    ``dequantize_packed_reference(packed, scales, zero_points, bits, block_size, w.shape)``
    approximates ``w`` within ``scale / 2`` per element (symmetric bits=1 excepted:
    its single positive level is the zero point). Symmetric mode uses the
    op's implicit zero point ``2**(bits-1)`` (so none is stored); asymmetric mode
    stores a per-block uint8 zero point.
    """
    bits = _check_bits(bits)
    block_size = int(block_size)
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, got {block_size}")
    w = np.asarray(w, dtype=np.float32)
    if w.ndim < 1:
        raise ValueError("w must have at least one dimension")
    rows, cols = _rows_cols(w.shape)
    n_blocks = -(-cols // block_size)
    qmax = (1 << bits) - 1

    # Pad the last block with zeros so every block has block_size columns;
    # both modes include 0 in each block's range anyway, so padding is inert.
    w2 = np.zeros((rows, n_blocks * block_size), dtype=np.float32)
    w2[:, :cols] = w.reshape(rows, cols)
    blocks = w2.reshape(rows, n_blocks, block_size)

    if symmetric:
        zp_val = 1 << (bits - 1)
        # Codes span [zp - 2^(b-1), zp + 2^(b-1) - 1]; scale by the larger side
        # that is representable (for bits=1 only the negative side exists).
        pos_steps = max(qmax - zp_val, 1)
        amax = np.abs(blocks).max(axis=2)
        scales = (amax / pos_steps).astype(np.float32)
        scales[scales == 0] = 1.0  # all-zero block: any scale works, avoid 0-division
        q = np.rint(blocks / scales[:, :, None]) + zp_val
        zero_points = None
    else:
        # Keeping 0 inside the range makes zero exactly representable and
        # the rounded zero point stay within [0, qmax].
        wmin = np.minimum(blocks.min(axis=2), 0.0)
        wmax = np.maximum(blocks.max(axis=2), 0.0)
        scales = ((wmax - wmin) / qmax).astype(np.float32)
        scales[scales == 0] = 1.0
        zp = np.clip(np.rint(-wmin / scales), 0, qmax).astype(np.uint8)
        q = np.rint(blocks / scales[:, :, None]) + zp[:, :, None]
        zero_points = zp
    q = np.clip(q, 0, qmax).astype(np.uint8)
    codes = q.reshape(rows, n_blocks * block_size)[:, :cols]
    return pack_codes(codes, bits), scales, zero_points
