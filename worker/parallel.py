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
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


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

    def __init__(self, parts: list[tuple[int, int, int]], in_features: int, bias: bool, dtype, device):
        super().__init__()
        self.parts = parts
        self.offsets = [sum(n for *_, n in parts[:i]) for i in range(len(parts))]
        rows = sum(n for *_, n in parts)
        self.weight = empty_parameter(rows, in_features, dtype=dtype, device=device)
        self.bias = empty_parameter(rows, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load(self, part: int, kind: str, tensor: torch.Tensor) -> None:
        """Copy this rank's rows of the full checkpoint tensor for fused part `part`."""
        full, start, length = self.parts[part]
        dst = getattr(self, kind).data.narrow(0, self.offsets[part], length)
        _copy_slice(dst, tensor, 0, full, start, length)


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_local W_local^T).

    in_slice = (full_columns, start, length): this rank keeps W's input
    columns [start, start + length) of full_columns.
    """

    def __init__(self, out_features: int, in_slice: tuple[int, int, int], tp: TPGroup, dtype, device):
        super().__init__()
        self.in_slice = in_slice
        self.tp = tp
        self.weight = empty_parameter(out_features, in_slice[2], dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(F.linear(x, self.weight))

    def load(self, part: int, kind: str, tensor: torch.Tensor) -> None:
        _copy_slice(self.weight.data, tensor, 1, *self.in_slice)


class VocabParallelEmbedding(nn.Module):
    """An embedding table split by vocabulary rows; doubles as the (tied) LM head.

    Every rank holds ceil(vocab / world_size) rows (the last rank's tail is
    padding), so gathered logits have equal-sized pieces; padding is cut off.
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup, dtype, device):
        super().__init__()
        self.vocab_size, self.tp = vocab_size, tp
        self.rows = -(-vocab_size // tp.world_size)
        self.start = tp.rank * self.rows
        self.weight = empty_parameter(self.rows, hidden_size, dtype=dtype, device=device)
        self.num_real_rows = max(0, min(self.rows, vocab_size - self.start))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T, hidden]."""
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.num_real_rows)
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        h.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] fp32 on every rank."""
        local = F.linear(hidden, self.weight).float()
        return self.tp.all_gather_last(local)[:, : self.vocab_size]

    def load(self, part: int, kind: str, tensor: torch.Tensor) -> None:
        if self.num_real_rows < self.rows:
            self.weight.data[self.num_real_rows :].zero_()
        _copy_slice(self.weight.data[: self.num_real_rows], tensor, 0, self.vocab_size, self.start, self.num_real_rows)


def _copy_slice(dst: torch.Tensor, full: torch.Tensor, dim: int, full_size: int, start: int, length: int) -> None:
    """dst <- full.narrow(dim, start, length), after checking full is the whole tensor."""
    src = full.narrow(dim, start, length) if full.shape[dim] == full_size else None
    if src is None or dst.shape != src.shape:
        expected = list(dst.shape)
        expected[dim] = full_size
        raise ValueError(f"checkpoint shape {tuple(full.shape)}, model expects {tuple(expected)}")
    dst.copy_(src)  # casts to the model's dtype and device
