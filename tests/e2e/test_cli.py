"""The `folio` command as a user runs it: offline generation and the benchmarks."""

import json
import os
import subprocess
import sys

import pytest
import torch


def _folio(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "folio.cluster.entrypoints.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )


@pytest.mark.slow
def test_generate_writes_one_completion_per_line(tmp_path):
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [
        {"id": "chat", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 12},
        {"id": "plain", "prompt": "One, two, three,", "max_tokens": 5},
        {"id": "stop", "prompt": "One, two, three,", "max_tokens": 12, "stop": [","]},
        {"id": "choice", "prompt": "Is the sky blue?", "max_tokens": 8, "guided_choice": ["yes", "no"]},
        {
            "id": "json",
            "prompt": "A city as JSON:",
            "max_tokens": 40,
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "city",
                    "schema": {
                        "type": "object",
                        "properties": {"name": {"type": "string", "maxLength": 12}},
                        "required": ["name"],
                    },
                },
            },
        },
    ]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _folio("generate", "--input", str(src), "--output", str(dst))
    out = {r["id"]: r for r in map(json.loads, dst.read_text().splitlines())}
    assert set(out) == {"chat", "plain", "stop", "choice", "json"}
    assert out["choice"]["text"] in ("yes", "no")
    assert set(json.loads(out["json"]["text"])) == {"name"}
    assert out["chat"]["text"].startswith("The capital of France is Paris")
    assert len(out["plain"]["token_ids"]) == 5 and out["plain"]["finish_reason"] == "length"
    assert "," not in out["stop"]["text"] and out["stop"]["finish_reason"] == "stop"


def test_generate_refuses_a_row_with_a_bad_constraint(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "x", "guided_choice": [], "guided_regex": "a"}) + "\n")
    with pytest.raises(subprocess.CalledProcessError) as e:
        _folio("generate", "--input", str(src), "--output", str(tmp_path / "out.jsonl"), "--num-kv-blocks", "16")
    assert "line 1" in e.value.stderr
    assert "worker ready" not in e.value.stderr, "the rows are checked before the model loads"


@pytest.mark.slow
def test_bench_throughput_prints_both_sides_and_their_ratio(tmp_path, tiny_model):
    report = tmp_path / "bench.json"  # a tiny model: the test is of the bench, not of speed
    res = _folio(
        "bench",
        "throughput",
        "--model",
        tiny_model("llama"),
        "--num-requests",
        "4",
        "--prompt-median",
        "16",
        "--output-median",
        "8",
        "--json",
        str(report),
    )
    assert "folio / baseline throughput" in res.stdout
    rows = json.loads(report.read_text())["rows"]
    assert [r["name"].split()[0] for r in rows] == ["folio", "transformers"]
    assert rows[0]["output_tokens"] == rows[1]["output_tokens"] > 0
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 0 for r in rows)


@pytest.mark.slow
def test_bench_spec_compares_plain_and_speculative_decoding(tmp_path):
    report = tmp_path / "spec.json"
    res = _folio(
        "bench", "spec", "--max-tokens", "12", "--workload", "copy", "--num-prompts", "1", "--concurrency", "1", "2",
        "--json", str(report),
    )  # fmt: skip
    rows = json.loads(report.read_text())["rows"]
    assert [(r["workload"], r["concurrency"]) for r in rows] == [("copy", 1), ("copy", 2)]
    assert all(r["plain_tok_s"] > 0 and r["spec_tok_s"] > 0 for r in rows)
    assert all(0 <= r["same_outputs"] <= r["outputs"] == r["concurrency"] for r in rows)
    copy = rows[0]
    assert copy["acceptance"] > 0.5 and copy["tokens_per_step"] > 1.5, "copying should accept drafts"
    assert "ratio" in res.stdout


def test_serve_refuses_to_listen_beyond_loopback_without_a_key():
    """Checked before Ray or any worker starts: the mistake costs a second, not a model load."""
    env = {k: v for k, v in os.environ.items() if k != "FOLIO_API_KEY"}
    # Both at once: each spends its time importing serve's modules, one core each.
    no_key, no_file = procs = [
        subprocess.Popen(
            [sys.executable, "-m", "folio.cluster.entrypoints.cli", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for args in (["--host", "0.0.0.0"], ["--api-key-file", "/no/such/file"])
    ]
    try:
        _, err = no_key.communicate(timeout=120)
        assert no_key.returncode != 0 and "set an API key" in err, err[-500:]
        _, err = no_file.communicate(timeout=120)
        assert no_file.returncode != 0 and "No such file" in err and "Traceback" not in err
    finally:
        for p in procs:  # one that did not refuse is serving
            p.kill()
            p.wait()


# A GPU image may lack Ray and the HTTP stack (.ci/gpu_check.sh runs there): the
# offline commands and benchmarks must still load; those needing them drop out.
_WITHOUT_SERVING_STACK = """
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("ray", "fastapi", "uvicorn", "starlette"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
from folio.cluster.entrypoints.cli import build_parser
from folio.cluster.entrypoints.bench.kernels import run_kernel_bench
parser = build_parser()
commands = parser._subparsers._group_actions[0].choices
bench = commands["bench"]._subparsers._group_actions[0].choices
print(sorted(commands), sorted(bench))
"""


def test_offline_commands_load_without_ray_or_the_http_stack():
    r = subprocess.run(
        [sys.executable, "-c", _WITHOUT_SERVING_STACK], capture_output=True, text=True, timeout=300, check=True
    )
    assert (
        r.stdout.split("\n")[0]
        == "['batch', 'bench', 'generate'] ['kernels', 'serve', 'spec', 'structured', 'throughput']"
    ), r.stdout


def test_kernel_bench_without_a_gpu_times_cpu_decode_attention_and_int4_matmul(tmp_path, monkeypatch):
    """Without CUDA, `folio bench kernels` times the CPU decode attention over a bf16
    pool in fp32 and in bf16 and writes both, with how far apart they are, and
    the int4 kernel against the wide-batch path's fp32 and bf16 GEMMs by rows, and an
    8-bit LM head as two int4 terms against its bf16 copy's products."""
    from folio.cluster.entrypoints.bench import cpu_attention, cpu_quant
    from folio.cluster.entrypoints.bench.kernels import run_kernel_bench

    monkeypatch.setattr(cpu_attention, "CASES", ((2, 40),))
    monkeypatch.setattr(cpu_quant, "ROWS", (1, 8))
    monkeypatch.setattr(cpu_quant, "HEAD_SHAPE", (4096, 576))
    monkeypatch.setattr(cpu_quant, "HEAD_ROWS", (1, 8))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    row, *quant, head1, head8 = run_kernel_bench(str(tmp_path))
    assert json.loads((tmp_path / "kernel_bench.json").read_text()) == [row, *quant, head1, head8]
    assert (row["batch"], row["context"]) == (2, 40)
    assert row["fp32_us"] > 0 and row["bf16_us"] > 0
    assert 0 < row["max_abs_diff"] < 2e-2  # the two differ by bf16 rounding only
    assert [(r["kind"], r["rows"]) for r in quant] == [("cpu-int4", 1), ("cpu-int4", 8)]
    assert all(r["int4_ms"] > 0 and r["wide_ms"] > 0 and r["wide_bf16_ms"] > 0 for r in quant)
    assert [(r["kind"], r["rows"]) for r in (head1, head8)] == [("cpu-lm-head", 1), ("cpu-lm-head", 8)]
    assert all(r["terms_ms"] > 0 and r["copy_ms"] > 0 and r["onednn_ms"] > 0 for r in (head1, head8))
