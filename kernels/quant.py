"""Group-quantized weights: the one form every quantization scheme decodes to.

Every scheme folio reads (GGUF's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 and K-quants, GPTQ,
AWQ, compressed-tensors) is, per output row n and per group of `group`
consecutive input features k,

    w[n, k] = (q[n, k] - 2**(bits - 1)) * scale[n, k // group] + zero[n, k // group]

with integer codes q in [0, 2**bits). The centring on 2**(bits - 1) is torch's
int4pack convention (w = (q - 8) * scale + zero), so 4-bit weights reach
torch's CPU kernel as they are; symmetric schemes have zero = 0.

GPTQ's act-order (desc_act) puts input features into groups out of order. Its
decoder sorts the columns by group and records `perm`: column j of the codes
belongs to input feature perm[j], so a matmul reads x[:, perm].

Two forms:
- QuantizedTensor, on the host while loading: codes one per byte, so a
  tensor-parallel rank can cut its rows or columns before anything is packed;
- QuantizedWeight, on the device: 4-bit codes two per byte (low nibble = even
  column), scale and zero in the compute dtype and, on CPU in bfloat16, torch's
  own packed int4 form (_weight_int4pack_mm_for_cpu), whose bytes depend on the
  CPU's instruction set and so are made at load, never stored.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# Group sizes torch's CPU int4 kernel takes.
INT4PACK_GROUPS = (32, 64, 128, 256)


@dataclass
class QuantizedTensor:
    codes: torch.Tensor  # uint8 [N, K]
    scale: torch.Tensor  # fp32 [N, K // group]
    zero: torch.Tensor  # fp32 [N, K // group]
    bits: int
    group: int
    perm: Optional[torch.Tensor] = None  # int64 [K]: column j holds input feature perm[j]

    def __post_init__(self):
        n, k = self.codes.shape
        if not 2 <= self.bits <= 8 or self.codes.dtype != torch.uint8:
            raise ValueError(f"codes must be uint8 of 2 to 8 bits, got {self.codes.dtype} of {self.bits}")
        if self.group <= 0 or k % self.group:
            raise ValueError(f"group {self.group} does not divide {k} input features")
        for name in ("scale", "zero"):
            if getattr(self, name).shape != (n, k // self.group):
                raise ValueError(f"{name} must be [{n}, {k // self.group}], got {tuple(getattr(self, name).shape)}")
        if self.perm is not None and self.perm.shape != (k,):
            raise ValueError(f"perm must have {k} entries, got {tuple(self.perm.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        """fp32 [N, K], columns in input-feature order."""
        return _dequantize(self.codes, self.scale.float(), self.zero.float(), self.bits, self.perm)

    def rows(self, start: int, length: int) -> "QuantizedTensor":
        return QuantizedTensor(
            self.codes[start : start + length],
            self.scale[start : start + length],
            self.zero[start : start + length],
            self.bits,
            self.group,
            self.perm,
        )

    def columns(self, start: int, length: int) -> "QuantizedTensor":
        """Input features [start, start + length): a row-parallel rank's slice.

        Refused when it would cut a quantization group: that rank would need a
        scale it shares with another rank.
        """
        n, k = self.shape
        if self.perm is None:
            if start % self.group or length % self.group:
                raise ValueError(
                    f"a tensor-parallel split at input features [{start}, {start + length}) of {k} "
                    f"cuts quantization groups of {self.group}; choose a tensor-parallel size "
                    f"that splits the features at multiples of {self.group}"
                )
            g0, ng = start // self.group, length // self.group
            return QuantizedTensor(
                self.codes[:, start : start + length],
                self.scale[:, g0 : g0 + ng],
                self.zero[:, g0 : g0 + ng],
                self.bits,
                self.group,
            )
        # act-order: this rank's features sit anywhere in the sorted columns.
        mine = (self.perm >= start) & (self.perm < start + length)
        counts = mine.view(-1, self.group).sum(-1)
        if ((counts != 0) & (counts != self.group)).any():
            raise ValueError(
                "an act-order (desc_act) checkpoint's quantization groups are spread over all input "
                f"features, so a tensor-parallel split at [{start}, {start + length}) cuts them; "
                "serve it with tensor-parallel size 1 or use a checkpoint quantized without desc_act"
            )
        cols, groups = mine.nonzero().squeeze(1), (counts == self.group).nonzero().squeeze(1)
        return QuantizedTensor(
            self.codes[:, cols],
            self.scale[:, groups],
            self.zero[:, groups],
            self.bits,
            self.group,
            self.perm[cols] - start,
        )

    def map_rows(self, fn) -> "QuantizedTensor":
        """Apply a row reordering (any fn on [N, ...] tensors) to codes, scale and zero."""
        return QuantizedTensor(fn(self.codes), fn(self.scale), fn(self.zero), self.bits, self.group, self.perm)

    def same_layout(self, other: "QuantizedTensor") -> bool:
        """Whether other can be stacked under self as more rows of one weight."""
        same_perm = (self.perm is None and other.perm is None) or (
            self.perm is not None and other.perm is not None and torch.equal(self.perm, other.perm)
        )
        return self.bits == other.bits and self.group == other.group and self.shape[1] == other.shape[1] and same_perm

    @staticmethod
    def cat_rows(parts: list["QuantizedTensor"]) -> "QuantizedTensor":
        first = parts[0]
        if not all(first.same_layout(p) for p in parts):
            raise ValueError("only tensors of one bit width, group size and column order stack")
        return QuantizedTensor(
            torch.cat([p.codes for p in parts]),
            torch.cat([p.scale for p in parts]),
            torch.cat([p.zero for p in parts]),
            first.bits,
            first.group,
            first.perm,
        )


def map_rows(tensor: torch.Tensor | QuantizedTensor, fn) -> torch.Tensor | QuantizedTensor:
    """fn (a row reordering of [N, ...] tensors) applied to a dense or a quantized weight."""
    return tensor.map_rows(fn) if isinstance(tensor, QuantizedTensor) else fn(tensor)


def _dequantize(codes, scale, zero, bits: int, perm: Optional[torch.Tensor], dtype=torch.float32) -> torch.Tensor:
    """[n, K] weights from one-per-byte codes; fp32 math, cast to dtype at the end."""
    n, k = codes.shape
    g = k // scale.shape[1]
    q = codes.view(n, -1, g).float().sub_(float(1 << (bits - 1)))
    w = q.mul_(scale.float().unsqueeze(-1)).add_(zero.float().unsqueeze(-1)).view(n, k).to(dtype)
    if perm is None:
        return w
    out = torch.empty_like(w)
    out[:, perm] = w
    return out


class QuantizedWeight(nn.Module):
    """One quantized weight [N, K] on its device, ready for quantized_linear.

    Buffers: codes (uint8, [N, K/2] for 4 bits and [N, K] otherwise), scale and
    zero ([N, K/group], compute dtype), perm (act-order, else None). On CPU in a
    compute dtype of `int4pack_dtypes` (KernelOps.int4pack_dtypes), int4pack and
    int4pack_sz hold torch's packed form instead of codes, scale and zero (kept
    too when `gather` rows is needed: an embedding table). An embedding table of codes wider than 4
    bits holds, where some steps multiply faster through it (table_path), a bf16
    copy (bf16_copy) in place of the codes (_exact_bf16_copy), and the packed form
    beside it where the other steps multiply faster through that.
    """

    def __init__(
        self,
        t: QuantizedTensor,
        dtype: torch.dtype,
        device,
        gather: bool = False,
        int4pack_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,),
    ):
        super().__init__()
        self.out_features, self.in_features = t.shape
        self.bits, self.group, self.dtype = t.bits, t.group, dtype
        self.register_buffer("perm", None if t.perm is None else t.perm.to(device))
        self.register_buffer("int4pack", None)
        self.register_buffer("int4pack_sz", None)
        self.int4pack_terms = 0
        self.register_buffer("bf16_copy", None)
        self.register_buffer("scale", t.scale.to(device=device, dtype=dtype).contiguous())
        self.register_buffer("zero", t.zero.to(device=device, dtype=dtype).contiguous())
        cpu_int4 = (
            torch.device(device).type == "cpu" and dtype in int4pack_dtypes and int4pack_fits(t.group, t.shape[0])
        )
        table = table_path()
        if cpu_int4 and gather and t.bits > 4 and table.copy:
            self.bf16_copy = self._exact_bf16_copy(t)
        if cpu_int4 and (self.bf16_copy is None or table.terms):
            self._pack_int4(t)
        self.register_buffer("codes", None)
        if self.bf16_copy is None and (gather or self.int4pack is None):
            codes = t.codes if t.bits != 4 else t.codes[:, 0::2] | (t.codes[:, 1::2] << 4)
            self.codes = codes.to(device).contiguous()
        if self.codes is None and self.bf16_copy is None:
            # torch's packed form carries its own scales and zeros (int4pack_sz): nothing
            # reads these (25 MiB of SmolLM2's 185 in float32).
            self.scale = self.zero = None

    @property
    def rounds_to_bf16(self) -> bool:
        """torch's int4 kernel returns bfloat16, as does a GEMM over the bf16 copy: in a
        wider compute dtype their output is rounded."""
        return (self.int4pack is not None or self.bf16_copy is not None) and self.dtype != torch.bfloat16

    def _exact_bf16_copy(self, t: QuantizedTensor) -> Optional[torch.Tensor]:
        """The dequantized weight rounded to bf16, in place of the codes and torch's
        packed form, where the codes can be read back from it exactly; else None.

        An embedding table that doubles as the LM head (SmolLM2 ties its head to
        the Q8_0 table, as most GGUFs do) keeps its codes for gathers and for the
        exact top logits, and for the matmul torch's int4 kernel multiplies 8-bit
        codes as two 4-bit terms: 2 bytes a weight in all, and the kernel's cost
        grows with every 4 rows (12.1 ms at 16 rows for SmolLM2's 49152 x 576 head,
        55 ms at 64 through the wide path). A bf16 copy is the same 2 bytes, and
        AMX's bf16 GEMM over it takes 1.8 and 5.3 ms (reference._bf16_copy_matmul);
        at one row, in the model, 2.7 ms against the kernel's 2.3, the copy being
        twice the bytes the matmul reads (elsewhere the packed form stays beside it
        for the steps it serves faster: table_path). The codes come back from it: bf16 keeps 8 significant
        bits, so |copy - w| <= |w| 2^-9, which for w = (q - mid) s (zero 0, as
        Q8_0 and symmetric schemes have) is at most mid s 2^-9 < s / 2 below 9
        bits. Whether it holds for this tensor's zeros is checked (the weights the
        codes read back decode to), not assumed."""
        copy = torch.empty(t.shape, dtype=torch.bfloat16)
        step = max(1, BF16_COPY_CHUNK // self.in_features)  # fp32 a slice at a time: the transient stays small
        for r in range(0, self.out_features, step):
            rows = slice(r, r + step)
            scale, zero = self.scale[rows], self.zero[rows]
            w = _dequantize(t.codes[rows], scale, zero, t.bits, None, self.dtype)
            copy[rows] = w
            if not torch.equal(self._from_copy(copy[rows], scale, zero), w):
                return None
        return copy

    def _from_copy(self, copy: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Rows of the weight in the compute dtype, read back from the bf16 copy (see
        _exact_bf16_copy): q - mid = round((copy - zero) / scale), then decoded as
        _dequantize decodes codes, to the same bits. A row of scale 0 (vocabulary
        padding) is its zero whatever its codes."""
        n, k = copy.shape
        s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
        centred = copy.float().view(n, -1, self.group).sub_(z).div_(torch.where(s == 0, 1.0, s)).round_()
        return centred.mul_(s).add_(z).view(n, k).to(self.dtype)

    def unpacked_codes(self, rows: Optional[torch.Tensor | slice] = None) -> torch.Tensor:
        """uint8 [n, K], one code per byte (all rows, or those rows selects)."""
        if self.bf16_copy is not None:  # it holds no codes
            raise ValueError("this weight keeps a bf16 copy in place of its codes: dequantize() reads it")
        codes = _select_rows(self.codes, rows)
        if self.bits != 4:
            return codes
        return torch.stack((codes & 15, codes >> 4), dim=-1).view(codes.shape[0], -1)

    def dequantize(self, rows: Optional[torch.Tensor | slice] = None) -> torch.Tensor:
        """[N, K] (or the rows an index tensor or slice selects) in the compute dtype,
        columns in stored order (apply perm to x, not to this)."""
        if self.scale is None:
            raise ValueError("this weight keeps torch's packed form alone: int4pack_dense_matmul decodes it")
        scale, zero = _select_rows(self.scale, rows), _select_rows(self.zero, rows)
        if self.bf16_copy is not None:  # it holds no codes
            return self._from_copy(_select_rows(self.bf16_copy, rows), scale, zero)
        return _dequantize(self.unpacked_codes(rows), scale, zero, self.bits, None, self.dtype)

    def _pack_int4(self, t: QuantizedTensor) -> None:
        """torch's CPU int4 form. Codes of up to 4 bits are one term; wider codes
        q = 16h + l are two 4-bit terms over the same x, stacked along K so that
        one kernel call computes both:
            (q - mid) s + z = (h' - 8) 16s + [(l - 8) s + 8s + z],  h' = h + 8 - mid/16
        h' keeps the high term centred where its codes are (a constant term
        instead would cancel in bfloat16)."""
        mid = float(1 << (t.bits - 1))
        scale, zero = t.scale.float(), t.zero.float()
        if t.bits <= 4:
            term_sz = [(scale, (8.0 - mid) * scale + zero)]
        else:
            term_sz = [(16.0 * scale, torch.zeros_like(zero)), (scale, 8.0 * scale + zero)]

        def packing_input(codes: torch.Tensor) -> torch.Tensor:
            """The rows' terms side by side, as the int32 codes torch's packing op takes."""
            if t.bits <= 4:
                return codes.to(torch.int32)
            return torch.cat([(codes >> 4) + (8 - (1 << (t.bits - 5))), codes & 15], dim=1).to(torch.int32)

        # torch's packing op takes int32 codes, four bytes per code: SmolLM2's 8-bit
        # embedding table would pass through 226 MB at once (a third of the worker's
        # peak memory). A slice of whole row blocks at a time packs to the same bytes,
        # its terms split from the codes there too.
        self.int4pack = torch.empty(self.out_features, self.in_features * len(term_sz) // 2, dtype=torch.uint8)
        for i in range(0, self.out_features, INT4PACK_ROWS):
            codes = packing_input(t.codes[i : i + INT4PACK_ROWS])
            self.int4pack[i : i + INT4PACK_ROWS] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        sz = torch.stack([torch.cat([s for s, _ in term_sz], 1), torch.cat([z for _, z in term_sz], 1)], dim=-1)
        self.int4pack_sz = sz.transpose(0, 1).contiguous().to(torch.bfloat16)  # [K'/group, N, 2]
        self.int4pack_terms = len(term_sz)

    def int4pack_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, K] (columns already in stored order) -> [T, N] through torch's CPU
        kernel, which multiplies bfloat16 only: in float32 compute x is rounded to
        bfloat16 here and the result widened back."""
        x = self._per_term(x.to(torch.bfloat16))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.int4pack, self.group, self.int4pack_sz)
        return y if y.dtype == self.dtype else y.to(self.dtype)

    def _per_term(self, x: torch.Tensor) -> torch.Tensor:
        """x repeated once per 4-bit term: the packed codes stack the terms along K."""
        return torch.cat([x] * self.int4pack_terms, dim=-1) if self.int4pack_terms > 1 else x

    def int4pack_dense_matmul(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
        """x [T, K] -> [T, N] like int4pack_matmul, but through GEMMs in `dtype` over the
        weight decoded from its packed form a slice of rows at a time; None when this
        CPU's packed layout is not the one folio unpacks.

        torch's int4 kernel decodes the weight again for every 4 rows of x, so its
        cost grows with the rows; decoding once and multiplying densely wins from
        wide_path().rows rows on (prefill chunks). Each slice is decoded in fp32 right
        before its GEMM, while it is in cache, and the transient stays small. In
        float32 the result is the kernel's to fp32 rounding; in bfloat16 (where AMX
        multiplies bf16 tiles) the decoded weight is rounded to bf16 too, an error of
        2^-9 of each weight, small beside its 4-bit step."""
        block = int4pack_block_n()
        if block is None or self.out_features % block:
            return None
        rows = x.shape[0]
        x = gemm_rows(self._per_term(x.to(torch.bfloat16)).to(dtype))  # the kernel's inputs: bf16
        k = x.shape[-1]
        packed = self.int4pack.view(self.out_features // block, k, block // 2)
        scale, zero = (t.contiguous() for t in self.int4pack_sz.float().unbind(-1))  # [K'/group, N] each
        offset = zero - 8.0 * scale  # (q - 8) s + z as q s + offset: one pass fewer
        chunk = DEQUANTIZE_CHUNK if dtype == torch.float32 else BF16_DEQUANTIZE_CHUNK
        step = max(1, chunk // (k * block)) * block
        scratch = torch.empty(k * min(step, self.out_features))  # one buffer: fresh pages per slice cost more
        narrow = None if dtype == torch.float32 else torch.empty(scratch.shape, dtype=dtype)
        parts = []
        for r in range(0, self.out_features, step):
            p = packed[r // block : (r + step) // block].transpose(0, 1)  # [K', blocks, block/2]
            n = p.shape[1] * block
            w = scratch[: k * n].view(k, n)
            # byte j of a block's row k holds output rows j (low nibble) and j + block/2
            w.view(k, -1, block)[..., : block // 2].copy_(p & 15)
            w.view(k, -1, block)[..., block // 2 :].copy_(p >> 4)
            groups = w.view(k // self.group, self.group, n)
            groups.mul_(scale[:, None, r : r + n]).add_(offset[:, None, r : r + n])
            if narrow is not None:
                w = narrow[: k * n].view(k, n).copy_(w)
            parts.append(x @ w)
        y = torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
        return y[:rows]

    def extra_repr(self) -> str:
        kernel = (
            "int4pack" if self.int4pack is not None else "bf16 copy" if self.bf16_copy is not None else "dequantize"
        )
        return f"{self.out_features}x{self.in_features}, {self.bits} bits, group {self.group}, {kernel}"


INT4PACK_ROWS = 1024  # rows packed at a time: whole row blocks of every width (int4pack_block_n)
BF16_COPY_CHUNK = 1 << 22  # weights dequantized at a time while a bf16 copy is made


def int4pack_fits(group: int, rows: int) -> bool:
    """Whether torch's CPU int4 kernel takes a weight of these groups and rows: its group sizes, 16-row multiples.
    (The kernel is vectorised for bfloat16 activations only, fp32 and fp16 taking a
    scalar loop 15-100x slower than a dense matmul: int4pack_matmul rounds x to bf16.)"""
    return group in INT4PACK_GROUPS and rows % 16 == 0


@functools.cache
def int4pack_block_n() -> Optional[int]:
    """The row-block width of torch's packed int4 layout on this CPU, or None.

    torch packs the codes of each block of `block` output rows K-major, two rows a
    byte: byte j of a block's row k holds rows j (low nibble) and j + block/2. The
    width depends on the instruction set it was built for (32 with AVX2, 64 with
    AVX-512), so it is found by packing a probe and checking each candidate."""
    codes = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    for block in (32, 64):
        if packed.numel() != codes.numel() // 2:
            break
        p = packed.view(128 // block, 64, block // 2)
        unpacked = torch.cat((p & 15, p >> 4), dim=-1).permute(0, 2, 1).reshape(128, 64)
        if torch.equal(unpacked.int(), codes):
            return block
    return None


def _select_rows(t: torch.Tensor, rows: Optional[torch.Tensor | slice]) -> torch.Tensor:
    if rows is None:
        return t
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


@dataclass(frozen=True)
class WidePath:
    """From `rows` rows of x on, a CPU matmul through torch's packed int4 form decodes
    the weight and multiplies densely in `dtype` (int4pack_dense_matmul) instead of
    calling torch's int4 kernel. `folio bench kernels` on a machine without a GPU
    measures the kernel and both GEMM dtypes by rows: that is what places these."""

    rows: int
    dtype: torch.dtype


# These probes are constants of the process: torch.compile takes their value at trace
# time rather than tracing into the probe (a graph break). worker/decode_graph.py marks
# them so (torch.compiler.assume_constant_result) when it compiles: marked here, at
# import, they would load dynamo, inductor, sympy and triton into every CPU worker,
# compiling or not (140 MiB, a second of start).
@functools.cache
def amx_granted() -> bool:
    """Whether this CPU has AMX and Linux lets torch use it: then oneDNN's bf16 GEMMs and
    torch's bf16 attention run on AMX tiles (a bf16 GEMM ran at 2.2 TFLOP/s on two Xeon
    cores, 12x the fp32 rate)."""
    amx = getattr(torch.cpu, "_init_amx", None)  # requests the tile state from Linux; False where refused
    return bool(amx is not None and amx())


def bf16_dot_products() -> bool:
    """Whether this CPU multiplies bf16 natively: AVX512-BF16's dot products (Cooper
    Lake, AMD Zen 4 and later) or AMX tiles. oneDNN's bf16 GEMMs then run at several
    times the fp32 rate (`folio bench kernels`: 3.9 against 11.4 ms for one SmolLM2
    layer's projections at 256 rows, weight decoding included, on a Zen 5 EPYC);
    elsewhere they are emulated, slower than fp32."""
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private: absent means unknown
    return amx_granted() or bool(avx512_bf16 is not None and avx512_bf16())


@dataclass(frozen=True)
class TablePath:
    """Which steps multiply an embedding table of codes wider than 4 bits (an LM head
    tied to a Q8_0 table, as SmolLM2's) through a bf16 copy of it (_exact_bf16_copy):
    those of up to `copy_rows_up_to` rows, and those of `copy_rows_from` rows and more;
    the others through torch's packed int4 form, as two 4-bit terms. The table keeps
    the forms some step uses."""

    copy_rows_up_to: int = 0
    copy_rows_from: Optional[int] = None

    def copy_for(self, rows: int) -> bool:
        return rows <= self.copy_rows_up_to or (self.copy_rows_from is not None and rows >= self.copy_rows_from)

    @property
    def copy(self) -> bool:
        return self.copy_rows_up_to > 0 or self.copy_rows_from is not None

    @property
    def terms(self) -> bool:
        return self.copy_rows_from is None or self.copy_rows_from > self.copy_rows_up_to + 1


# Where the copy serves steps of few rows and the terms the rest, or the reverse. SmolLM2's
# head (49152 x 576), ms at 1 / 2 / 4 / 16 rows, two int4 terms against the copy:
# - AVX512-BF16 without AMX (a Zen 5 EPYC): 0.7 / 0.9 / 1.3 / 5.3 against 2.0 / 2.2 / 2.6 /
#   2.9 (oneDNN's bf16 GEMM); a one-stream token 10-15% longer with the copy alone, a
#   16-stream workload 2-5% shorter than with the terms alone.
# - AVX2 (the same VM held to AVX2): 2.6 / 2.8 / 2.9 / 11.5 against 1.1 / 2.2 / 4.3 / 18.3,
#   torch's own bf16 matrix-vector product widening the copy to fp32 as it reads it.
# - AVX-512 without BF16 (held so): 1.0 / 1.1 / 1.5 / 5.6 against 1.1 / 2.2 / 5.0 / 8.8.
INT4_TERMS_MAX_ROWS = 4
BF16_GEMV_MAX_ROWS = 2


@functools.cache
def table_path() -> TablePath:
    """This CPU's table path: with AMX the copy alone (its bf16 GEMM wins at every row
    count, in no more bytes than the codes and the terms), else as measured above."""
    if amx_granted():
        return TablePath(copy_rows_from=1)
    if bf16_dot_products():
        return TablePath(copy_rows_from=INT4_TERMS_MAX_ROWS + 1)
    if torch.backends.cpu.get_cpu_capability() == "AVX2":
        return TablePath(copy_rows_up_to=BF16_GEMV_MAX_ROWS)
    return TablePath()


@functools.cache
def wide_path() -> WidePath:
    """This CPU's wide path. With AMX the GEMM is all but free beside decoding the
    weight, and the dense path wins from 64 rows; with AVX512-BF16 alone, bf16 GEMMs
    win from about 192 rows (on a Zen 5 EPYC, one layer: 3.4-3.6 against 3.7 ms for
    the kernel at 192 rows, 5.8 against 9.8 at 512; fp32 GEMMs slower than the kernel
    at every row count; in process, 16 streams ran 5% faster with the switch at 192
    than at 96); elsewhere (AVX2, AVX-512 without BF16) fp32 GEMMs win from 160 rows."""
    if amx_granted():
        return WidePath(64, torch.bfloat16)
    return WidePath(192, torch.bfloat16) if bf16_dot_products() else WidePath(160, torch.float32)


# oneDNN, which runs torch's bfloat16 and float16 GEMMs on CPU, JIT-builds a kernel for
# every shape it meets and caches it. A step's row count is the tokens it carries, so a
# step with a prompt in it nearly always met a new one: on the AMX VM a 148 x 576 x 3072
# bf16 product took 4.3 ms at a row count not seen before against 0.4 ms at one seen
# (float32 GEMMs go through MKL and build nothing). Rows are padded up to a multiple of
# this; AMX multiplies tiles of 16 rows, so the padding adds next to no arithmetic.
GEMM_ROW_BUCKET = 16


def gemm_rows(x: torch.Tensor) -> torch.Tensor:
    """x [T, K], zero-padded below to a multiple of GEMM_ROW_BUCKET rows where a CPU GEMM
    in a 16-bit dtype would otherwise meet a row count it may not have a kernel for; the
    caller keeps the first T rows of the product. Up to GEMM_ROW_BUCKET rows (decode
    steps) there are few row counts, and x is returned as it is."""
    rows = x.shape[0]
    if (
        x.dim() != 2
        or x.device.type != "cpu"
        or x.dtype not in (torch.bfloat16, torch.float16)
        or rows <= GEMM_ROW_BUCKET
        or rows % GEMM_ROW_BUCKET == 0
    ):
        return x
    padded = x.new_zeros(-(-rows // GEMM_ROW_BUCKET) * GEMM_ROW_BUCKET, x.shape[1])
    padded[:rows] = x
    return padded


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear, its rows padded as gemm_rows says."""
    padded = gemm_rows(x)
    y = F.linear(padded, weight, bias)
    return y if padded is x else y[: x.shape[0]]


# Weight elements dequantized at a time: the slice stays in a core's L2 cache
# while it is multiplied, and the transient stays small (an LM head of 49152 x
# 576 would be 113 MB in fp32 at once). AMX's bf16 GEMMs run faster on wider
# slices (at 512 rows, 5.1 against 10.4 ms for one SmolLM2 layer with 4x the slice).
DEQUANTIZE_CHUNK = 1 << 18
BF16_DEQUANTIZE_CHUNK = 1 << 20


def dequantized_linear(x: torch.Tensor, w: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference: x [T, K] @ dequantize(w)^T (+ bias), in the weight's dtype,
    dequantizing a slice of rows at a time."""
    if w.perm is not None:
        x = x.index_select(-1, w.perm)
    x = x.to(w.dtype)
    step = max(16, DEQUANTIZE_CHUNK // w.in_features)
    if step >= w.out_features:
        return linear(x, w.dequantize(), bias)
    padded = gemm_rows(x)
    parts = []
    for r in range(0, w.out_features, step):
        rows = slice(r, r + step)
        parts.append(F.linear(padded, w.dequantize(rows), None if bias is None else bias[rows]))
    return torch.cat(parts, dim=-1)[: x.shape[0]]
