"""The OpenAI wire format the server speaks: request bodies (validated), error objects, and the
streaming split of reasoning from content."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..engine import SamplingParams


class APIError(Exception):
    """An error the client caused (or the server's load): rendered as OpenAI's error object."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields (user, logit_bias, ...) are accepted


class ImageURL(_Body):
    url: str


class InputAudio(_Body):
    data: str
    format: Literal["wav", "mp3", "flac", "ogg", "webm", "m4a"] = "wav"


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoPart(_Body):
    type: Literal["video_url"]
    video_url: ImageURL


class AudioPart(_Body):
    type: Literal["input_audio"]
    input_audio: InputAudio


Part = Annotated[TextPart | ImagePart | VideoPart | AudioPart, Field(discriminator="type")]


class Message(_Body):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[Part] | None = None


class _Sampling(_Body):
    model: str
    max_tokens: int | None = Field(None, ge=1)
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

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v
        if stops is not None and (len(stops) > 16 or any(not s for s in stops)):
            raise ValueError("stop takes at most 16 non-empty strings")
        return stops

    def sampling(self, defaults: SamplingParams, max_tokens: int | None, index: int = 0) -> SamplingParams:
        keys = ("temperature", "top_p", "top_k", "presence_penalty", "frequency_penalty", "repetition_penalty")
        values = {k: getattr(defaults, k) for k in keys}
        values.update({k: getattr(self, k) for k in keys if getattr(self, k) is not None})
        seed = None if self.seed is None else self.seed + index
        return SamplingParams(max_tokens=max_tokens or defaults.max_tokens, stop=self.stop or [], seed=seed, **values)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    chat_template_kwargs: dict[str, Any] | None = None

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def thinking(self) -> bool:
        return bool((self.chat_template_kwargs or {}).get("enable_thinking", False))

    def conversation(self) -> list[dict[str, Any]]:
        return [m.model_dump(exclude_none=True) for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] = Field(min_length=1)

    @property
    def limit(self) -> int | None:
        return self.max_tokens


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
        keep = 0 if final else _partial_suffix(self.held, self.END)
        out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return out, ""


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker` (it may complete on the next delta)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def split_answer(text: str, thinking: bool) -> tuple[str | None, str]:
    """(reasoning, content) of a whole answer, the same split the stream makes."""
    split = ReasoningSplit(thinking)
    reasoning, content = split.feed(text, final=True)
    if not thinking:
        return None, content
    return reasoning.strip(), content
