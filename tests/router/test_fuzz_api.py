"""Schemathesis against folio's own OpenAPI document: every operation, valid and
invalid bodies generated from the schema (and mutated past it), over real HTTP.

Nothing may answer 5xx, every error must be an OpenAI error object, and the server
must be healthy and serve a normal request afterwards. The schema describes the real
request bodies (router/app.py adds them), so the bounds it states are what is explored.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.model_fixtures import make_tiny_chat_model

pytestmark = pytest.mark.slow

KEY = "sk-fuzz"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 80  # per operation and generation mode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import ray

    from folio.cluster.entrypoints.options import build_config
    from folio.cluster.entrypoints.serve import ServeConfig, serve_in_background

    model = make_tiny_chat_model(tmp_path_factory.getbasetemp() / "models")
    if not ray.is_initialized():
        from folio.cluster.placement import start_local_ray

        start_local_ray()
    # A short context and a batch as wide as n may be keep every generated request cheap
    # on a tiny model.
    cfg = build_config(
        ServeConfig,
        model=model,
        port=0,
        max_model_len=64,
        num_kv_blocks=512,
        max_num_seqs=128,
        api_keys=(KEY,),
        max_body_bytes=256 << 10,
    )
    with serve_in_background(cfg) as bg:
        yield bg


@pytest.fixture(scope="module")
def api_schema(server):
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json", headers=AUTH)
    # A body over --max-request-body is refused with 413 before it is parsed: that rejects
    # invalid data too (schemathesis's default list of rejections lacks 413).
    rejection = schema.config.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    return schema


# Every operation the server documents (test_schema_lists_every_route checks this list).
OPERATIONS = [
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model_id}"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/tokenizer_info"),
    ("GET", "/health"),
    ("HEAD", "/health"),
    ("GET", "/health/replicas"),
    ("GET", "/metrics"),
    ("HEAD", "/metrics"),
]


@schemathesis.check
def openai_error_objects(ctx, response, case):
    """Every answer of 400 or more is {"error": {"message": str, "type": str, ...}}."""
    if response.status_code < 400:
        return
    body = response.json()
    err = body.get("error") if isinstance(body, dict) else None
    assert isinstance(err, dict) and isinstance(err.get("message"), str) and err["message"], body
    assert isinstance(err.get("type"), str), body
    assert "Traceback" not in err["message"] and "127.0.0.1" not in err["message"], body


def test_schema_lists_every_route(api_schema):
    documented = {(op.method.upper(), op.path) for op in (r.ok() for r in api_schema.get_all_operations())}
    assert documented == set(OPERATIONS)


# Operations without a body or parameters have no invalid inputs to generate.
CASES = [
    (m, p, mode) for m, p in OPERATIONS for mode in GenerationMode if m == "POST" or mode is GenerationMode.POSITIVE
]


@pytest.mark.parametrize("method,path,mode", CASES, ids=lambda x: getattr(x, "value", x))
def test_no_5xx_and_openai_errors(api_schema, method, path, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def run(case):
        case.call_and_validate(
            headers=AUTH,
            timeout=120,
            checks=[
                schemathesis.checks.not_a_server_error,
                openai_error_objects,
                schemathesis.checks.negative_data_rejection,
            ],
        )

    run()


def test_server_healthy_after_fuzzing(server):
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60) as h:
        assert h.get("/health").status_code == 200
        r = h.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "temperature": 0},
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        fe = server.deployment.frontend
        assert all(r.alive for r in fe.replicas)
