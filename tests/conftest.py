"""Shared fixtures: models are built once per test session."""

import os

# The suite's workers, in process or spawned from it, run their steps eagerly: compiling
# the decode step (worker/decode_graph.py) takes 30-80 s on two cores per process. The
# tests of the compiled step turn it back on for themselves.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run in the interpreter. The switch must be set
# before any @triton.jit decorator runs, so here, before any test imports kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.model_fixtures import make_tiny_model, smollm2_path  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model(model_dir):
    """tiny_model(family, num_layers=None) -> checkpoint dir; families: tests/model_fixtures.TINY_FAMILIES."""
    return lambda family, num_layers=None: make_tiny_model(family, model_dir, num_layers)


@pytest.fixture(scope="session")
def smollm2():
    return smollm2_path()


@pytest.fixture(scope="module")
def gguf_parsed_once():
    """For the module's tests, gguf.GGUFReader parses each GGUF file once: every later
    load of the file by transformers (the tests' reference) gets the same parsed reader.

    gguf-py parses every element of the metadata arrays in Python: SmolLM2's 49k-token
    vocabulary takes ~4 s, Gemma 3's 262k-token one ~18 s, and transformers parses a
    file twice per load. The reader maps the file read-only, so sharing it changes
    nothing that is read. folio reads GGUF files with its own reader
    (worker/gguf_file.py), which this leaves alone.
    """
    import gguf

    parse = gguf.GGUFReader
    readers = {}

    def parsed_once(path, mode="r"):
        if mode != "r":
            return parse(path, mode)
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
        if key not in readers:
            readers[key] = parse(path)
        return readers[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", parsed_once)
        yield
