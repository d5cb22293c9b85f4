"""Chat templates (docs/architecture.md §5) and the reasoning split.

A checkpoint's own ``chat_template`` wins; otherwise the built-in templates below. They are written in
Jinja and rendered by the tokenizer's own ``apply_chat_template``, so rendering equals transformers'
for the same files. Messages use the OpenAI shape: ``content`` is a string or a list of parts
(``text``, ``image`` / ``image_url``, ``video`` / ``video_url``, ``audio`` / ``input_audio``).
"""

from __future__ import annotations

# ERNIE 4.5 text models: "User: ...\n", "Assistant: ...<|end_of_sentence|>", system prompt first.
TEXT_TEMPLATE = (
    "{{- '<|begin_of_sentence|>' -}}"
    "{%- for m in messages -%}"
    "{%- if m.content is string -%}{%- set text = m.content -%}"
    "{%- else -%}{%- set text = m.content | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}"
    "{%- endif -%}"
    "{%- if m.role == 'system' -%}{{- text + '\\n' -}}"
    "{%- elif m.role == 'user' -%}{{- 'User: ' + text + '\\n' -}}"
    "{%- elif m.role == 'assistant' -%}{{- 'Assistant: ' + text + '<|end_of_sentence|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}"
)

# ERNIE 4.5 VL / omni: media items numbered per kind across the conversation, optional thinking.
VL_TEMPLATE = (
    "{%- set n = namespace(image=0, video=0, audio=0) -%}"
    "{{- '<|begin_of_sentence|>' -}}"
    "{%- for m in messages -%}"
    "{%- if m.role in ['system', 'user'] -%}"
    "{%- if m.role == 'user' -%}{{- 'User: ' -}}{%- endif -%}"
    "{%- if m.content is string -%}{{- m.content -}}{%- else -%}{%- for part in m.content -%}"
    "{%- if part.type == 'text' -%}{{- part.text -}}"
    "{%- elif part.type in ['image', 'image_url'] -%}{%- set n.image = n.image + 1 -%}"
    "{{- 'Picture ' ~ n.image ~ ':<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>' -}}"
    "{%- elif part.type in ['video', 'video_url'] -%}{%- set n.video = n.video + 1 -%}"
    "{{- 'Video ' ~ n.video ~ ':<|VIDEO_START|><|VIDEO_PLACEHOLDER|><|VIDEO_END|>' -}}"
    "{%- elif part.type in ['audio', 'input_audio', 'audio_url'] -%}{%- set n.audio = n.audio + 1 -%}"
    "{{- 'Audio ' ~ n.audio ~ ':<|AUDIO_START|><|AUDIO_PLACEHOLDER|><|AUDIO_END|>' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- if m.role == 'system' -%}{{- '\\n' -}}{%- endif -%}"
    "{%- elif m.role == 'assistant' -%}"
    "{%- if m.content is string -%}{%- set text = m.content -%}"
    "{%- else -%}{%- set text = m.content | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}"
    "{%- endif -%}"
    "{{- '\\nAssistant: ' + text + '<|end_of_sentence|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\\nAssistant: ' -}}"
    "{%- if enable_thinking is defined and enable_thinking -%}{{- '<think>' -}}"
    "{%- else -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

MEDIA_PARTS = {
    "image": ("image", "image_url"),
    "video": ("video", "video_url"),
    "audio": ("audio", "input_audio", "audio_url"),
}


def media_items(messages: list[dict]) -> dict[str, list]:
    """The media sources of a conversation, per kind, in the order the template numbers them."""
    found: dict[str, list] = {k: [] for k in MEDIA_PARTS}
    found["video_audio"] = []  # per video: interleave its sound track ({"type": "video", "use_audio": true})
    for m in messages:
        if isinstance(m.get("content"), list):
            for part in m["content"]:
                for kind, names in MEDIA_PARTS.items():
                    if part.get("type") in names:
                        found[kind].append(_source(part))
                        if kind == "video":
                            found["video_audio"].append(bool(part.get("use_audio", False)))
    return found


def _source(part: dict):
    value = part.get(part["type"])
    if isinstance(value, dict):  # OpenAI style: {"url": ...} or {"data": ..., "format": ...}
        if "url" in value:
            return value["url"]
        if "data" in value:
            fmt = value.get("format", "wav")
            return f"data:audio/{fmt};base64,{value['data']}"
    if value is None:
        raise ValueError(f"a {part['type']} part has no {part['type']!r} field: {part}")
    return value


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning between <think> and </think>, the answer after it); no think block -> (None, text)."""
    start = text.find("<think>")
    end = text.find("</think>")
    if end == -1:
        if start != -1:  # still thinking (cut off by max_tokens)
            return text[start + len("<think>") :].strip(), ""
        return None, text
    head = text[:end]
    reasoning = head[start + len("<think>") :] if start != -1 else head
    return reasoning.strip(), text[end + len("</think>") :].lstrip("\n")
