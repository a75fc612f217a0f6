"""The paged read shared by both attention kernels."""
import triton
import triton.language as tl


@triton.jit
def paged_kv_tile(table, pos, ok, d, d_ok, head_off, stride_cb, stride_cs, BLOCK_SIZE: tl.constexpr):
    """Offsets and mask of the K/V rows at key positions `pos` of one sequence.

    table points at the sequence's row of the block table; position p lives in
    block table[p // BLOCK_SIZE] at slot p % BLOCK_SIZE. Masked-off positions
    read block 0 (never dereferenced: the mask covers them).
    Returns ([BLOCK_N, BLOCK_D] int64 offsets, [BLOCK_N, BLOCK_D] mask).
    """
    block = tl.load(table + pos // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
    rows = block * stride_cb + (pos % BLOCK_SIZE) * stride_cs + head_off
    return rows[:, None] + d[None, :], ok[:, None] & d_ok[None, :]
