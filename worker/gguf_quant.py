"""GGUF quantized blocks -> QuantizedTensor (kernels/quant.py), without dequantizing.

Each ggml block type is an affine code per group of input features; this file
reads the block bytes into (codes, scale, zero) of kernels/quant.py's form
w = (q - 2**(bits-1)) * scale + zero. The layouts follow gguf-py's own
dequantizers (gguf/quants.py), which the tests use as the independent check:

  type  bytes  group  bits  stored as                              -> scale, zero
  Q4_0   18    32     4     d, 16 B nibbles        w = d (q - 8)      d, 0
  Q4_1   20    32     4     d, m, nibbles          w = d q + m        d, m + 8d
  Q5_0   22    32     5     d, qh u32, nibbles     w = d (q - 16)     d, 0
  Q5_1   24    32     5     d, m, qh u32, nibbles  w = d q + m        d, m + 16d
  Q8_0   34    32     8     d, 32 int8             w = d q            d, 0 (q + 128 stored)
  Q4_K  144    32     4     d, dmin, 12 B 6-bit sub-scales/mins, nibbles
                                       w = d sc q - dmin m              d sc, 8 d sc - dmin m
  Q5_K  176    32     5     as Q4_K plus 32 B of high bits             d sc, 16 d sc - dmin m
  Q6_K  210    16     6     128 B low nibbles, 64 B high 2-bit pairs, 16 int8 sub-scales, d
                                       w = d sc (q - 32)                d sc, 0

Nibbles: in a 32-wide group (Q4_0/1, Q5_0/1) element j < 16 is byte j's low
nibble and element j + 16 its high nibble; in a K-quant's 64-wide chunk the
first 32 elements are the chunk's 32 bytes' low nibbles, the next 32 their
high nibbles. Scales are computed in fp32 from fp16 d (exact), so a weight's
dequantized value equals gguf-py's to fp32 rounding (often bit for bit).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import Q4_K

from folio.kernels.quant import QuantizedTensor


def _f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16).astype(np.float32)  # [nb, 2] bytes -> [nb, 1]


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """[nb, ..., width/2 bytes] -> [nb, ..., width]: low nibbles, then high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """A little-endian uint32 of per-element 5th bits -> [nb, count] of 0/1."""
    word = qh.copy().view(np.uint32)  # [nb, 1]
    return ((word >> np.arange(count, dtype=np.uint32)) & 1).astype(np.uint8)


def _q4_0(b):
    d = _f16(b[:, :2])
    return _nibbles(b[:, 2:], 32), d, np.zeros_like(d)


def _q4_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return _nibbles(b[:, 4:], 32), d, m + 8 * d


def _q5_0(b):
    d = _f16(b[:, :2])
    return _nibbles(b[:, 6:], 32) | (_high_bits(b[:, 2:6], 32) << 4), d, np.zeros_like(d)


def _q5_1(b):
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    return _nibbles(b[:, 8:], 32) | (_high_bits(b[:, 4:8], 32) << 4), d, m + 16 * d


def _q8_0(b):
    d = _f16(b[:, :2])
    codes = b[:, 2:] ^ np.uint8(0x80)  # int8 q + 128 as uint8: its sign bit flipped
    return codes, d, np.zeros_like(d)


def _k_scales(b) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: per-32 scale d*sc and min dmin*m, [nb, 8] each."""
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, m = Q4_K.get_scale_min(b[:, 4:16])
    return d * sc.astype(np.float32), dmin * m.astype(np.float32)


def _q4_k(b):
    nb = b.shape[0]
    scale, mins = _k_scales(b)
    codes = _nibbles(b[:, 16:].reshape(nb, 4, 32), 64).reshape(nb, 256)
    return codes, scale, 8 * scale - mins


def _q5_k(b):
    nb = b.shape[0]
    scale, mins = _k_scales(b)
    low = _nibbles(b[:, 48:].reshape(nb, 4, 32), 64).reshape(nb, 8, 32)
    # qh[l] bit i is the 5th bit of element l of 32-wide sub-block i.
    high = (b[:, 16:48].reshape(nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    return (low | (high << 4)).reshape(nb, 256), scale, 16 * scale - mins


def _q6_k(b):
    nb = b.shape[0]
    ql, qh = b[:, :128].reshape(nb, 2, 64), b[:, 128:192].reshape(nb, 2, 1, 32)
    low = _nibbles(ql, 128).reshape(nb, 2, 4, 32)  # per 128-half: 4 runs of 32
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    codes = (low | (high << 4)).reshape(nb, 256)
    scale = _f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32)
    return codes, scale, np.zeros_like(scale)


# ggml type -> (bytes per block, elements per block, group, bits, decoder)
_BLOCKS = {
    Q.Q4_0: (18, 32, 32, 4, _q4_0),
    Q.Q4_1: (20, 32, 32, 4, _q4_1),
    Q.Q5_0: (22, 32, 32, 5, _q5_0),
    Q.Q5_1: (24, 32, 32, 5, _q5_1),
    Q.Q8_0: (34, 32, 32, 8, _q8_0),
    Q.Q4_K: (144, 256, 32, 4, _q4_k),
    Q.Q5_K: (176, 256, 32, 5, _q5_k),
    Q.Q6_K: (210, 256, 16, 6, _q6_k),
}
KEPT_QUANTIZED = tuple(t.name for t in _BLOCKS)


def block_group(qtype) -> Optional[int]:
    """Input features per scale of a block type folio keeps quantized, else None."""
    block = _BLOCKS.get(qtype)
    return None if block is None else block[2]


def quantized_tensor(data: np.ndarray, qtype, rows: int, cols: int) -> Optional[QuantizedTensor]:
    """The [rows, cols] tensor stored as `qtype` blocks in `data`, kept quantized;
    None for a type folio does not keep quantized (the caller dequantizes it)."""
    if qtype not in _BLOCKS:
        return None
    nbytes, per_block, group, bits, decode = _BLOCKS[qtype]
    if cols % per_block or data.size != rows * cols // per_block * nbytes:
        raise ValueError(f"{qtype.name} tensor of {data.size} bytes is not [{rows}, {cols}] in blocks of {per_block}")
    codes, scale, zero = decode(np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, nbytes))
    groups = cols // group
    return QuantizedTensor(
        torch.from_numpy(np.ascontiguousarray(codes)).view(rows, cols),
        torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32)).view(rows, groups),
        torch.from_numpy(np.ascontiguousarray(zero, dtype=np.float32)).view(rows, groups),
        bits,
        group,
    )
