"""A real uvicorn server on localhost, in a thread, over a tiny checkpoint with a real tokenizer."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
import wave
from contextlib import contextmanager

import numpy as np
from PIL import Image

from ernie45.engine import LLM
from ernie45.serve import MediaPolicy, create_app
from ernie45.serve.http import server as http_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(llm: LLM, **kw):
    """Yields (base URL, app); the server and its engine stop afterwards."""
    header_timeout = kw.pop("header_timeout", 10.0)
    app = create_app(llm, name="tiny", **kw)
    port = free_port()
    server = http_server(app, host="127.0.0.1", port=port, log_level="error", header_timeout=header_timeout)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def png_data_url(colour=(200, 30, 30), size=(40, 28)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wav_base64(seconds: float = 0.6, hz: float = 440.0) -> str:
    t = np.arange(int(16000 * seconds)) / 16000
    pcm = (0.3 * np.sin(2 * np.pi * hz * t) * 32767).astype(np.int16)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(pcm.tobytes())
    return base64.b64encode(buf.getvalue()).decode()


__all__ = ["MediaPolicy", "free_port", "png_data_url", "running_server", "wav_base64"]
