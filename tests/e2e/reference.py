"""The bundled SmolLM2 in the test process: the engine whose outputs served ones must equal."""

from __future__ import annotations

import functools


@functools.cache
def reference_llm(kernels: str = "auto"):
    """Built on first use and kept for the session (a load takes seconds) by every test that
    compares against it. Shared: only generate() with it, which leaves nothing queued."""
    from folio.cluster.entrypoints.llm import LLM
    from tests.e2e.serving.server import MAX_MODEL_LEN, NUM_KV_BLOCKS

    return LLM(max_model_len=MAX_MODEL_LEN, num_kv_blocks=NUM_KV_BLOCKS, kernels=kernels)
