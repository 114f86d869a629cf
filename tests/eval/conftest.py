"""A local stand-in for an OpenAI-compatible chat API, on 127.0.0.1 with an OS-chosen port."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

# A scripted reply: (status, body dict or raw str[, headers]) or a function of the request JSON.
Reply = tuple | Callable[[dict[str, Any]], tuple]


def chat_body(content: str, model: str = "judge-test") -> dict[str, Any]:
    return {
        "id": "x",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


class FakeChatServer:
    """Answers POST /v1/chat/completions from a script; records every request (headers + JSON)."""

    def __init__(self) -> None:
        self.script: list[Reply] = []
        self.default: Reply | None = None
        self.requests: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "json": body})
                reply = server.script.pop(0) if server.script else server.default
                if reply is None:
                    reply = (500, {"error": "script exhausted"})
                if callable(reply):
                    reply = reply(body)
                status, payload, *rest = reply
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (rest[0] if rest else {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    @staticmethod
    def ok(content: str) -> tuple:
        """A 200 reply whose assistant message is `content`."""
        return (200, chat_body(content))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def chat_server(monkeypatch):
    monkeypatch.setenv("DDPO_TEST_JUDGE_KEY", "sk-test")
    server = FakeChatServer()
    yield server
    server.close()
