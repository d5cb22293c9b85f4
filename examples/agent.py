"""A customer-service agent on `ernie45 serve`, with the openai SDK: the customer sends a screenshot and a voice
message, the model calls a tool (`get_order_status`), the script runs it and sends the result back, and the model
answers. Runs offline against a local server:

    ernie45 serve &                       # the embedded demo model (or: ernie45 serve DIR)
    python examples/agent.py              # --base-url http://HOST:PORT/v1, --image FILE, --audio FILE

The demo model's own skill at choosing tools is small, so the call is constrained (`tool_choice: "required"`):
whatever the model, the call parses and its arguments match the function's schema.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

from openai import OpenAI

HERE = Path(__file__).resolve().parent
ORDERS = {"A17": {"status": "shipped", "eta": "tomorrow"}, "B42": {"status": "packing", "eta": "in 3 days"}}
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_order_status",
        "description": "Look up where a customer's order is.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string", "pattern": "^[A-Z][0-9]{2}$"}},
                       "required": ["order_id"]},
    },
}]  # fmt: skip


def get_order_status(order_id: str) -> dict:
    """The 'back-office system' the agent calls."""
    return ORDERS.get(order_id, {"status": "unknown order", "order_id": order_id})


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def run(base_url: str, image: Path, audio: Path, model: str | None = None, log=print) -> list[dict]:
    """One customer turn, the tool round trip and the answer; returns the conversation."""
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    model = model or client.models.list().data[0].id
    messages: list[dict] = [
        {"role": "system", "content": "You are a shop's support agent. Use the tools to look orders up."},
        {"role": "user", "content": [
            {"type": "text", "text": "Here is my order screen and a voice note. Where is my order A17?"},
            {"type": "image_url", "image_url": {"url": data_url(image, "image/png")}},
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio.read_bytes()).decode(),
                                                    "format": "wav"}},
        ]},
    ]  # fmt: skip
    first = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="required",
                                           max_tokens=160, temperature=0)  # fmt: skip
    reply = first.choices[0].message
    messages.append({"role": "assistant", "content": reply.content,
                     "tool_calls": [c.model_dump() for c in reply.tool_calls or []]})  # fmt: skip
    for call in reply.tool_calls or []:
        args = json.loads(call.function.arguments)
        result = get_order_status(**args)
        log(f"tool call: {call.function.name}({args}) -> {result}")
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    answer = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="none",
                                            max_tokens=64, temperature=0)  # fmt: skip
    messages.append({"role": "assistant", "content": answer.choices[0].message.content})
    log(f"agent: {answer.choices[0].message.content}")
    return messages


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="the served model's id (default: the first /v1/models lists)")
    p.add_argument("--image", type=Path, default=HERE / "shapes.png")
    p.add_argument("--audio", type=Path, default=HERE / "digits.wav")
    args = p.parse_args()
    run(args.base_url, args.image, args.audio, args.model)


if __name__ == "__main__":
    main()
