"""Tensor parallelism: the rank group of one replica and the sharded layers.

A replica of N ranks splits every layer N ways (Megatron style):

- column-parallel linears (fused q/k/v, fused gate/up) keep a slice of each
  fused part's output rows: their outputs stay local to the rank;
- row-parallel linears (o_proj, down_proj) keep the matching slice of input
  columns and all-reduce their partial outputs;
- the embedding and LM head keep a slice of the vocabulary: the embedding
  all-reduces (each token's row lives on exactly one rank), the LM head
  all-gathers the logits.

Attention heads are split by KV group, so every rank holds whole groups and
its query heads use only its own KV heads. With fewer KV heads than ranks a KV
head is replicated and its query heads are split instead. head_partition says
which heads a rank gets, or refuses a split that would compute wrong answers.

Every sharded layer loads through `load(part, kind, tensor)`, which copies
only this rank's slice of a full checkpoint tensor into it: a rank's
parameters are its shard alone (plus the small replicated norms); the loader
holds one checkpoint tensor at a time while it is sliced.

A checkpoint tensor may arrive quantized (a QuantizedTensor, kernels/quant.py).
A layer built with `quant_ops` keeps it so: it cuts this rank's rows or
columns from the unpacked codes, then packs (QuantizedWeight) and multiplies
through quant_ops.quantized_linear. A layer built without dequantizes it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from folio.kernels.interface import KernelOps
from folio.kernels.quant import QuantizedTensor, QuantizedWeight, linear


@dataclass(frozen=True)
class TPGroup:
    """This process's place in its replica: rank of world_size ranks.

    world_size 1 is the plain single-device case; every collective is then a
    no-op, so model code is written once for both.
    """

    rank: int = 0
    world_size: int = 1

    @staticmethod
    def init(rank: int, world_size: int, rendezvous: str, device: torch.device) -> "TPGroup":
        """Join the replica's torch.distributed group (NCCL on GPU, gloo on CPU).

        Blocks until all world_size ranks have called it with the same
        rendezvous ("tcp://host:port", handed out by the head).
        """
        if world_size > 1:
            backend = "nccl" if device.type == "cuda" else "gloo"
            # Bounded so a rank whose peer never arrives (or died mid-step) fails instead of hanging.
            dist.init_process_group(
                backend, init_method=rendezvous, rank=rank, world_size=world_size, timeout=timedelta(minutes=5)
            )
        return TPGroup(rank, world_size)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's x along the last dim (equal shapes on all ranks)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank gets rank 0's x (same shape and dtype on all ranks), in place."""
        if self.world_size > 1:
            dist.broadcast(x, src=0)
        return x


def free_port(host: str) -> int:
    """A TCP port free on this node now, for a rendezvous address (tcp://host:port).

    The port is released before the group binds it; another process could take
    it in between, which then fails the load loudly rather than silently.
    """
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def split_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """(start, length) of part `index` when `size` is split as evenly as possible."""
    base, extra = divmod(size, parts)
    start = index * base + min(index, extra)
    return start, base + (index < extra)


@dataclass(frozen=True)
class HeadShard:
    """Which query and KV heads one rank computes (global head indices)."""

    q_start: int
    num_q: int
    kv_start: int
    num_kv: int


def head_partition(num_q: int, num_kv: int, tp: TPGroup) -> HeadShard:
    """Split attention heads over the ranks without breaking a GQA group.

    KV heads >= ranks: whole groups per rank, as evenly as possible (9 query /
    3 KV heads on 2 ranks gives 6+2 and 3+1: uneven, but exact). Fewer KV heads
    than ranks: each KV head is replicated on world_size / num_kv ranks, which
    split its query heads. Anything else is refused with ValueError.
    """
    n, r = tp.world_size, tp.rank
    group = num_q // num_kv
    if num_kv >= n:
        kv_start, kv_len = split_range(num_kv, n, r)
        return HeadShard(kv_start * group, kv_len * group, kv_start, kv_len)
    copies = n // num_kv
    if n % num_kv or group % copies:
        raise ValueError(
            f"cannot split {num_q} query / {num_kv} KV heads over {n} tensor-parallel ranks: "
            f"with fewer KV heads than ranks the ranks must be a multiple of the KV heads "
            f"({num_kv}) and each KV head's {group} query heads must divide among "
            f"{n}/{num_kv} ranks; choose a tensor-parallel size that divides the heads"
        )
    per_rank = group // copies
    return HeadShard(r * per_rank, per_rank, r // copies, 1)


def empty_parameter(*shape: int, dtype, device) -> nn.Parameter:
    # Uninitialised: every parameter is overwritten by the loader.
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W's output rows split; one or more fused parts.

    parts[i] = (full_rows, start, length): fused part i has full_rows rows in
    the checkpoint, of which this rank keeps [start, start + length) (for
    q/k/v: its heads times head_dim). The local weight stacks the slices.
    Output: [T, sum of lengths], local to the rank.
    """

    def __init__(
        self,
        parts: list[tuple[int, int, int]],
        in_features: int,
        bias: bool,
        dtype,
        device,
        quant_ops: Optional[KernelOps] = None,
    ):
        super().__init__()
        self.parts, self.in_features = parts, in_features
        self.offsets = [sum(n for *_, n in parts[:i]) for i in range(len(parts))]
        rows = sum(n for *_, n in parts)
        self.weight = _weight(rows, in_features, len(parts), quant_ops, dtype, device)
        self.bias = empty_parameter(rows, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _linear(x, self.weight, self.bias)

    def load(self, part: int, kind: str, tensor: torch.Tensor | QuantizedTensor) -> None:
        """Copy this rank's rows of the full checkpoint tensor for fused part `part`."""
        full, start, length = self.parts[part]
        if kind == "weight" and isinstance(self.weight, PackedWeight):
            _check_full(tensor, (full, self.in_features))
            return self.weight.put(part, _narrow(tensor, 0, start, length))
        dst = getattr(self, kind).data.narrow(0, self.offsets[part], length)
        _copy_slice(dst, tensor, 0, full, start, length)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local W_local^T).

    in_slice = (full_columns, start, length): this rank keeps W's input
    columns [start, start + length) of full_columns.
    """

    def __init__(
        self,
        out_features: int,
        in_slice: tuple[int, int, int],
        tp: TPGroup,
        dtype,
        device,
        quant_ops: Optional[KernelOps] = None,
    ):
        super().__init__()
        self.in_slice, self.out_features = in_slice, out_features
        self.tp = tp
        self.weight = _weight(out_features, in_slice[2], 1, quant_ops, dtype, device)

    def matmul(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This rank's partial product, before the all-reduce."""
        return _linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.matmul(x))

    def load(self, part: int, kind: str, tensor: torch.Tensor | QuantizedTensor) -> None:
        if isinstance(self.weight, PackedWeight):
            _check_full(tensor, (self.out_features, self.in_slice[0]))
            return self.weight.put(0, _narrow(tensor, 1, *self.in_slice[1:]))
        _copy_slice(self.weight.data, tensor, 1, *self.in_slice)


class VocabParallelEmbedding(nn.Module):
    """An embedding table split by vocabulary rows; doubles as the (tied) LM head.

    Every rank holds ceil(vocab / world_size) rows (the last rank's tail is
    padding), so gathered logits have equal-sized pieces; padding is cut off.
    """

    def __init__(
        self, vocab_size: int, hidden_size: int, tp: TPGroup, dtype, device, quant_ops: Optional[KernelOps] = None
    ):
        super().__init__()
        self.vocab_size, self.hidden_size, self.tp = vocab_size, hidden_size, tp
        self.rows = -(-vocab_size // tp.world_size)
        self.start = tp.rank * self.rows
        self.weight = _weight(self.rows, hidden_size, 1, quant_ops, dtype, device, gather=True)
        self.num_real_rows = max(0, min(self.rows, vocab_size - self.start))

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.weight, PackedWeight):
            return self.weight.rows(ids)
        return F.embedding(ids, self.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T, hidden]."""
        if self.tp.world_size == 1:
            return self._embed(input_ids)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.num_real_rows)
        h = self._embed(local.masked_fill(outside, 0))
        h.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] fp32 on every rank."""
        local = _linear(hidden, self.weight).float()
        if isinstance(self.weight, PackedWeight) and self.weight.rounds_to_bf16():
            _exact_top_logits(self.weight, hidden, local)
        return self.tp.all_gather_last(local)[:, : self.vocab_size]

    def load(self, part: int, kind: str, tensor: torch.Tensor | QuantizedTensor) -> None:
        if isinstance(self.weight, PackedWeight):
            _check_full(tensor, (self.vocab_size, self.hidden_size))
            mine = _narrow(tensor, 0, self.start, self.num_real_rows)
            return self.weight.put(0, _pad_rows(mine, self.rows))  # padding rows are zeros
        if self.num_real_rows < self.rows:
            self.weight.data[self.num_real_rows :].zero_()
        _copy_slice(self.weight.data[: self.num_real_rows], tensor, 0, self.vocab_size, self.start, self.num_real_rows)


# Logits recomputed in float32 per row where the int4 kernel rounded them to bfloat16:
# more than any request's top logprobs (router/limits.py MAX_LOGPROBS).
EXACT_TOP_LOGITS = 32
EXACT_TOP_CHUNK_ROWS = 64  # rows of logits refined at once: dequantized rows are rows x 32 x hidden


def _exact_top_logits(weight: "PackedWeight", hidden: torch.Tensor, logits: torch.Tensor) -> None:
    """The EXACT_TOP_LOGITS largest logits of each row, recomputed in float32 from the
    dequantized weight rows (in place). In a float32 model torch's int4 kernel still
    rounds its output to bfloat16: a logit of 20 lands on a grid of 0.125, the top
    two tie exactly at about one position in twenty, and a difference of 1e-7 elsewhere
    in the step decides the tie. Recomputed, greedy picks and reported logprobs are
    those of the float32 hidden state; the rest of the distribution keeps the
    kernel's rounding, which moves a probability by well under 1%."""
    k = min(EXACT_TOP_LOGITS, logits.shape[-1])
    for start in range(0, logits.shape[0], EXACT_TOP_CHUNK_ROWS):
        part = logits[start : start + EXACT_TOP_CHUNK_ROWS]
        top = part.topk(k, dim=-1).indices  # [n, k]
        rows = weight.rows(top.reshape(-1)).float().view(*top.shape, -1)  # [n, k, hidden]
        h = hidden[start : start + EXACT_TOP_CHUNK_ROWS].float().unsqueeze(-1)  # [n, hidden, 1]
        part.scatter_(1, top, torch.bmm(rows, h).squeeze(-1))


class PackedWeight(nn.Module):
    """A linear layer's weight kept quantized: this rank's slices of its fused
    parts, packed once all have arrived.

    Consecutive parts of one layout (bits, group, column order) stack into one
    QuantizedWeight; a part of another layout (a GGUF Q4_K_M file stores v_proj
    as Q6_K beside Q4_K q/k) or a dense one gets its own matmul, and the
    outputs are concatenated.
    """

    def __init__(self, num_parts: int, ops: KernelOps, dtype, device, gather: bool = False):
        super().__init__()
        self.ops, self.dtype, self.device, self.gather = ops, dtype, device, gather
        self.pending: list = [None] * num_parts
        self.runs = nn.ModuleList()

    def put(self, part: int, tensor: torch.Tensor | QuantizedTensor) -> None:
        self.pending[part] = tensor
        if any(p is None for p in self.pending):
            return
        groups: list[list] = []
        for p in self.pending:
            if groups and _stackable(groups[-1][-1], p):
                groups[-1].append(p)
            else:
                groups.append([p])
        for g in groups:
            if isinstance(g[0], QuantizedTensor):
                t = QuantizedTensor.cat_rows(g)
                self.runs.append(QuantizedWeight(t, self.dtype, self.device, self.gather, self.ops.int4pack_dtypes))
            else:
                self.runs.append(_DenseWeight(torch.cat(g).to(self.dtype), self.device))
        self.pending = []

    def forward(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if len(self.runs) == 1:
            return self._matmul(self.runs[0], x, bias)
        y = torch.cat([self._matmul(r, x) for r in self.runs], dim=-1)
        return y if bias is None else y + bias

    def _matmul(self, run: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if isinstance(run, QuantizedWeight):
            return self.ops.quantized_linear(x, run, bias)
        return linear(x, run.weight, bias)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding rows [len(ids), K] (a one-part weight built with gather=True)."""
        (run,) = self.runs
        return run.dequantize(ids) if isinstance(run, QuantizedWeight) else F.embedding(ids, run.weight)

    def rounds_to_bf16(self) -> bool:
        """Whether a matmul rounds its output to bfloat16 below the compute dtype."""
        return any(isinstance(r, QuantizedWeight) and r.rounds_to_bf16 for r in self.runs)


def _stackable(a: torch.Tensor | QuantizedTensor, b: torch.Tensor | QuantizedTensor) -> bool:
    if isinstance(a, QuantizedTensor) and isinstance(b, QuantizedTensor):
        return a.same_layout(b)
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)


class _DenseWeight(nn.Module):
    def __init__(self, weight: torch.Tensor, device):
        super().__init__()
        self.register_buffer("weight", weight.to(device))


def _linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x @ weight^T (+ bias) for a dense parameter or a PackedWeight."""
    if isinstance(weight, PackedWeight):
        return weight(x, bias)
    return linear(x, weight, bias)


def _weight(rows: int, cols: int, parts: int, quant_ops, dtype, device, gather: bool = False):
    if quant_ops is None:
        return empty_parameter(rows, cols, dtype=dtype, device=device)
    return PackedWeight(parts, quant_ops, dtype, device, gather)


def _check_full(tensor: torch.Tensor | QuantizedTensor, shape: tuple[int, int]) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"checkpoint shape {tuple(tensor.shape)}, model expects {shape}")


def _narrow(t: torch.Tensor | QuantizedTensor, dim: int, start: int, length: int):
    if isinstance(t, torch.Tensor):
        return t.narrow(dim, start, length)
    return t.rows(start, length) if dim == 0 else t.columns(start, length)


def _pad_rows(t: torch.Tensor | QuantizedTensor, rows: int):
    """t with zero rows appended up to `rows` (a quantized zero row: scale = zero = 0)."""
    extra = rows - t.shape[0]
    if extra == 0:
        return t
    if isinstance(t, torch.Tensor):
        return torch.cat([t, t.new_zeros(extra, t.shape[1])])
    n, k = t.shape
    pad = QuantizedTensor(
        t.codes.new_zeros(extra, k),
        t.scale.new_zeros(extra, t.scale.shape[1]),
        t.zero.new_zeros(extra, t.zero.shape[1]),
        t.bits,
        t.group,
        t.perm,
    )
    return QuantizedTensor.cat_rows([t, pad])


def _copy_slice(
    dst: torch.Tensor, full: torch.Tensor | QuantizedTensor, dim: int, full_size: int, start: int, length: int
) -> None:
    """dst <- full.narrow(dim, start, length), after checking full is the whole tensor."""
    if isinstance(full, QuantizedTensor):  # a dense layer: computes with the dequantized weight
        full = full.dequantize()
    src = full.narrow(dim, start, length) if full.shape[dim] == full_size else None
    if src is None or dst.shape != src.shape:
        expected = list(dst.shape)
        expected[dim] = full_size
        raise ValueError(f"checkpoint shape {tuple(full.shape)}, model expects {tuple(expected)}")
    dst.copy_(src)  # casts to the model's dtype and device
