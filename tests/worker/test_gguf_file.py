"""worker/gguf_file.py against gguf-py's own reader: the same metadata values, tensor
types, shapes and bytes, for files gguf-py's writer makes with every value type and
the block types folio reads, and for the real SmolLM2 file; a damaged or foreign file
is refused with a reason, never read past its end."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from folio.worker.gguf_file import read_gguf
from tests.gguf_fixtures import random_gguf_blocks
from tests.model_fixtures import smollm2_path

BLOCK_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)


def _write(path, endianess=gguf.GGUFEndian.LITTLE, alignment=None) -> str:
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    if alignment:
        w.add_custom_alignment(alignment)
    for i, kind in enumerate((V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64)):
        w.add_key_value(f"test.int.{kind.name}", 100 + i, kind)
    w.add_key_value("test.f32", 0.25, V.FLOAT32)
    w.add_key_value("test.f64", 1e-300, V.FLOAT64)
    w.add_key_value("test.bool", True, V.BOOL)
    w.add_key_value("test.str", "Grüße, 世界", V.STRING)
    w.add_array("test.strings", ["", "a", "<0x0A>", "ünï", "x" * 300])
    w.add_array("test.ints", [3, -1, 7])
    w.add_array("test.floats", [0.5, -2.0])
    w.add_array("test.bools", [True, False, True])
    w.add_array("test.empty", [])
    w.add_tensor("plain.f32", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("plain.f16", rng.standard_normal((2, 5)).astype(np.float16))
    w.add_tensor("plain.i32", np.arange(12, dtype=np.int32).reshape(3, 4))
    for qtype in BLOCK_TYPES:
        blocks = random_gguf_blocks(qtype, rows=4, cols=256, rng=rng)
        w.add_tensor(f"blocks.{qtype.name}", blocks, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def _assert_same(path: str) -> None:
    ours, theirs = read_gguf(path), gguf.GGUFReader(path)
    keys = [k for k in theirs.fields if not k.startswith("GGUF.")]  # gguf-py lists the header too
    assert list(ours.fields) == keys
    for key in keys:
        assert ours.fields[key] == theirs.fields[key].contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert (a.tensor_type, a.shape) == (b.tensor_type, tuple(int(d) for d in b.shape)), a.name
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape, a.name
        assert np.array_equal(a.data, b.data), a.name


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_type_and_block_type_reads_as_gguf_py_reads_it(tmp_path, alignment):
    path = _write(tmp_path / "all.gguf", alignment=alignment)
    _assert_same(path)
    f = read_gguf(path)
    assert f.field("test.str") == "Grüße, 世界" and f.field("test.strings")[-1] == "x" * 300
    assert f.field("test.missing", "default") == "default"
    assert f.field("test.bool") is True and f.field("test.int.INT64") == 107


def test_the_real_smollm2_file_reads_as_gguf_py_reads_it():
    _assert_same(smollm2_path())


def test_a_big_endian_file_is_refused_with_the_reason(tmp_path):
    path = _write(tmp_path / "be.gguf", endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(ValueError, match="big-endian GGUF files are not supported"):
        read_gguf(path)


def test_damaged_files_are_refused_without_reading_past_the_end(tmp_path):
    good = open(_write(tmp_path / "good.gguf"), "rb").read()

    def read(data: bytes):
        p = tmp_path / "bad.gguf"
        p.write_bytes(data)
        return read_gguf(str(p))

    with pytest.raises(ValueError, match="not a GGUF file"):
        read(b"GGML" + good[4:])
    with pytest.raises(ValueError, match="version 7"):
        read(good[:4] + (7).to_bytes(4, "little") + good[8:])
    # Cut in the header, a metadata key, a tensor's description, the last tensor's data
    # (not the padding after it).
    for cut in (20, good.index(b"test.strings") + 4, good.index(b"blocks.Q4_K") + 4, len(good) - 40):
        with pytest.raises(ValueError, match="truncated|runs past the end"):
            read(good[:cut])
    # A metadata count or string length a hostile file inflates: an error, not a hang.
    huge = (1 << 62).to_bytes(8, "little")
    with pytest.raises(ValueError, match="truncated"):
        read(good[:16] + huge + good[24:])
    key = good.index(b"test.strings")
    for at in (key - 8, key + len("test.strings") + 8):  # the key's length, the array's count
        with pytest.raises(ValueError, match="truncated"):
            read(good[:at] + huge + good[at + 8 :])


def _mapped_kib(path: str) -> int:
    """KiB of `path` mapped into this process and resident (every mapping of it)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            first = line.split()[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                inside = line.rstrip().endswith(path)
            elif inside and first == "Rss:":
                total += int(line.split()[1])
    return total


def test_a_released_tensor_leaves_the_process_memory_and_reads_the_same():
    """A load drops each tensor's pages once the model holds what it needs of it
    (gguf_loader.gguf_tensors), so that the file is not counted on top of the weights."""
    path = smollm2_path()
    reader = read_gguf(path)
    table = next(t for t in reader.tensors if t.name == "token_embd.weight")  # 29 MB of Q8_0
    before = _mapped_kib(path)
    checksum = int(table.data.sum(dtype=np.uint64))  # reads every page
    read = _mapped_kib(path)
    assert read - before > 0.9 * table.data.nbytes / 1024
    reader.release(table)
    assert _mapped_kib(path) < read - 0.9 * table.data.nbytes / 1024
    assert int(table.data.sum(dtype=np.uint64)) == checksum  # mapped again, the same bytes


def test_a_random_llama_of_any_size_serves_with_smollm2s_tokenizer(tmp_path):
    """The model the README measures memory on, at a test's size: it loads kept
    quantized, and its chat template and tokenizer are SmolLM2's."""
    from folio.cluster.entrypoints.llm import LLM
    from folio.protos.messages import SamplingParams
    from tests.gguf_fixtures import write_random_llama_gguf

    path = write_random_llama_gguf(str(tmp_path / "random.gguf"), hidden=256, inter=512, layers=2, heads=4, kv_heads=2)
    llm = LLM(path, kv_cache_memory=16 << 20, compile="off")
    assert (llm.worker.model_config.hidden_size, llm.worker.model_config.quantization) == (256, "gguf")
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = llm.chat_token_ids(chat)
    assert prompt == LLM(kv_cache_memory=16 << 20, compile="off").chat_token_ids(chat)
    out = llm.generate([prompt], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 5
