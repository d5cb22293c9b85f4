"""The OpenAI wire format the server speaks: request bodies (validated), error objects, and the
streaming split of reasoning from content."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from ..engine import SamplingParams
from ..engine.structured import StructuredOutputs
from ..processing.tools import check_tools, choice_grammar, partial_suffix


class APIError(Exception):
    """An error the client caused (or the server's load): rendered as OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are kept for the validators, which refuse them by name


class _Strict(BaseModel):
    """A message part: a field this server does not read is refused (pydantic names it), never dropped."""

    model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] = "auto"  # low: fit in 512 x 512 first (fewer tokens), as OpenAI's low


class InputAudio(_Strict):
    data: str
    format: Literal["wav", "mp3", "flac", "ogg", "webm", "m4a"] = "wav"


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(_Strict):
    url: str
    use_audio: bool = False  # the video's sound track goes in too, interleaved with its frames (a model that hears)


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: VideoURL


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class FileData(_Strict):
    file_data: str | None = None  # a data: URL (or bare base64) of the file's bytes
    filename: str | None = None
    file_id: str | None = None


class FilePart(_Strict):
    type: Literal["file"]
    file: FileData


Part = Annotated[TextPart | ImagePart | VideoPart | AudioPart | FilePart, Field(discriminator="type")]


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[Part] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _every_field_read(self):
        """A message field the prompt would not show is refused by name. Fields a client echoes back empty from an
        answer it received (`refusal: null`, `annotations: []`) ask nothing and pass."""
        unknown = sorted(k for k, v in (self.model_extra or {}).items() if v not in (None, [], {}))
        if unknown:
            raise ValueError(f"this server does not read the message field(s) {', '.join(unknown)}; remove them")
        if self.name is not None and self.role != "tool":  # a tool result's name repeats its call's, by id
            raise ValueError(f"a {self.role} message's name is not shown to the model (the chat template has no "
                             "place for it); remove it, or write who speaks into the content")  # fmt: skip
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls belong to an assistant message, not a {self.role} one")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError(f"tool_call_id belongs to a tool message, not a {self.role} one")
        return self


NO_EFFECT = {"user"}  # OpenAI fields that ask nothing of the model (an end-user id for abuse tracking)


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    min_p: float | None = Field(None, ge=0, le=1)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None  # OpenAI: text, json_object, json_schema
    structured_outputs: dict[str, Any] | None = None  # vLLM: json, regex, choice, grammar, json_object
    _structured: StructuredOutputs | None = PrivateAttr(None)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # what torch's generator takes (+ n - 1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _nothing_ignored(self):
        """A field this server does not implement is refused by name, never accepted and ignored."""
        unknown = sorted(set(self.model_extra or {}) - NO_EFFECT)
        if unknown:
            raise ValueError(f"this server does not implement {', '.join(unknown)}; remove "
                             f"{'it' if len(unknown) == 1 else 'them'} from the request")  # fmt: skip
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit() or not -100 <= bias <= 100:
                raise ValueError(f"logit_bias maps token ids to values in [-100, 100]; got {key!r}: {bias}")
        self._structured = self._structure()
        return self

    def _structure(self) -> StructuredOutputs | None:
        """response_format or structured_outputs as the engine's constraint (None: free text)."""
        if self.response_format is not None and self.structured_outputs is not None:
            raise ValueError("give response_format or structured_outputs, not both")
        if self.structured_outputs is not None:
            unknown = set(self.structured_outputs) - {"json", "regex", "choice", "grammar", "json_object"}
            if unknown:
                raise ValueError(f"structured_outputs takes json, regex, choice, grammar or json_object; not "
                                 f"{sorted(unknown)}")  # fmt: skip
            return StructuredOutputs(**self.structured_outputs)
        fmt = self.response_format
        if fmt is None or fmt.get("type") == "text":
            return None
        if fmt.get("type") == "json_object":
            return StructuredOutputs(json_object=True)
        if fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ValueError("response_format json_schema needs {'name': ..., 'schema': {...}}")
            return StructuredOutputs(json=spec.get("schema") or {"type": "object"})
        raise ValueError(f"response_format type {fmt.get('type')!r} is not text, json_object or json_schema")

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 16 or any(not s for s in stops)):
            raise ValueError("stop takes at most 16 non-empty strings")
        return stops

    def sampling(self, defaults: SamplingParams, max_tokens: int | None, index: int = 0) -> SamplingParams:
        keys = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                "repetition_penalty")  # fmt: skip
        values = {k: getattr(defaults, k) for k in keys}
        values.update({k: getattr(self, k) for k in keys if getattr(self, k) is not None})
        seed = None if self.seed is None else self.seed + index
        bias = {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None
        return SamplingParams(max_tokens=defaults.max_tokens if max_tokens is None else max_tokens,
                              stop=self.stop or [], seed=seed, stop_token_ids=list(self.stop_token_ids or []),
                              ignore_eos=self.ignore_eos, min_tokens=self.min_tokens, logit_bias=bias,
                              logprobs=self.token_logprobs, prompt_logprobs=self.prompt_logprobs,
                              structured_outputs=self._structured, **values)  # fmt: skip

    @property
    def token_logprobs(self) -> int | None:
        return None

    @property
    def prompt_logprobs(self) -> int | None:
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    _tools: list[dict] = PrivateAttr(default_factory=list)

    def _structure(self) -> StructuredOutputs | None:
        """response_format / structured_outputs, or the call blocks tool_choice "required" or a named function asks
        for (constrained decoding: the calls always parse and match their schemas)."""
        self._tools = check_tools(self.tools)
        grammar = choice_grammar(self._tools, self.tool_choice, self.parallel_tool_calls)
        other = super()._structure()
        if grammar is not None and other is not None:
            raise ValueError("tool_choice 'required' or a named function cannot be combined with response_format")
        return StructuredOutputs(grammar=grammar) if grammar is not None else other

    @property
    def parses_calls(self) -> bool:
        """Whether the answer's `<tool_call>` blocks come back as `tool_calls`."""
        return bool(self._tools) and self.tool_choice != "none"

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def token_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def thinking(self) -> bool:
        return bool((self.chat_template_kwargs or {}).get("enable_thinking", False))

    def conversation(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True, exclude=set(m.model_extra or ())) for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)  # 0: score the prompt only (with echo and logprobs)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    @model_validator(mode="after")
    def _zero_tokens_need_echo(self):
        if self.max_tokens == 0 and not (self.echo and self.logprobs is not None):
            raise ValueError("max_tokens 0 scores the prompt: it needs echo: true and logprobs")
        if isinstance(self.prompt, list) and any(isinstance(p, list) and not p for p in self.prompt):
            raise ValueError("prompt: a token list is empty")
        return self

    @property
    def limit(self) -> int | None:
        return self.max_tokens

    @property
    def token_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo and self.logprobs is not None else None

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: one string or token list, or several."""
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            return list(self.prompt)
        return [self.prompt]


class TokenizeRequest(_Body):
    """vLLM's /tokenize: a prompt, or chat messages rendered by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give prompt or messages (one of them)")
        unknown = sorted(set(self.model_extra or {}))
        if unknown:
            raise ValueError(f"this server does not implement {', '.join(unknown)}")
        return self


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class ReasoningSplit:
    """Streams text into (reasoning, content): everything before `</think>` is reasoning when thinking is on."""

    END = "</think>"

    def __init__(self, thinking: bool) -> None:
        self.thinking, self.held = thinking, ""

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        if not self.thinking:
            return "", text
        self.held += text
        at = self.held.find(self.END)
        if at != -1:
            reasoning, rest = self.held[:at], self.held[at + len(self.END) :].lstrip("\n")
            self.thinking, self.held = False, ""
            return reasoning, rest
        keep = 0 if final else partial_suffix(self.held, self.END)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out, ""


def split_answer(text: str, thinking: bool) -> tuple[str | None, str]:
    """(reasoning, content) of a whole answer, the same split the stream makes."""
    split = ReasoningSplit(thinking)
    reasoning, content = split.feed(text, final=True)
    if not thinking:
        return None, content
    return reasoning.strip(), content
