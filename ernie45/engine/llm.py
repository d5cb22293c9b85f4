"""`ernie45.LLM`: batched generation, chat and streaming over any ERNIE 4.5 checkpoint.

All three are clients of the continuous-batching scheduler (`batcher.BatchEngine`), stepped on the caller's thread:
a list of prompts is one batch of requests. Each request's `RowState` detokenizes incrementally, applies stop
rules, keeps its log-probabilities and says when it is done.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..checkpoint import load
from ..embedded import default_model_path
from ..processing.chat_template import split_reasoning
from ..processing.processor import Processor, load_processor
from ..processing.tools import check_tools, choice_grammar, finish_with_calls, parse_tool_calls
from ..runtime.prepare import Plan, QuantizingLoader, prepare
from .compiled import CompiledDecoder
from .detokenize import IncrementalDetokenizer
from .sampling import Logprob, SamplingParams
from .structured import StructuredOutputs


@dataclass
class CompletionOutput:
    """One answer to a prompt (vLLM's name and fields); `SamplingParams(n=...)` asks for several."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop string or stop id), "length" (max_tokens) or "abort"
    reasoning: str | None = None
    logprobs: list[dict[int, Logprob]] | None = None  # per answer token, with `SamplingParams(logprobs=k)`
    tool_calls: list[dict] | None = None  # OpenAI `tool_calls` parsed from the answer (`chat(..., tools=...)`)


@dataclass
class Completion:
    """The result of one prompt: its first answer's fields directly, every answer in `outputs` (as vLLM's
    `RequestOutput`: `out.outputs[0].text`)."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS, stop string or stop id), "length" (max_tokens) or "abort"
    prompt_tokens: int
    completion_tokens: int
    reasoning: str | None = None
    outputs: list[CompletionOutput] = field(default_factory=list)
    prompt_token_ids: list[int] = field(default_factory=list)
    prompt: str | None = None  # the prompt's text where it was given as text (vLLM's `RequestOutput.prompt`)
    logprobs: list[dict[int, Logprob]] | None = None  # the first answer's, per token (`SamplingParams.logprobs`)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # per prompt token, None for the first
    tool_calls: list[dict] | None = None  # the first answer's tool calls (`chat(..., tools=...)`)

    def __post_init__(self) -> None:
        if not self.outputs:
            self.outputs = [CompletionOutput(0, self.text, self.token_ids, self.finish_reason, self.reasoning,
                                             self.logprobs, self.tool_calls)]  # fmt: skip


@dataclass
class Delta:
    """One streaming step: new text (always whole UTF-8 characters); finish_reason set on the last one."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[dict[int, Logprob]] | None = None  # one per id in token_ids, with `SamplingParams.logprobs`


class RowState:
    def __init__(self, detok: IncrementalDetokenizer, params: SamplingParams, eos: set[int], prompt_tokens: int):
        self.detok, self.params, self.eos, self.prompt_tokens = detok, params, eos, prompt_tokens
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    def push(self, token: int) -> str:
        """Take one sampled token; return the text it releases."""
        p = self.params
        if (token in self.eos and not p.ignore_eos) or token in p.stop_token_ids:
            self.finish_reason = "stop"
            return self.detok.flush()
        self.token_ids.append(token)
        delta = self.detok.push(token)
        if self.detok.stopped:
            self.finish_reason = "stop"
        elif len(self.token_ids) >= p.max_tokens:
            self.finish_reason = "length"
            delta += self.detok.flush()
        return delta

    def completion(self, chat: bool) -> Completion:
        text, reasoning = self.detok.text, None
        if chat:
            reasoning, text = split_reasoning(text)
        return Completion(text, list(self.token_ids), self.finish_reason or "abort", self.prompt_tokens,
                          len(self.token_ids), reasoning, logprobs=self.logprobs,
                          prompt_logprobs=self.prompt_logprobs)  # fmt: skip


class LLM:
    """Generation engine. ``LLM(dir)`` loads the checkpoint and its processor; ``LLM()`` the embedded demo model;
    or pass a model and its processor."""

    def __init__(self, model_or_dir: Any = None, *, dtype=None, device=None, processor: Processor | None = None,
                 quantization: str | None = None, compile: bool | None = None, model: Any = None,
                 **vllm_options: Any) -> None:  # fmt: skip
        """compile: decode through torch.compile (fixed shapes; CUDA graphs on GPU); None = on for CUDA only.
        The first generation of each batch size and length bucket pays the compile time.

        vLLM's spellings work too: `LLM(model=DIR)`, and the options of `vllm_options.VLLM_OPTIONS` that mean
        something here (`enforce_eager`, `seed`, `max_model_len`, `tensor_parallel_size=1`, ...); any other
        is refused by name rather than ignored."""
        from .vllm_options import apply_vllm_options

        if model is not None:
            if model_or_dir is not None:
                raise TypeError("LLM: pass the checkpoint once, positionally or as model=")
            model_or_dir = model
        dtype = None if dtype == "auto" else dtype
        compile, vllm = apply_vllm_options(vllm_options, compile)
        if model_or_dir is None:
            model_or_dir = default_model_path()
        if isinstance(model_or_dir, (str, Path)):
            from ..hub import resolve

            path = resolve(model_or_dir)
            if dtype is None and (device is None or torch.device(device).type == "cpu"):
                dtype = torch.float32  # bf16/fp16 storage computes faster in fp32 on CPUs without AMX
            on_layer = QuantizingLoader(quantization) if quantization else None
            self.model = load(path, dtype=dtype, device=device, on_layer=on_layer)
            self.model.quantized_while_loading = bool(on_layer and on_layer.layers)
            self.processor = processor or load_processor(path)
            owned = True
        else:
            self.model = model_or_dir
            source = getattr(self.model.config, "name_or_path", "")
            if processor is None and not source:
                raise ValueError("pass processor= with a model object (or give LLM a checkpoint directory)")
            self.processor = processor or load_processor(source)
            owned = False
        if compile is None:
            compile = self.model.device.type == "cuda"
        self.report = prepare(self.model, Plan(quantization=quantization, compile=compile, owned=owned))
        self._check_token_ids()
        self.decoder = CompiledDecoder(self.model) if compile else None
        c = self.model.config
        eos = c.eos_token_id if isinstance(c.eos_token_id, list) else [c.eos_token_id]
        sep = self.processor.ids.get("sep")
        self.eos = {t for t in [*eos, self.processor.tokenizer.eos_token_id, sep] if t is not None}
        self.default_sampling = self._generation_defaults(Path(getattr(c, "name_or_path", "") or "."))
        if vllm.get("seed") is not None:
            self.default_sampling = replace(self.default_sampling, seed=vllm["seed"])
        self.max_model_len = min(vllm.get("max_model_len") or c.max_position_embeddings, c.max_position_embeddings)
        self.speculative = vllm.get("speculative")  # prompt-lookup drafts, verified by the scheduler

    def _check_token_ids(self) -> None:
        c, ids = self.model.config, self.processor.ids
        for role, key in (("image", "image_token_id"), ("video", "video_token_id"), ("audio", "audio_token_id")):
            if role in ids and getattr(c, key) is not None and ids[role] != getattr(c, key):
                raise ValueError(
                    f"the tokenizer's {role} placeholder is id {ids[role]} but config.{key} is "
                    f"{getattr(c, key)}: tokenizer and model do not belong together"
                )

    @staticmethod
    def _generation_defaults(path: Path) -> SamplingParams:
        file = path / "generation_config.json"
        if not file.is_file():
            return SamplingParams()
        g = json.loads(file.read_text())
        keys = ("temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty", "frequency_penalty")
        params = {k: g[k] for k in keys if g.get(k) is not None}
        if g.get("do_sample") is False:  # transformers' way of saying greedy
            params["temperature"] = 0.0
        if g.get("max_new_tokens"):  # the answer length the checkpoint asks for (was ignored: always 256)
            params["max_tokens"] = int(g["max_new_tokens"])
        return SamplingParams(**params)

    # ---- public API -------------------------------------------------------------------------------------
    def generate(self, prompts, sampling: SamplingParams | list[SamplingParams] | None = None, *,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[Completion]:  # fmt: skip
        """Complete raw prompts: a string, token ids, vLLM's `{"prompt": ..., "multi_modal_data": {"image": ...}}`
        (or `{"prompt_token_ids": ...}`), or a list of these. `sampling_params` is vLLM's name for `sampling`; a
        list gives each prompt its own. `use_tqdm` (vLLM's name) draws a bar over the finished prompts on
        stderr."""
        prompts = _as_list(prompts)
        encoded = [self._encode_prompt(p) for p in prompts]
        params = self._params(sampling, sampling_params, len(encoded))
        results = self._complete_each(encoded, params, chat=False, progress=use_tqdm)
        for result, prompt in zip(results, prompts, strict=True):
            result.prompt = (
                prompt if isinstance(prompt, str) else (prompt.get("prompt") if isinstance(prompt, dict) else None)
            )
        return results

    def chat(self, messages, sampling: SamplingParams | list[SamplingParams] | None = None, *,
             sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = False,
             tools: list[dict] | None = None, tool_choice: str | dict | None = None, parallel_tool_calls: bool = True,
             **template_kw: Any) -> list[Completion]:  # fmt: skip
        """Answer one conversation (a list of messages) or several (a list of such lists).

        tools: OpenAI function tools; calls in the answer come back parsed in `.tool_calls` (finish_reason
        "tool_calls"). tool_choice: "auto" (default with tools), "none", "required" or {"type": "function",
        "function": {"name": ...}}; the last two are enforced by constrained decoding, so the calls always parse
        and match the function's parameter schema."""
        convs = messages if messages and isinstance(messages[0], list) else [messages]
        tools = check_tools(tools)
        encoded = [self.processor.encode_chat(m, tools=tools, **template_kw) for m in convs]
        params = self._params(sampling, sampling_params, len(encoded))
        grammar = choice_grammar(tools, tool_choice, parallel_tool_calls)
        if grammar is not None:
            params = [replace(p, structured_outputs=StructuredOutputs(grammar=grammar)) for p in params]
        results = self._complete_each(encoded, params, chat=True, progress=use_tqdm)
        if tools and tool_choice != "none":
            for r in results:
                r.outputs = [_with_calls(o, tools) for o in r.outputs]
                first = r.outputs[0]
                r.text, r.tool_calls, r.finish_reason = first.text, first.tool_calls, first.finish_reason
        return results

    def _params(self, sampling, sampling_params, n: int) -> list[SamplingParams]:
        if sampling is not None and sampling_params is not None:
            raise TypeError("pass sampling or sampling_params (vLLM's name), not both")
        given = sampling if sampling is not None else sampling_params
        if isinstance(given, (list, tuple)):
            if len(given) != n:
                raise ValueError(f"{len(given)} sampling params for {n} prompts: give one, or one per prompt")
            return list(given)
        return [given or self.default_sampling] * n

    def _complete_each(self, encoded: list[dict], params: list[SamplingParams], chat: bool,
                       progress: bool = False) -> list[Completion]:  # fmt: skip
        """Prompts that share their sampling params run as one batch; `n` answers each become `n` rows."""
        results: list[Completion | None] = [None] * len(encoded)
        distinct = list({id(p): p for p in params}.values())  # by identity: the dataclass is not hashable
        for p in distinct:
            idx = [i for i, q in enumerate(params) if q is p]
            rows = self._complete([encoded[i] for i in idx for _ in range(p.n)], p, chat, progress)
            for k, i in enumerate(idx):
                results[i] = _merge(rows[k * p.n : (k + 1) * p.n], encoded[i]["input_ids"])
        return results  # type: ignore[return-value]

    def stream(self, prompt_or_messages, sampling: SamplingParams | None = None, *,
               sampling_params: SamplingParams | None = None, **template_kw: Any) -> Iterator[Delta]:  # fmt: skip
        """Stream one prompt (string / ids / vLLM prompt dict) or conversation (list of messages) as text deltas."""
        sampling = self._params(sampling, sampling_params, 1)[0]
        if sampling.n != 1:
            raise ValueError("stream gives one answer; use n=1 (generate or chat return n answers)")
        if isinstance(prompt_or_messages, list) and prompt_or_messages and isinstance(prompt_or_messages[0], dict):
            encoded = self.processor.encode_chat(prompt_or_messages, **template_kw)
        else:
            encoded = self._encode_prompt(prompt_or_messages)
        params = sampling or self.default_sampling
        for (req,) in self._scheduled([encoded], [params]):  # the scheduler, stepped here
            while not req.out.empty():
                item = req.out.get_nowait()
                if isinstance(item, BaseException):
                    raise item
                yield item

    # ---- the loop ---------------------------------------------------------------------------------------
    def _encode_prompt(self, prompt) -> dict[str, Any]:
        if isinstance(prompt, str):
            return self.processor.encode(prompt)
        if isinstance(prompt, dict):
            return self._encode_vllm_prompt(prompt) if "input_ids" not in prompt else prompt
        return {"input_ids": list(prompt)}

    def _encode_vllm_prompt(self, prompt: dict) -> dict[str, Any]:
        """vLLM's prompt dicts: {"prompt" | "prompt_token_ids": ..., "multi_modal_data": {"image" | "video" |
        "audio": one or a list}}; the text holds one placeholder per item, as vLLM requires."""
        known = {"prompt", "prompt_token_ids", "multi_modal_data"}
        if set(prompt) - known or not {"prompt", "prompt_token_ids"} & set(prompt):
            raise ValueError(f"a prompt dict takes 'prompt' or 'prompt_token_ids', and 'multi_modal_data'; got "
                             f"{sorted(prompt)}")  # fmt: skip
        media = dict(prompt.get("multi_modal_data") or {})
        unknown = set(media) - {"image", "video", "audio"}
        if unknown:
            raise ValueError(f"multi_modal_data takes image, video and audio; not {sorted(unknown)}")
        items = {k: v if isinstance(v, list) else [v] for k, v in media.items()}
        if "prompt_token_ids" in prompt:
            ids = list(prompt["prompt_token_ids"])
        else:
            ids = self.processor.tokenizer.encode(prompt["prompt"], add_special_tokens=False)
        return self.processor.encode_ids(ids, items.get("image"), items.get("video"), items.get("audio"))

    def row_state(self, params: SamplingParams, prompt_tokens: int) -> RowState:
        """The per-request state that detokenizes, applies stop rules and says when a row is done."""
        detok = IncrementalDetokenizer(self.processor.tokenizer, params.stop, self.processor.hidden_ids)
        return RowState(detok, params, self.eos, prompt_tokens)

    def _check_fits(self, encoded: list[dict]) -> None:
        longest, limit = max(len(e["input_ids"]) for e in encoded), self.max_model_len
        if longest >= limit:
            raise ValueError(f"the prompt has {longest} tokens; this model reads at most {limit}")

    def _complete(self, encoded: list[dict], params: SamplingParams, chat: bool,
                  progress: bool = False) -> list[Completion]:  # fmt: skip
        """progress: a bar over the finished requests on stderr."""
        self._check_fits(encoded)
        bar = tqdm(total=len(encoded), desc="generating", unit="prompt", disable=not progress)
        per_row = [
            params if params.seed is None else replace(params, seed=params.seed + i) for i in range(len(encoded))
        ]  # fmt: skip  (each row its own stream of samples)
        reqs: list = []
        for reqs in self._scheduled(encoded, per_row):  # the scheduler, stepped here: one batch of requests
            bar.update(sum(r.finished for r in reqs) - bar.n)
        bar.close()
        return [r.row.completion(chat) for r in reqs]

    def _scheduled(self, encoded: list[dict], params: list[SamplingParams]) -> Iterator[list]:
        """The continuous-batching scheduler (`batcher.BatchEngine`) stepped on this thread for these prompts, one
        request each; yields the requests after every step until all are done. The same code serves
        `ernie45 serve`: prefill, sampling, penalties and stop rules exist once."""
        from .batcher import BatchEngine

        self._check_fits(encoded)
        lengths = [len(e["input_ids"]) for e in encoded]
        max_len = min(max(lengths) + max(p.max_tokens for p in params) + 1, self.max_model_len)
        engine = BatchEngine(self, max_batch=len(encoded), max_len=max_len, prefill_chunk=sum(lengths),
                             max_waiting=len(encoded), thread=False, raise_errors=True,
                             decoder=self.decoder, speculative=self.speculative)  # fmt: skip
        reqs = [engine.submit(e, p).request for e, p in zip(encoded, params, strict=True)]
        while not all(r.finished for r in reqs):
            engine.step()
            yield reqs


def _as_list(prompts) -> list:
    if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        return [prompts]
    return list(prompts)


def _with_calls(out: CompletionOutput, tools: list[dict]) -> CompletionOutput:
    """`out` with its tool-call blocks parsed out of the text."""
    text, calls = parse_tool_calls(out.text, tools)
    if not calls:
        return out
    return replace(out, text=text, tool_calls=calls, finish_reason=finish_with_calls(out.finish_reason))


def _merge(rows: list[Completion], prompt_ids: list[int]) -> Completion:
    """The `n` answers of one prompt as one result (the first answer's fields on top)."""
    first = rows[0]
    outputs = [CompletionOutput(i, r.text, r.token_ids, r.finish_reason, r.reasoning, r.logprobs)
               for i, r in enumerate(rows)]  # fmt: skip
    return Completion(first.text, first.token_ids, first.finish_reason, first.prompt_tokens,
                      sum(r.completion_tokens for r in rows), first.reasoning, outputs, list(prompt_ids),
                      logprobs=first.logprobs, prompt_logprobs=first.prompt_logprobs)  # fmt: skip
