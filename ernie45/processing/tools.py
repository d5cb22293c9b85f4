"""Tool calling in the ERNIE 4.5 format: the function list in the prompt, calls written by the model as

    <tool_call>
    {"name": "get_order_status", "arguments": {"order_id": "A17"}}
    </tool_call>

(the blocks the ERNIE-4.5 Thinking checkpoints write and vLLM's `ernie45` / FastDeploy's `ernie-x1` tool parsers
read), results sent back in a `tool` turn. A chat template that handles `tools`, `tool_calls` and `tool` turns
itself gets them as they are; for one that does not (the built-in ones), `prepare_messages` writes them into the
turns it knows: the function list into the system turn, calls into the assistant's text, results into a user
turn wrapped in `<tool_response>`. `tool_call_grammar` is the grammar constrained decoding uses for
`tool_choice` "required" or a named function, so the arguments always parse and match the schema.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
# Constrained JSON is written as Python's json.dumps writes it (", " and ": ", no other whitespace): the form
# the prompts and training data show, so a grammar never pushes a model off the spacing it learned.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)

TOOLS_PROMPT = (
    "You can call the functions below. To call one, answer with one block per call:\n"
    '<tool_call>\n{{"name": <function name>, "arguments": <JSON object of arguments>}}\n</tool_call>\n'
    "The results come back in <tool_response> blocks.\n<tools>\n{tools}\n</tools>"
)


def check_tools(tools: list[dict] | None) -> list[dict]:
    """OpenAI's tool list, checked: every entry a function with a name (and a JSON-schema object of parameters)."""
    out = []
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ValueError(f"tools[{i}]: only {{'type': 'function', 'function': {{...}}}} tools are supported")
        if not isinstance(fn.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", fn["name"]):
            raise ValueError(f"tools[{i}]: a function needs a name of letters, digits, '_', '.' or '-'")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}]: parameters must be a JSON schema object")
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    names = [t["function"]["name"] for t in out]
    if len(set(names)) != len(names):
        raise ValueError("tools: two functions have the same name")
    return out


def prepare_messages(messages: list[dict], tools: list[dict], template: str) -> tuple[list[dict], dict[str, Any]]:
    """(messages, extra template arguments): tool turns written into turns `template` knows where it does not
    handle them itself."""
    native = "tool_calls" in template or "tools" in template
    if native:
        return [_with_object_arguments(m) for m in messages], ({"tools": tools} if tools else {})
    out: list[dict] = []
    for m in messages:
        role = m.get("role")
        if role == "developer":
            m = {**m, "role": "system"}
        elif role == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{_text(m.get('content'))}\n</tool_response>"}
        elif role == "assistant" and m.get("tool_calls"):
            blocks = "\n".join(_block(c) for c in m["tool_calls"])
            text = _text(m.get("content"))
            m = {"role": "assistant", "content": f"{text}\n{blocks}" if text else blocks}
        out.append(m)
    if tools:
        listing = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools))
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{_text(out[0].get('content'))}\n\n{listing}"}
        else:
            out.insert(0, {"role": "system", "content": listing})
    return out, {}


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")


def _arguments(call: dict) -> Any:
    args = call.get("function", {}).get("arguments", {})
    if isinstance(args, str):
        try:
            return json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return args
    return args


def _block(call: dict) -> str:
    body = {"name": call.get("function", {}).get("name", ""), "arguments": _arguments(call)}
    return f"{CALL_START}\n{json.dumps(body, ensure_ascii=False)}\n{CALL_END}"


def _with_object_arguments(m: dict) -> dict:
    """Arguments as objects, as chat templates written for transformers expect them."""
    if m.get("role") != "assistant" or not m.get("tool_calls"):
        return m
    calls = [{**c, "function": {**c.get("function", {}), "arguments": _arguments(c)}} for c in m["tool_calls"]]
    return {**m, "tool_calls": calls}


def parse_tool_calls(text: str, tools: list[dict] | None = None) -> tuple[str, list[dict]]:
    """(the text without its call blocks, the calls as OpenAI `tool_calls`). A block that is not a JSON object
    with a name and object arguments (or names a function not in `tools`) stays in the text."""
    known = {t["function"]["name"] for t in tools or []}
    calls, kept, last = [], [], 0
    for match in _CALL.finditer(text):
        try:
            body = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        name, args = body.get("name") if isinstance(body, dict) else None, body.get("arguments", {})
        if not isinstance(name, str) or not isinstance(args, dict) or (known and name not in known):
            continue
        kept.append(text[last : match.start()].rstrip())  # whitespace before a call goes with it (as streamed)
        last = match.end()
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}})  # fmt: skip
    kept.append(text[last:])
    return "".join(kept).strip(), calls


def finish_with_calls(reason: str | None) -> str:
    """The finish reason of an answer that made tool calls, in every path that reports one: "tool_calls", except
    that an answer cut at max_tokens (its last call may be cut off in the text) still says "length"."""
    return "length" if reason == "length" else "tool_calls"


def tool_call_grammar(tools: list[dict], name: str | None = None, parallel: bool = True) -> str:
    """A Lark grammar (llguidance's dialect) for one or more call blocks of `tools` (only `name`'s, if given),
    each call's arguments following its function's parameter schema."""
    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise ValueError(f"tool_choice names {name!r}, which is not in tools")
    variants = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                  "arguments": _closed(t["function"]["parameters"])},
                 "required": ["name", "arguments"], "additionalProperties": False} for t in chosen]  # fmt: skip
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    options = JSON_STYLE
    repeat = 'call ("\\n" call)*' if parallel and name is None else "call"
    return (f"start: {repeat}\n"
            f"call: \"{CALL_START}\\n\" body \"\\n{CALL_END}\"\n"
            f"body: %json {json.dumps({**schema, 'x-guidance': options})}\n")  # fmt: skip


def _closed(schema: dict) -> dict:
    """The parameters schema with no properties beyond the declared ones (as OpenAI's strict mode has it), so a
    constrained call cannot wander into made-up arguments."""
    if schema.get("type") == "object" and "additionalProperties" not in schema:
        return {**schema, "additionalProperties": False}
    return schema


def choice_grammar(tools: list[dict], tool_choice: str | dict | None, parallel: bool = True) -> str | None:
    """The grammar `tool_choice` asks for: None for "none" / "auto" (free text, calls parsed from it), the call
    blocks for "required", one call of the named function for {"type": "function", "function": {"name": ...}}."""
    if tool_choice in (None, "none", "auto"):
        return None
    if not tools:
        raise ValueError("tool_choice needs tools")
    if tool_choice == "required":
        return tool_call_grammar(tools, None, parallel)
    if isinstance(tool_choice, dict) and isinstance(tool_choice.get("function"), dict):
        return tool_call_grammar(tools, tool_choice["function"].get("name"), parallel)
    raise ValueError("tool_choice is 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}")


class CallStream:
    """Streams an answer's text into (content, tool calls): text from `<tool_call>` on is held until its block
    closes, then comes out as a parsed call; whitespace around calls is dropped, as `parse_tool_calls` strips it."""

    def __init__(self, tools: list[dict]) -> None:
        self.tools, self.held, self.space, self.calls = tools, "", "", 0

    def feed(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        self.held += text
        content, calls = "", []
        while True:
            start = self.held.find(CALL_START)
            if start == -1:
                keep = 0 if final else partial_suffix(self.held, CALL_START)
                content += self._text(self.held[: len(self.held) - keep])
                self.held = self.held[len(self.held) - keep :]
                break
            content += self._text(self.held[:start])
            end = self.held.find(CALL_END, start)
            if end == -1:
                if final:  # an unclosed block is text
                    content += self._text(self.held[start:])
                    self.held = ""
                else:
                    self.held = self.held[start:]
                break
            block, self.held = self.held[start : end + len(CALL_END)], self.held[end + len(CALL_END) :]
            _, parsed = parse_tool_calls(block, self.tools)
            if parsed:
                self.space = ""  # whitespace before a call is dropped
                calls += parsed
                self.calls += len(parsed)
            else:
                content += self._text(block)
        if final and not self.calls:
            content += self.space
            self.space = ""
        return content, calls

    def _text(self, text: str) -> str:
        """`text` with its trailing whitespace held back: shown only when more text follows, dropped before a call
        or at the end of an answer that made calls."""
        stripped = text.rstrip()
        if not stripped:
            self.space += text
            return ""
        out, self.space = self.space + stripped, text[len(stripped) :]
        return out


def partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
