"""A GGUF file's tokenizer is rebuilt once and then read from folio's cache, unchanged."""

from __future__ import annotations

import os

import pytest

from folio.worker import loader

pytestmark = pytest.mark.slow

TEXTS = [
    "Hello world",
    "café 😀 ünïcode",
    "<|im_start|>user\nhi<|im_end|>",
    "  spaces\n\ttabs",
    "def f(x):\n  return x",
]


def test_a_gguf_tokenizer_is_cached_and_loads_back_identical(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("FOLIO_CACHE_DIR", str(tmp_path))
    built = loader.load_tokenizer(smollm2)
    cached_dir = loader._tokenizer_cache_dir(smollm2)
    assert os.path.isfile(os.path.join(cached_dir, "tokenizer.json"))
    again = loader.load_tokenizer(smollm2)
    assert again.name_or_path == cached_dir  # read from the cache, not rebuilt
    assert [again.encode(t) for t in TEXTS] == [built.encode(t) for t in TEXTS]
    ids = list(range(0, len(built), 97))
    assert again.decode(ids) == built.decode(ids)
    assert again.get_vocab() == built.get_vocab()
    assert (again.eos_token_id, again.bos_token_id, again.all_special_ids) == (
        built.eos_token_id,
        built.bos_token_id,
        built.all_special_ids,
    )
    chat = [{"role": "user", "content": "hi"}]
    assert again.apply_chat_template(chat, tokenize=False) == built.apply_chat_template(chat, tokenize=False)
