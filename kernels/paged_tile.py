"""The paged K/V read and the online-softmax step shared by both attention kernels."""

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


@triton.jit
def online_softmax_step(m, l, acc, s, v, DOT_PRECISION: tl.constexpr):
    """Fold one tile of scores s [R, N] (base-2 logits, -inf where hidden) and its
    values v [N, D] into the running max m [R], sum l [R] and output acc [R, D].

    A row that has seen nothing yet (m_new == -inf) gets exponent base 0, so
    -inf - -inf never happens; its p is then all zero.
    """
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_base)
    p = tl.exp2(s - m_base[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l, acc


@triton.jit
def softcap_scores(s, softcap):
    """softcap * tanh(s / softcap), elementwise, for finite s (apply it before any
    masking: a hidden key's -inf would come out as -softcap, visible).

    Scores are base-2 logits, so `softcap` is the model's cap times log2(e): the
    cap commutes with the change of base. tanh is spelled with exp2, which
    compiles everywhere and runs in the interpreter (libdevice's does not), as
    tanh(y) = 2 / (1 + e^(-2y)) - 1: e^(-2y) overflowing to inf still gives -1,
    and the absolute error is a few fp32 ulps of 1, times softcap. (The form
    with |y| and a sign select spilled registers in split-K decode on sm_90.)
    """
    e = tl.exp2(s * (-2.8853900817779268 / softcap))  # e^(-2 s / softcap); -2.885 = -2 log2(e)
    return (2.0 / (1.0 + e) - 1.0) * softcap
