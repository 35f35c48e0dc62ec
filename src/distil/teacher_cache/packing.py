"""The codes of the packed store formats: ids in the fewest bits the vocabulary needs, log-probabilities as
few-bit steps below a per-position anchor.

Ids: b = ceil(log2 vocabulary) bits each (16 for 49,152 or 65,536 entries, 17 for 128k, where the unpacked store
needs int32), bit-packed little-endian into whole bytes per row, so that a row stays a fixed-width slice of a
memory-mapped array.

The top-k ids of a row are a set (their order is the log-probabilities' order, which the reader restores by
sorting): stored sorted, as an Elias-Fano code, they take k (2 + log2(V / k)) bits or less, near the log2 C(V, k)
bits any code of a k-subset needs, and the same for every row, so rows stay fixed-width: the low l = floor(log2(V /
k)) bits of each id packed as above, then the high bits as a bit vector of k + (V - 1 >> l) + 1 bits with a one at
(id >> l) + i for the i-th smallest id. At k = 32 of 49,152 ids that is 50 bytes for the 64 of 16-bit ids.

Log-probabilities: each row's values v are coded as round((a - v) / s) in q bits, with a = the row's largest value
rounded up to float16 and s = (a - min v) / (2^q - 1) rounded up to float16, so every value decodes to within s / 2
(`quantisation_bound`). Uniform steps in log space are the right ones for the KL: the cost of an error d_i in
log p_i, once the reader renormalises the top-k to 1 - R, is about half the variance of d under p (a common shift
costs nothing), at most s^2 / 8 nats per position (an exponential tilt of range s).
"""

from __future__ import annotations

import math

import numpy as np


def id_bits(vocab_size: int) -> int:
    """Bits of one id of a vocabulary of `vocab_size` entries."""
    return max(1, math.ceil(math.log2(max(vocab_size, 2))))


def packed_width(count: int, bits: int) -> int:
    """Bytes of one row of `count` values of `bits` bits."""
    return -(-count * bits // 8)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """(rows, count) non-negative integers < 2^bits -> (rows, packed_width(count, bits)) uint8, little-endian."""
    values = np.asarray(values)
    rows = values.shape[0]
    if bits == 8:
        return np.ascontiguousarray(values, dtype=np.uint8)
    if bits == 16:   # the same bytes as the bit-by-bit layout below (parity: tests/test_store_format.py)
        return np.ascontiguousarray(values, dtype="<u2").view(np.uint8).reshape(rows, -1)
    planes = (np.asarray(values, dtype=np.uint32)[..., None] >> np.arange(bits, dtype=np.uint32)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(rows, -1), axis=1, bitorder="little")


def unpack_bits(packed: np.ndarray, count: int, bits: int) -> np.ndarray:
    """The inverse of `pack_bits`: (rows, count) int64."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    rows = packed.shape[0]
    if bits == 8:
        return packed[:, :count].astype(np.int64)
    if bits == 16:
        return packed.view("<u2").reshape(rows, -1)[:, :count].astype(np.int64)
    planes = np.unpackbits(packed, axis=1, count=count * bits, bitorder="little").reshape(rows, count, bits)
    out = np.zeros((rows, count), dtype=np.int64)
    for bit in range(bits):
        out |= planes[:, :, bit].astype(np.int64) << bit
    return out


def elias_fano_bits(count: int, universe: int) -> tuple[int, int]:
    """(low bits per value, length of the high bit vector) of an Elias-Fano code of `count` values in [0, universe)."""
    low = max(0, int(math.floor(math.log2(universe / count)))) if count else 0
    return low, count + ((universe - 1) >> low) + 1


def elias_fano_width(count: int, universe: int) -> int:
    """Bytes of one row of `elias_fano_pack`."""
    low, high = elias_fano_bits(count, universe)
    return packed_width(count, low) + packed_width(high, 1)


def elias_fano_pack(values: np.ndarray, universe: int) -> np.ndarray:
    """(rows, count) integers in [0, universe), each row non-decreasing -> (rows, elias_fano_width) uint8."""
    values = np.asarray(values, dtype=np.int64)
    rows, count = values.shape
    low, high = elias_fano_bits(count, universe)
    low_part = pack_bits(values & ((1 << low) - 1), low) if low else np.zeros((rows, 0), np.uint8)
    ones = np.zeros((rows, high), dtype=np.uint8)
    ones[np.arange(rows)[:, None], (values >> low) + np.arange(count)] = 1
    return np.concatenate([low_part, np.packbits(ones, axis=1, bitorder="little")], axis=1)


def elias_fano_unpack(packed: np.ndarray, count: int, universe: int) -> np.ndarray:
    """The inverse of `elias_fano_pack`: (rows, count) int64, each row non-decreasing."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    rows = packed.shape[0]
    low, high = elias_fano_bits(count, universe)
    split = packed_width(count, low)
    lows = unpack_bits(packed[:, :split], count, low) if low else np.zeros((rows, count), np.int64)
    ones = np.unpackbits(packed[:, split:], axis=1, count=high, bitorder="little")
    positions = np.nonzero(ones)[1].reshape(rows, count)   # row-major: each row's ones in increasing order
    return ((positions - np.arange(count)) << low) | lows


def float16_at_least(x: np.ndarray) -> np.ndarray:
    """x rounded to float16 upwards: the smallest float16 >= x."""
    x = np.asarray(x, dtype=np.float32)
    h = x.astype(np.float16)
    low = h.astype(np.float32) < x
    h[low] = np.nextafter(h[low], np.float16(np.inf))
    return h


def quantise_below(values: np.ndarray, anchor: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes (rows, n) int64 in [0, 2^bits), steps (rows,) float16) of values (rows, n) <= anchor (rows,)."""
    levels = (1 << bits) - 1
    offsets = np.maximum(anchor.astype(np.float64)[:, None] - values.astype(np.float64), 0.0)
    steps = float16_at_least(offsets.max(axis=1, initial=0.0) / levels)
    scale = steps.astype(np.float64)
    scale[scale == 0] = 1.0   # every offset is 0: any step codes them as 0
    codes = np.minimum(np.rint(offsets / scale[:, None]), levels).astype(np.int64)
    return codes, steps


def dequantise_below(codes: np.ndarray, anchor: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """(rows, n) float32 values from `quantise_below`'s codes."""
    return (anchor.astype(np.float32)[:, None] - codes.astype(np.float32) * steps.astype(np.float32)[:, None])


def quantisation_bound(steps: np.ndarray) -> np.ndarray:
    """The largest error of a decoded value, per row: half a step (float32 rounding aside)."""
    return np.asarray(steps, dtype=np.float32) / 2
