"""A small OpenAI-compatible chat-completions client (stdlib only) and a resumable cache of judged items.

- `JudgeClient.chat(messages)` POSTs to `{base_url}/chat/completions`; the key is read from an environment
  variable only (never a command-line flag, never written anywhere). HTTP 429/5xx, timeouts, connection
  errors and replies without `choices[0].message.content` are retried with exponential backoff (a
  `Retry-After` header is honoured); other HTTP errors (401, 404 unknown model, ...) fail at once.
- A simple rate limit: at most `requests_per_minute` requests, spaced evenly.
- `judge(...)` asks, parses, and asks again when the reply cannot be parsed; after `parse_attempts` it
  returns the last reply with `parsed=None`, so callers count it as unparsed and report it (MMHal-Bench
  scores it 0 as its original evaluator does; Object HalBench leaves it out of CHAIR), and give no score
  when too many are (`check_unparsed`).
- `JudgeCache` appends one JSON line per judged item; a re-run skips items already in it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}


class JudgeError(RuntimeError):
    """The judge API failed in a way retries do not fix (bad key, unknown model, retries exhausted)."""


@dataclass
class JudgeClient:
    model: str
    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float = 0.0
    max_tokens: int | None = None
    timeout_s: float = 60.0
    max_retries: int = 5
    backoff_s: float = 2.0  # first wait; doubles per retry
    max_backoff_s: float = 60.0
    requests_per_minute: float | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._next_request_at = 0.0

    def _api_key(self) -> str:
        key = os.environ.get(self.api_key_env)
        if not key:
            raise JudgeError(
                f"no API key: set the environment variable {self.api_key_env} "
                "(keys are never taken from the command line)"
            )
        return key

    def _wait_for_rate_limit(self) -> None:
        if not self.requests_per_minute:
            return
        with self._lock:
            now = time.monotonic()
            wait = self._next_request_at - now
            self._next_request_at = max(now, self._next_request_at) + 60.0 / self.requests_per_minute
        if wait > 0:
            time.sleep(wait)

    def _post(self, payload: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            self.base_url.rstrip("/") + "/chat/completions",
            data=json.dumps(payload).encode("utf-8"),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self._api_key()}"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return json.loads(response.read().decode("utf-8"))

    def chat(self, messages: list[dict[str, str]], temperature: float | None = None) -> str:
        """The assistant's reply text; retries transient failures, raises JudgeError otherwise."""
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature if temperature is None else temperature,
        }
        if self.max_tokens is not None:
            payload["max_tokens"] = self.max_tokens
        last_error = ""
        server_wait: float | None = None  # a Retry-After the server asked for
        for attempt in range(self.max_retries + 1):
            if attempt:
                backoff = min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
                time.sleep(backoff if server_wait is None else server_wait)
                server_wait = None
            self._wait_for_rate_limit()
            try:
                body = self._post(payload)
            except urllib.error.HTTPError as e:
                detail = e.read().decode("utf-8", "replace")[:300]
                if e.code not in RETRYABLE_STATUS:
                    hint = " (is the model name right? set --judge-model)" if e.code == 404 else ""
                    raise JudgeError(f"judge API {self.base_url} answered HTTP {e.code}{hint}: {detail}") from e
                retry_after = e.headers.get("Retry-After") if e.headers else None
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    server_wait = min(float(retry_after), self.max_backoff_s)
                last_error = f"HTTP {e.code}: {detail}"
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as e:
                last_error = f"{type(e).__name__}: {e}"
                continue
            content = _reply_content(body)
            if content is None:
                last_error = f"malformed reply without choices[0].message.content: {str(body)[:300]}"
                continue
            return content
        raise JudgeError(f"judge API {self.base_url} failed {self.max_retries + 1} times; last error: {last_error}")


def _reply_content(body: Any) -> str | None:
    try:
        content = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


@dataclass
class Judgement:
    reply: str  # the last reply received
    parsed: Any  # parse(reply), or None when no reply could be parsed
    attempts: int


def judge(
    client: JudgeClient, messages: list[dict[str, str]], parse: Callable[[str], T | None], parse_attempts: int = 3
) -> Judgement:
    """Ask until `parse(reply)` is not None, at most `parse_attempts` times."""
    reply = ""
    for attempt in range(1, parse_attempts + 1):
        reply = client.chat(messages)
        parsed = parse(reply)
        if parsed is not None:
            return Judgement(reply, parsed, attempt)
    return Judgement(reply, None, parse_attempts)


def cache_key(model: str, messages: list[dict[str, str]]) -> str:
    """Changes whenever the judge model, prompt or answer change, so a stale verdict is never reused."""
    return hashlib.sha256(json.dumps([model, messages], sort_keys=True).encode("utf-8")).hexdigest()


class JudgeCache:
    """Append-only JSONL of judged items: {"key", "item", "reply", "parsed"}. Only parsed items are
    written, so a re-run asks again for the ones that stayed unparsed."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    # A line cut by an interrupted run: ignore it; the item is judged again.
                    continue

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, item: Any, judgement: Judgement) -> None:
        entry = {"key": key, "item": item, "reply": judgement.reply, "parsed": judgement.parsed}
        self.entries[key] = entry
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")


def cached_judge(
    client: JudgeClient,
    cache: JudgeCache,
    item: Any,
    messages: list[dict[str, str]],
    parse: Callable[[str], T | None],
    parse_attempts: int = 3,
) -> Judgement:
    """`judge` through the cache: a cached verdict is returned without calling the API."""
    key = cache_key(client.model, messages)
    entry = cache.get(key)
    if entry is not None:
        return Judgement(entry["reply"], entry["parsed"], 0)
    judgement = judge(client, messages, parse, parse_attempts)
    if judgement.parsed is not None:
        cache.put(key, item, judgement)
    return judgement
