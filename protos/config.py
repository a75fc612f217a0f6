"""The settings of one replica, each with its one default: what its workers load
(WorkerConfig) and how its scheduler batches (SchedulerConfig); EngineConfig is
the two together, for one engine in one process.

They live here, below the head and the worker, because both read them: the
head schedules by SchedulerConfig and sends the worker its share of both in
LoadModelRequest (block_size and max_num_batched_tokens size the KV pool and the
profiled step). Torch-free, so the head and the CLI load them cheaply.

A field whose metadata has "help" is a user option: `folio serve` and
`folio generate` derive a flag from it and `LLM(**options)` takes it as a
keyword (cluster/entrypoints/options.py). Metadata "flag" names the flag where
the field's name would not, "choices" and "unit" ("bytes": 4GiB, 512MiB) say how
it parses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

MAX_SPECULATIVE_TOKENS = 16  # drafts per request per step; workers refuse more
DTYPES = ("float32", "bfloat16", "float16")
KV_CACHE_DTYPES = ("auto", *DTYPES)  # auto: the model's dtype
DEVICES = ("auto", "cpu", "cuda")
KERNELS = ("auto", "triton", "reference")  # kernels/ops.py select_ops
COMPILE = ("auto", "off")  # worker/decode_graph.py
# Weight formats a checkpoint may be quantized in (worker/loader.py detects which);
# "none" dequantizes at load, "auto" keeps the checkpoint's where a kernel pays.
QUANTIZATION_SCHEMES = ("gguf", "gptq", "awq", "compressed-tensors")
QUANTIZATIONS = ("auto", "none", *QUANTIZATION_SCHEMES)


def default_device(cuda_available: bool) -> str:
    return "cuda" if cuda_available else "cpu"


def default_dtype(device: str) -> str:
    """bf16 on a GPU (what serving models ship in), fp32 on CPU (exact against references)."""
    return "bfloat16" if str(device).startswith("cuda") else "float32"


@dataclass(frozen=True)
class WorkerConfig:
    """What each worker of a replica loads, and how big its KV pool is."""

    model: Optional[str] = field(default=None, metadata={"help": "model dir or .gguf (default: bundled SmolLM2)"})
    device: str = field(default="auto", metadata={"help": "auto: cuda where there is a GPU", "choices": DEVICES})
    dtype: Optional[str] = field(
        default=None, metadata={"help": "default: float32 on CPU, bfloat16 on CUDA", "choices": DTYPES}
    )
    kernels: str = field(
        default="auto",
        metadata={
            "help": "auto: Triton kernels on CUDA; elsewhere the PyTorch references, with torch's int4 kernel "
            "for weights kept quantized (its inputs in bfloat16); reference: the references alone (a float32 "
            "model computes exactly what its dequantized weights do)",
            "choices": KERNELS,
        },
    )
    quantization: str = field(
        default="auto",
        metadata={
            "help": "keep a quantized checkpoint's weights quantized (its scheme, or auto: "
            "yes unless on CPU in float32 with --kernels reference, or where torch's int4 kernel cannot take "
            "every quantized weight) or none: dequantize at load",
            "choices": QUANTIZATIONS,
        },
    )
    speculative_model: Optional[str] = field(
        default=None,
        metadata={
            "help": "speculative decoding with a draft model (dir or .gguf, the same tokenizer as --model): "
            "it proposes up to --num-speculative-tokens tokens per step, in its own KV cache on the "
            "first worker of each replica (default: n-gram drafts)"
        },
    )
    kv_cache_dtype: str = field(
        default="auto",
        metadata={
            "help": "the KV pool's element type (auto: the model's dtype, but 16 bits beside a float32 model "
            "whose weights stay quantized on CPU: bfloat16 where the CPU has AMX, else float16). A 16-bit "
            "pool beside a float32 model halves the pool, as llama.cpp's default f16 cache does; attention "
            "then computes in bfloat16 over a bfloat16 pool where the CPU has AMX, else in float32 over "
            "the widened K/V",
            "choices": KV_CACHE_DTYPES,
        },
    )
    compile: str = field(
        default="auto",
        metadata={
            "help": "auto: on CPU with --kernels auto and one worker a replica, decode steps run as one "
            "torch.compile graph, compiled at start (about two minutes on two cores the first time, cached "
            "on disk after; TORCH_COMPILE_DISABLE=1 turns it off too); off: every step eager",
            "choices": COMPILE,
        },
    )
    kv_cache_memory: Optional[int] = field(
        default=None,
        metadata={
            "help": "KV pool per worker, e.g. 2GiB (default: 1GiB on CPU, by --gpu-memory-utilization on a GPU)",
            "unit": "bytes",
        },
    )
    num_kv_blocks: Optional[int] = field(
        default=None, metadata={"help": "exact KV pool size in blocks (overrides --kv-cache-memory)"}
    )
    gpu_memory_utilization: float = field(
        default=0.9,  # vLLM's
        metadata={
            "help": "GPU without --kv-cache-memory or --num-kv-blocks: the share of each device's "
            "memory for the weights, a step's peak and the KV pool, which gets the rest"
        },
    )

    def __post_init__(self) -> None:
        for name in ("dtype", "kv_cache_dtype"):  # a torch.dtype, from Python callers, by its name
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, str(value).removeprefix("torch."))
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.compile not in COMPILE:
            raise ValueError(f"compile must be one of {', '.join(COMPILE)}, got {self.compile!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be above 0 and at most 1, got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be positive, got {self.kv_cache_memory}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one replica's continuous batching."""

    block_size: int = field(default=16, metadata={"help": "tokens per KV-cache block"})
    max_num_seqs: int = field(default=64, metadata={"help": "requests running at once per replica"})
    max_num_batched_tokens: int = field(
        default=512, metadata={"help": "tokens computed per step (longer prompts prefill in chunks)"}
    )
    max_model_len: int = field(
        default=0,
        metadata={"help": "prompt + output tokens per request (default: the model's, lowered to what the pool holds)"},
    )
    enable_prefix_caching: bool = field(
        default=True, metadata={"help": "share KV blocks of common prompt prefixes", "flag": "--no-prefix-caching"}
    )
    eos_token_ids: tuple[int, ...] = ()  # the model's, filled in once it is loaded
    num_speculative_tokens: int = field(
        default=0,
        metadata={
            "help": "speculative decoding: up to this many draft tokens (n-gram prompt lookup, or "
            "--speculative-model's) verified per step; 0 turns it off"
        },
    )
    speculative_max_batch: int = field(
        default=8,
        metadata={
            "help": "speculate only while at most this many requests run: in a larger batch a "
            "step is compute-bound and verifying drafts costs more than they save"
        },
    )
    draft_model: bool = False  # drafts come from the workers' draft model: set once they load
    prompt_lookup_min: int = field(default=2, metadata={"help": "shortest suffix n-gram looked up for drafts"})
    prompt_lookup_max: int = field(default=4, metadata={"help": "longest suffix n-gram looked up (tried first)"})

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("block_size, max_num_seqs and max_num_batched_tokens must be positive")
        if self.max_model_len < 0:
            raise ValueError(f"max_model_len must be positive, or 0 for the model's own, got {self.max_model_len}")
        if self.num_speculative_tokens < 0 or self.speculative_max_batch < 0:
            raise ValueError("num_speculative_tokens and speculative_max_batch must be non-negative")
        if self.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"num_speculative_tokens is at most {MAX_SPECULATIVE_TOKENS}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(
                f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                f"{self.prompt_lookup_min}, {self.prompt_lookup_max}"
            )


@dataclass(frozen=True)
class EngineConfig:
    """One engine in one process: what LLM(**options) and `folio generate` take."""

    worker: WorkerConfig = field(default_factory=WorkerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        check_speculation(self.worker, self.scheduler)


def check_speculation(worker: WorkerConfig, scheduler: SchedulerConfig) -> None:
    if worker.speculative_model and not scheduler.num_speculative_tokens:
        raise ValueError("--speculative-model needs --num-speculative-tokens: how many tokens it drafts per step")
