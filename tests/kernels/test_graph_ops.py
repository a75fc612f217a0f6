"""folio::cpu_paged_attention (kernels/graph_ops.py), the attention a compiled decode
step calls: the reference's result to the bit, from the step's metadata tensors alone,
and never a stale plan when a later step's tensors match an earlier one's lengths."""

import pytest
import torch

from folio.kernels import graph_ops, reference

F32, F16 = torch.float32, torch.float16


@pytest.mark.parametrize("window, softcap", [(None, None), (7, None), (None, 30.0)])
def test_the_op_computes_the_cpu_attention_from_the_metadata_tensors(paged_case, window, softcap):
    case = paged_case([1, 1, 4], [20, 33, 9], block_size=8, num_q_heads=4, num_kv_heads=2, head_dim=16, dtype=F32)
    k, v = case.ref_k_cache.to(F16), case.ref_v_cache.to(F16)
    m = case.meta
    want = reference.cpu_paged_attention(case.q, k, v, m, case.scale, window, softcap)
    got = torch.ops.folio.cpu_paged_attention(
        case.q, k, v, m.query_start_loc, m.seq_lens, m.block_tables, case.scale, window, softcap
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # outside a graph the KernelOps entry is the reference itself
    torch.testing.assert_close(graph_ops.cpu_paged_attention(case.q, k, v, m, case.scale, window, softcap), want)


def test_a_step_with_the_same_lengths_and_other_blocks_gets_its_own_plan(paged_case):
    first = paged_case([1, 1], [20, 33], block_size=8, num_q_heads=4, num_kv_heads=2, head_dim=16, dtype=F32, seed=0)
    second = paged_case([1, 1], [20, 33], block_size=8, num_q_heads=4, num_kv_heads=2, head_dim=16, dtype=F32, seed=1)
    assert not torch.equal(first.meta.block_tables, second.meta.block_tables)

    def op(case):
        m = case.meta
        return torch.ops.folio.cpu_paged_attention(
            case.q,
            case.ref_k_cache,
            case.ref_v_cache,
            m.query_start_loc,
            m.seq_lens,
            m.block_tables,
            case.scale,
            None,
            None,
        )

    for case in (first, second, first):
        want = reference.cpu_paged_attention(case.q, case.ref_k_cache, case.ref_v_cache, case.meta, case.scale)
        torch.testing.assert_close(op(case), want, rtol=0, atol=0)  # a stale plan reads the other step's blocks


@pytest.mark.parametrize("window, softcap", [(None, None), (7, None), (None, 30.0)])
@pytest.mark.parametrize("pool_dtype", [F32, F16])
def test_one_sequence_decode_is_the_reference_from_tensors_alone(paged_case, window, softcap, pool_dtype):
    """What a compiled step of one row traces in place of the op (graph_ops.cpu_paged_attention):
    one sequence's decode over its whole blocks, the padding masked; lengths on and off a
    block's end, and a context of one token."""
    compiled = torch.compile(graph_ops.one_sequence_decode, dynamic=True, fullgraph=True)
    for context in (0, 7, 8, 20, 40):
        case = paged_case([1], [context], block_size=8, num_q_heads=4, num_kv_heads=2, head_dim=16, dtype=F32)
        k, v = case.ref_k_cache.to(pool_dtype), case.ref_v_cache.to(pool_dtype)
        m = case.meta
        want = reference.cpu_paged_attention(case.q, k, v, m, case.scale, window, softcap)
        # a padded table, as the decode graph passes one (block 0 is no sequence's)
        blocks = torch.cat((m.block_tables[0], torch.zeros(1, dtype=m.block_tables.dtype)))
        got = graph_ops.one_sequence_decode(case.q, k, v, m.seq_lens, blocks, case.scale, window, softcap)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        with torch._dynamo.config.patch(disable=False):  # the suite runs with TORCH_COMPILE_DISABLE=1
            got = compiled(case.q, k, v, m.seq_lens, blocks, case.scale, window, softcap)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("window, softcap", [(None, None), (7, None), (None, 30.0)])
@pytest.mark.parametrize("pool_dtype", [F32, F16])
def test_padded_batch_decode_is_the_reference_from_tensors_alone(paged_case, window, softcap, pool_dtype):
    """What a compiled step of several rows traces where its sequences are about as long
    as each other (DecodeGraph's choice): every row's blocks up to the longest gathered,
    keys past a row's length masked; lengths on and off a block's end, a context of one
    token beside longer ones, and a table padded with block 0 as the decode graph pads it."""
    compiled = torch.compile(graph_ops.padded_batch_decode, dynamic=True, fullgraph=True)
    for contexts in ([0, 7, 8], [20, 40, 33, 15], [16, 16]):
        case = paged_case(
            [1] * len(contexts), contexts, block_size=8, num_q_heads=4, num_kv_heads=2, head_dim=16, dtype=F32
        )
        k, v = case.ref_k_cache.to(pool_dtype), case.ref_v_cache.to(pool_dtype)
        m = case.meta
        want = reference.cpu_paged_attention(case.q, k, v, m, case.scale, window, softcap)
        tables = torch.cat((m.block_tables, torch.zeros_like(m.block_tables[:, :1])), dim=1)
        got = graph_ops.padded_batch_decode(case.q, k, v, m.seq_lens, tables, case.scale, window, softcap)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        with torch._dynamo.config.patch(disable=False):  # the suite runs with TORCH_COMPILE_DISABLE=1
            got = compiled(case.q, k, v, m.seq_lens, tables, case.scale, window, softcap)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
