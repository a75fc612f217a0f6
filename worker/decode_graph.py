"""A decode step's forward as one torch.compile graph, on CPU (--compile auto).

At decode sizes a CPU step is mostly dispatch: each of the model's ~1,500 torch
calls a step (norms, rope, the int4 kernel's casts, the KV write, the MLP's
activation) costs a few microseconds whatever it computes. Inductor fuses those
into a few C++ loops around torch's int4 kernel and the attention op
(kernels/graph_ops.py; a step of one row attends inline). On the bundled model (Zen 5
EPYC, 2 cores, in process) one stream took 7.72 ms a token against 9.85 eager, 16
streams ran 332.7 tok/s against 307.6; served, 1.71x llama-server's throughput at 16
streams against 1.37x (README, "A decode step as one compiled graph"). Checking the
model's guards cost about 1 ms more a step, so only the step's own are kept (below).

Only steps whose every request decodes one token, at fewer rows than the CPU wide
path (quant.wide_path: wider steps multiply differently), run through it; a step
with a prompt in it is dominated by its matmuls and stays eager, as does a model
whose forward does not trace as one graph (warm_up says why). Three graphs serve
every such step: torch specializes a dimension of size 1, so one step of one row
and one of two compile them at start, the step of two twice: once attending as one
padded batch, once through the attention op (ONE_BATCH_PADDING says which a step
takes). About two minutes on two cores the first time; inductor caches what it built on
disk, and later starts take a fraction of that.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import replace
from typing import Optional

import torch

from folio.kernels import quant, reference
from folio.kernels.metadata import AttentionMetadata, attention_metadata

log = logging.getLogger(__name__)

# The warm-up step through the graph must match the eager forward to within this
# share of the hidden state's norm: a guard against a miscompiled graph, not a
# tolerance of accuracy (tests/worker/test_decode_graph.py compares greedy tokens).
WARM_UP_TOLERANCE = 1e-2

# A step of several rows attends as one batch padded to its longest sequence
# (graph_ops.padded_batch_decode) when the padded keys are at most this many times the
# real ones; otherwise through the op, which groups its sequences by length. One
# sequence of 1,000 tokens among fifteen of 100 took 990 us a layer as one batch against
# 473 through the op.
ONE_BATCH_PADDING = 1.5


class DecodeGraph:
    """The model's forward for pure-decode steps, compiled (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, caches: list[tuple[torch.Tensor, torch.Tensor]], block_size: int):
        self.model = model
        self.caches = caches
        # The CPU probes the forward reads (kernels/quant.py) are constants of the process:
        # the graph takes their values rather than tracing into them (a graph break).
        for probe in (quant.amx_granted, quant.wide_path, quant.table_path):
            torch.compiler.assume_constant_result(probe.__wrapped__)  # under functools.cache
        # The pool's shape never changes: static, the loops that index it divide by a known
        # block size rather than a symbol (an integer division per key read).
        for cache in (t for pair in caches for t in pair):
            torch._dynamo.mark_static(cache)
        self.block_size = block_size
        # Where torch's attention runs on AMX tiles in bf16 (reference.cpu_attention_dtype),
        # the op keeps every step: the one-batch loops compute in fp32.
        self.one_batch = reference.cpu_attention_dtype(caches[0][0].dtype) == torch.float32
        self.max_rows = quant.wide_path().rows - 1
        self.ready = False  # warm_up compiled every graph
        self.steps = 0  # steps the graphs ran
        self.eager_steps = 0  # steps they were meant to run that needed a graph warm_up did not build
        # Guards on the model's modules and their attributes (every weight's dtype, shape and
        # strides) cost about 1 ms a step to check; a loaded model never changes them, so
        # only the guards on the step's own tensors are kept. For the same reason the
        # graph does not assert its ~400 inputs' sizes and alignment again at every call
        # (the guards have checked the step's own): 0.1-0.2 ms a step.
        # The vector width inductor writes its C++ for is named in the options, which key
        # its on-disk cache: left implicit, a graph written for AVX2 (ATEN_CPU_CAPABILITY=avx2,
        # or a cache directory shared with another CPU) was loaded on AVX-512, its kernels
        # rebuilt for twice the lanes its loops step by, and they wrote past their buffers.
        self._forward = torch.compile(
            model.forward,
            dynamic=True,
            fullgraph=True,
            options={
                "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                "size_asserts": False,
                "alignment_asserts": False,
                "scalar_asserts": False,
                "cpp.simdlen": _vector_bits(),
            },
        )

    def takes(self, meta: AttentionMetadata) -> bool:
        """Whether this step runs through the graph."""
        return self.ready and meta.is_pure_decode and meta.num_tokens <= self.max_rows

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        graph_meta = _graph_metadata(meta, self.block_size, self.one_batch)
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                hidden = self._forward(input_ids, positions, graph_meta, self.caches)
        except RuntimeError as e:
            # A step no graph fits (a guard warm_up did not foresee) runs eagerly rather
            # than stall every request for a compile. torch raises a plain RuntimeError for
            # the stance, before the graph runs anything; any other error is the step's own.
            if "fail_on_recompile" not in str(e):
                raise
            if not self.eager_steps:
                log.warning("a decode step ran eagerly: %s", str(e).splitlines()[0])
            self.eager_steps += 1
            return self.model(input_ids, positions, meta, self.caches)
        self.steps += 1
        return hidden

    @torch.inference_mode()
    def warm_up(self) -> Optional[str]:
        """Compile the graphs of one and of two rows (two of those: attending as one batch
        and through the op), each checked against the eager forward on the same step;
        None when all are ready, else why not (the steps then stay eager). Writes the K/V
        of three tokens into the pool's first blocks, which no request holds yet."""
        started = time.monotonic()
        variants = [(1, False), (2, False)] + ([(2, True)] if self.one_batch else [])
        for rows, one_batch in variants:
            ids, positions, meta = self._dummy_step(rows)
            graph_meta = replace(_graph_metadata(meta, self.block_size, self.one_batch), decode_as_one_batch=one_batch)
            try:
                # Without duck sizing, which gives sizes equal in the warm-up step one symbol:
                # two rows' three query starts met the pool's three KV heads, and the model's
                # reshape to three heads then fixed the graph to two rows.
                # Floats specialized: the modules' own (each norm's eps) are constants of a
                # loaded model, and as graph inputs each became a tensor built at every call
                # (0.2 ms of a one-stream step, with the guards on them). The step passes no float.
                with (
                    warnings.catch_warnings(),
                    torch.fx.experimental._config.patch(use_duck_shape=False),
                    torch._dynamo.config.patch(specialize_float=True),
                ):
                    # assume_constant_result probes under functools.cache (kernels/quant.py):
                    # dynamo's notice that it reads through the cache is expected.
                    warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")
                    # inductor's notice that the KV write casts to the pool's fp16 in a bf16 loop
                    warnings.filterwarnings("ignore", message="bf16 and fp16 are mixed")
                    compiled = self._forward(ids, positions, graph_meta, self.caches)
            except Exception as e:  # a graph break, an op inductor cannot lower: stay eager
                return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            eager = self.model(ids, positions, meta, self.caches)
            error = ((compiled.float() - eager.float()).norm() / eager.float().norm()).item()
            if not error <= WARM_UP_TOLERANCE:
                how = " attending as one batch" if one_batch else ""
                return f"the compiled step of {rows} rows{how} strays {error:.2g} from the eager one"
        self.ready = True
        log.info("decode steps compiled in %.0f s", time.monotonic() - started)
        return None

    def _dummy_step(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """rows sequences of 3 * block_size + 1 tokens taking one token, in 4 blocks each."""
        num_blocks = self.caches[0][0].shape[0]
        tables = (torch.arange(4 * rows, dtype=torch.int32) % num_blocks).view(rows, 4)
        ctx = [3 * self.block_size] * rows
        positions = torch.tensor(ctx, dtype=torch.long)
        meta = attention_metadata(positions, [1] * rows, ctx, tables, self.block_size, positions.device)
        return torch.full((rows,), 1, dtype=torch.long), positions, meta


def _vector_bits() -> int:
    """The vector width inductor picks for this process's CPU (0: it does not vectorize)."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    return pick_vec_isa().bit_width()


def _graph_metadata(meta: AttentionMetadata, block_size: int, one_batch: bool) -> AttentionMetadata:
    """meta with block tables of their own, densely strided (the runner's are a slice of
    a wider table, and a graph guards on strides) and at least two columns wide, padded
    with block 0 (never read: attention masks keys past a sequence's length), since
    torch.compile specializes a dimension of size 1; and whether the step attends as one
    padded batch (one_batch allowing, see ONE_BATCH_PADDING)."""
    tables = meta.block_tables
    if tables.shape[1] == 1:
        tables = torch.cat((tables, torch.zeros_like(tables)), dim=1)
    dense = torch.empty(tables.shape, dtype=tables.dtype)  # strides of its own shape, even for one row
    padded_keys = tables.shape[0] * tables.shape[1] * block_size
    as_one_batch = one_batch and meta.num_seqs > 1 and padded_keys <= ONE_BATCH_PADDING * sum(meta.seq_lens_list)
    return replace(meta, block_tables=dense.copy_(tables), decode_as_one_batch=as_one_batch)
