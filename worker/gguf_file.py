"""A GGUF file's metadata and tensor descriptions, read in one pass.

gguf-py's GGUFReader makes a numpy view of every element of every metadata
array, and a vocabulary is one: SmolLM2's 49k tokens took 5 s to read on two
cores, Gemma 3's 262k about 20 s, and a `folio serve` start reads the file
three times (the head for the config and the quantization, each worker for the
weights). Here an array of numbers is one np.frombuffer and an array of strings
a loop over their lengths: SmolLM2's file opens in a tenth of a second. Tensor
data stays a view of one read-only memory map, shaped as gguf-py shapes it, and
the block layouts and dequantizers stay gguf-py's (worker/gguf_loader.py).

The container (GGUF versions 2 and 3, little-endian): "GGUF", u32 version, u64
tensor count, u64 metadata count; each metadata entry a string key, a u32 value
type and the value; each tensor a string name, u32 dimension count, u64
dimensions (fastest-varying first), u32 ggml type and u64 offset into the data,
which starts at the next multiple of general.alignment (32 unless set). A string
is a u64 length and UTF-8 bytes; an array a u32 element type, u64 count, elements.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, quant_shape_to_byte_shape
from gguf import GGUFValueType as V

VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
# Fixed-size value types -> numpy dtype (little-endian)
_NUMBERS = {
    V.UINT8: np.dtype("<u1"),
    V.INT8: np.dtype("<i1"),
    V.UINT16: np.dtype("<u2"),
    V.INT16: np.dtype("<i2"),
    V.UINT32: np.dtype("<u4"),
    V.INT32: np.dtype("<i4"),
    V.FLOAT32: np.dtype("<f4"),
    V.BOOL: np.dtype("?"),
    V.UINT64: np.dtype("<u8"),
    V.INT64: np.dtype("<i8"),
    V.FLOAT64: np.dtype("<f8"),
}
# ggml types whose data gguf-py presents as numbers, not as block bytes
_PLAIN = {
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: [cols, rows, ...]
    data: np.ndarray  # read-only view: numbers for plain types, else bytes [..., rows, row bytes]
    offset: int = 0  # of its data in the file


@dataclass(frozen=True)
class GGUFFile:
    version: int
    fields: dict[str, Any]  # key -> int, float, bool, str, or a list of those
    tensors: list[GGUFTensor]
    mapped: Optional[mmap.mmap] = dataclasses.field(default=None, repr=False, compare=False)

    def field(self, key: str, default=None):
        return self.fields.get(key, default)

    def release(self, tensor: GGUFTensor) -> None:
        """Drop the pages of a tensor read already from this process's memory.

        Every page of the map that a load touches stays counted in the process's
        memory until the map goes, so a load held the whole file on top of the
        weights it built from it: a 1.1B-parameter Q4_1 file (682 MiB) took a kept-quantized
        load's peak from 1,314 to 2,083 MiB. The pages stay in the page cache, and a later
        read of the tensor maps them again with the same bytes."""
        if self.mapped is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = tensor.offset - tensor.offset % mmap.PAGESIZE
        end = min(len(self.mapped), tensor.offset + tensor.data.nbytes)
        if end > start:
            self.mapped.madvise(mmap.MADV_DONTNEED, start, end - start)


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise ValueError(f"truncated GGUF file: {n} bytes wanted at offset {self.pos} of {len(self.buf)}")
        self.pos += n
        return self.buf[self.pos - n : self.pos]

    def unpack(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.unpack("<Q"))).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind == V.STRING:
            return self.string()
        if kind == V.ARRAY:
            return self.array()
        if kind not in _NUMBERS:
            raise ValueError(f"unknown GGUF value type {kind} at offset {self.pos}")
        return np.frombuffer(self.take(_NUMBERS[kind].itemsize), _NUMBERS[kind])[0].item()

    def array(self) -> list:
        kind, count = self.unpack("<I"), self.unpack("<Q")
        # A count a damaged file inflates ends at the first element past the end.
        if kind == V.STRING:
            return [self.string() for _ in range(count)]
        if kind == V.ARRAY:
            return [self.array() for _ in range(count)]
        if kind not in _NUMBERS:
            raise ValueError(f"unknown GGUF array element type {kind} at offset {self.pos}")
        dtype = _NUMBERS[kind]
        return np.frombuffer(self.take(count * dtype.itemsize), dtype).tolist()


def read_gguf(path: str) -> GGUFFile:
    """The file's metadata and tensors; ValueError for a file that is not GGUF 2/3."""
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    buf = memoryview(mapped)
    cur = _Cursor(buf)
    if bytes(cur.take(4)) != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (no GGUF magic)")
    version = cur.unpack("<I")
    if version not in VERSIONS:
        swapped = struct.unpack(">I", struct.pack("<I", version))[0]
        why = "big-endian GGUF files are not supported" if swapped in VERSIONS else f"version {version}"
        raise ValueError(f"{path}: {why} (folio reads GGUF versions {VERSIONS}, little-endian)")
    n_tensors, n_fields = cur.unpack("<Q"), cur.unpack("<Q")
    fields = {}
    for _ in range(n_fields):
        key = cur.string()
        fields[key] = cur.value(cur.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ValueError(f"{path}: tensor {name!r} has {n_dims} dimensions")
        dims = struct.unpack(f"<{n_dims}Q", cur.take(8 * n_dims))
        infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
    alignment = fields.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise ValueError(f"{path}: bad general.alignment {alignment!r}")
    start = -(-cur.pos // alignment) * alignment
    tensors, seen = [], set()
    for name, dims, kind, offset in infos:
        if name in seen:
            raise ValueError(f"{path}: tensor {name!r} appears twice")
        seen.add(name)
        tensors.append(_tensor(buf, path, name, dims, kind, start + offset))
    return GGUFFile(version, fields, tensors, mapped)


def _tensor(buf: memoryview, path: str, name: str, dims: tuple, kind: int, offset: int) -> GGUFTensor:
    try:
        ggml_type = GGMLQuantizationType(kind)
    except ValueError:
        raise ValueError(f"{path}: tensor {name!r} has unknown ggml type {kind}") from None
    n_elems = int(np.prod(dims))
    block, type_size = GGML_QUANT_SIZES[ggml_type]
    np_dims = tuple(reversed(dims))
    if ggml_type in _PLAIN:
        dtype, count = np.dtype(_PLAIN[ggml_type]), n_elems
    else:
        if dims[0] % block:
            raise ValueError(f"{path}: tensor {name!r} rows of {dims[0]} are not whole {ggml_type.name} blocks")
        dtype, count = np.dtype(np.uint8), n_elems // block * type_size
        np_dims = quant_shape_to_byte_shape(np_dims, ggml_type)
    if offset + count * dtype.itemsize > len(buf):
        raise ValueError(f"{path}: tensor {name!r} runs past the end of the file")
    data = np.frombuffer(buf, dtype, count, offset).reshape(np_dims)
    return GGUFTensor(name, ggml_type, tuple(int(d) for d in dims), data, offset)
