"""A customer-service agent on `ernie45 serve`, with the openai SDK: the customer sends a screenshot and a voice
message with an order number; the model picks one of three tools and fills in the number it heard, the script
runs the tool and sends the result back, and the model answers from it. Runs offline against a local server:

    ernie45 serve &                       # the embedded demo model (or: ernie45 serve DIR)
    python examples/agent.py              # --image FILE --audio FILE --tool-choice required|auto

The embedded demo model picks the tool itself (`tool_choice: "auto"`, the default here): it says what it heard,
then calls. `--tool-choice required` forces a call by constrained decoding (it parses and matches the schema
whatever the model), which skips that first line; this model then writes worse numbers and goes on calling.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path

from openai import OpenAI

HERE = Path(__file__).resolve().parent
ORDERS = {"4711": {"status": "shipped"}, "1234": {"status": "packed"}}


TOOLS = json.loads((HERE / "tools.json").read_text())  # the same three tools `ernie45 chat --tools` takes


def get_order_status(order_id: str) -> dict:
    """The 'back-office system' the agent calls."""
    return {"order_id": order_id, **ORDERS.get(order_id, {"status": "unknown"})}


def cancel_order(order_id: str) -> dict:
    return {"order_id": order_id, "cancelled": order_id in ORDERS}


def report_problem(order_id: str) -> dict:
    return {"ticket": f"T-{sum(map(ord, order_id)) % 90 + 10}"}


FUNCTIONS = {"get_order_status": get_order_status, "cancel_order": cancel_order, "report_problem": report_problem}


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def run(base_url: str, image: Path, audio: Path, model: str | None = None, log=print,
        tool_choice: str = "auto") -> list[dict]:  # fmt: skip
    """One customer turn, the tool round trip and the answer; returns the conversation."""
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    model = model or client.models.list().data[0].id
    messages: list[dict] = [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(image, "image/png")}},
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(audio.read_bytes()).decode(),
                                                    "format": "wav"}},
            {"type": "text", "text": "Can you help?"},
        ]},
    ]  # fmt: skip
    first = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice=tool_choice,
                                           max_tokens=160, temperature=0)  # fmt: skip
    reply = first.choices[0].message
    messages.append({"role": "assistant", "content": reply.content,
                     "tool_calls": [c.model_dump() for c in reply.tool_calls or []]})  # fmt: skip
    for call in reply.tool_calls or []:
        args = json.loads(call.function.arguments)
        result = FUNCTIONS[call.function.name](**args)
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
    p.add_argument("--image", type=Path, default=HERE / "order_page.png", help="the customer's screenshot")
    p.add_argument("--audio", type=Path, default=HERE / "voice_order.wav", help="the customer's voice message")
    p.add_argument("--tool-choice", default="auto", help='"auto" (default: the model decides) or "required"')
    args = p.parse_args()
    run(args.base_url, args.image, args.audio, args.model, tool_choice=args.tool_choice)


if __name__ == "__main__":
    main()
