"""Offline generation in one process, on the same scheduler and worker as serving.

    llm = LLM()                                   # the bundled SmolLM2
    [res] = llm.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))
    print(res.outputs[0].text)

The worker is called in-process (InProcessExecutor); the step messages are the
ones that travel over gRPC when serving.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace
from typing import Iterable, Optional, Sequence, Union

from folio.cluster.engine import EngineCore, InProcessExecutor
from folio.cluster.entrypoints.options import build_config
from folio.cluster.scheduler import Scheduler
from folio.protos.config import EngineConfig
from folio.protos.messages import RequestOutput, SamplingParams, TokenLogprob
from folio.router.choices import ChoiceOutput, choice_id, choice_requests
from folio.router.errors import ApiError
from folio.router.limits import check_token_ids
from folio.worker.loader import load_tokenizer
from folio.worker.worker import Worker

Prompt = Union[str, Sequence[int]]


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: Optional[list[TokenLogprob]] = None
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None


@dataclass
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: Optional[list[Optional[TokenLogprob]]] = None
    num_cached_tokens: int = 0
    arrival_time: float = 0.0
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


class LLM:
    """LLM(model, **options): options are EngineConfig's fields by name (max_num_seqs=8,
    num_kv_blocks=64, device="cuda", ...), the settings `folio generate` and
    `folio serve` take as flags. tokenizer=False skips loading it (token-id prompts only)."""

    def __init__(self, model: Optional[str] = None, *, tokenizer: bool = True, **options):
        config = build_config(EngineConfig, model=model, **options)
        self.worker = Worker(config.worker, config.scheduler)
        model_config = self.worker.model_config
        self.tokenizer = load_tokenizer(self.worker.model_path) if tokenizer else None
        self.config = replace(
            config.scheduler,
            max_model_len=config.scheduler.max_model_len or model_config.max_position_embeddings,
            eos_token_ids=tuple(model_config.eos_token_ids),
            draft_model=self.worker.speculative_model,
        )
        self.engine = EngineCore(Scheduler(self.config, self.worker.num_blocks), InProcessExecutor(self.worker))
        self._ids = itertools.count()
        self._results: dict[str, GenerationResult] = {}
        self._children: dict[str, tuple[GenerationResult, CompletionOutput, ChoiceOutput]] = {}

    @property
    def scheduler(self) -> Scheduler:
        return self.engine.scheduler

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this LLM has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def chat_token_ids(self, messages: list[dict]) -> list[int]:
        """A conversation through the model's chat template, ready to generate the reply."""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    # ---------------------------------------------------------------- step-level API
    def add_request(
        self,
        prompt: Prompt,
        params: Optional[SamplingParams] = None,
        *,
        request_id: Optional[str] = None,
        priority: int = 0,
    ) -> str:
        """Queue one prompt (n > 1 makes n sequences); returns its request id."""
        params = params or SamplingParams()
        rid = request_id or f"req-{next(self._ids)}"
        ids = self.encode(prompt)
        vocab = self.worker.model_config.vocab_size
        try:  # the checks the HTTP edge makes, as ValueErrors
            check_token_ids(ids, vocab, "prompt")
            check_token_ids(params.stop_token_ids, vocab, "stop_token_ids", allow_empty=True)
            check_token_ids(list(params.logit_bias), vocab, "logit_bias", allow_empty=True)
        except ApiError as e:
            raise ValueError(f"{e.param}: {e.message}") from None
        if params.grammar is not None and self.worker.sampler.grammars is not None:
            self.worker.sampler.grammars.compile(params.grammar)  # a ValueError saying why it does not compile
        res = GenerationResult(rid, ids, [], arrival_time=time.monotonic())
        for i, child in enumerate(
            choice_requests(rid, [ids], params, priority=priority, arrival_time=res.arrival_time)
        ):
            self.engine.add_request(child)
            out = CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None)
            res.outputs.append(out)
            self._children[child.request_id] = (res, out, ChoiceOutput(self.tokenizer, ids, params))
        self._results[rid] = res
        return rid

    def abort(self, request_id: str) -> None:
        res = self._results.get(request_id)
        if res is not None:
            self._apply(self.engine.abort([choice_id(request_id, i) for i in range(len(res.outputs))]))

    def step(self) -> list[GenerationResult]:
        """Run one engine step; return the requests that finished in it."""
        return self._apply(self.engine.step())

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished_requests()

    def _apply(self, outputs: Iterable[RequestOutput]) -> list[GenerationResult]:
        done = []
        stopped = []
        for o in outputs:
            entry = self._children.get(o.request_id)
            if entry is None:
                continue
            res, out, choice = entry
            if res.first_token_time is None and o.new_token_ids:
                res.first_token_time = time.monotonic()
            out.token_ids.extend(o.new_token_ids)
            if o.logprobs and out.logprobs is not None:
                out.logprobs.extend(o.logprobs)
            if o.prompt_logprobs is not None:
                res.prompt_logprobs = o.prompt_logprobs
            res.num_cached_tokens = max(res.num_cached_tokens, o.num_cached_tokens)
            step = choice.add(o)
            if step.stopped:
                out.token_ids = out.token_ids[: len(choice.tokens)]
                if not o.finished:
                    stopped.append(o.request_id)
            if step.finished:
                choice.flush()  # the text once, at the end
                out.text = choice.text
                out.finish_reason, out.stop_reason = choice.finish_reason, choice.stop_reason
                del self._children[o.request_id]
                if res.finished:
                    res.finish_time = time.monotonic()
                    del self._results[res.request_id]
                    done.append(res)
        if stopped:
            self.engine.abort(stopped)  # a stop string ended them; free their blocks now
        return done

    # ---------------------------------------------------------------- batch API
    def generate(
        self,
        prompts: Sequence[Prompt],
        params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = False,
    ) -> list[GenerationResult]:
        """Generate for every prompt; results in prompt order."""
        plist = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        ids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), unit="req", dynamic_ncols=True)
        by_id = {}
        while self.has_unfinished():
            for res in self.step():
                by_id[res.request_id] = res
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return [by_id[i] for i in ids]
