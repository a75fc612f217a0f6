"""One `folio serve` (Ray on 127.0.0.1, a worker actor behind gRPC, uvicorn on a free port,
the bundled SmolLM2) for every test of this folder: a start takes seconds, and each test
leaves the server as it found it."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.serving.server import MAX_MODEL_LEN, NUM_KV_BLOCKS, WORKER_THREADS, Server


@pytest.fixture(scope="package")
def server():
    import ray

    from folio.cluster.entrypoints.options import build_config
    from folio.cluster.entrypoints.serve import ServeConfig, serve_in_background

    if not ray.is_initialized():
        from folio.cluster.placement import start_local_ray

        start_local_ray()
    cfg = build_config(
        ServeConfig,
        port=0,
        max_model_len=MAX_MODEL_LEN,
        num_kv_blocks=NUM_KV_BLOCKS,
        max_num_seqs=64,
        max_num_batched_tokens=512,
        cpus_per_worker=WORKER_THREADS,
    )
    with serve_in_background(cfg) as bg:
        yield Server(bg.base_url, bg.deployment, bg.loop)


@pytest.fixture(scope="package")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="package")
def model(client):
    return client.models.list().data[0].id
