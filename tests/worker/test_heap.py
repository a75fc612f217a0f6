"""A worker's resident memory after loading is its tensors, not glibc's holes (worker/heap.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from folio.worker.heap import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="worker/heap.py tunes glibc's malloc; this libc is not glibc")

# In a fresh interpreter (this one's heap has a history): a Worker built on the model,
# and how far its resident memory grew against the bytes of its tensors and KV pool.
_LOAD = r"""
import json, sys
import gguf, torch  # imported before the baseline: the load is what is measured
from folio.protos.config import WorkerConfig
from folio.worker.worker import Worker

def resident():
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["VmRSS"].split()[0]) << 10

before = resident()
worker = Worker(WorkerConfig(model=sys.argv[1], device="cpu", compile="off", num_kv_blocks=8))
grew = resident() - before
storages = {}
for t in [*worker.model.buffers(), *worker.model.parameters()]:
    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
print(json.dumps({"grew": grew, "tensors": sum(storages.values()) + worker.pool.nbytes}))
"""


def test_a_loaded_worker_holds_little_beyond_its_tensors(tmp_path):
    """A 110 MiB GGUF of Q4_1 layers grew its worker 1.27x its tensors' bytes with
    glibc placing the load's blocks as it likes, 1.08x with loading_heap."""
    from tests.gguf_fixtures import write_random_llama_gguf

    path = write_random_llama_gguf(str(tmp_path / "m.gguf"), hidden=1024, inter=2816, layers=8, heads=16, kv_heads=4)
    run = subprocess.run([sys.executable, "-c", _LOAD, path], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured["tensors"] > 200 << 20  # the model, not the runtime, is what grew
    assert measured["grew"] < 1.15 * measured["tensors"], measured
