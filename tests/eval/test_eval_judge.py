"""The judge client against a local fake API: retries, errors, malformed replies, rate limit, cache."""

import time

import pytest

from ddpo.eval.judge import JudgeCache, JudgeClient, JudgeError, cached_judge, judge

MESSAGES = [{"role": "user", "content": "rate this"}]


def client_for(server, **kw) -> JudgeClient:
    defaults = dict(
        model="judge-test", base_url=server.base_url, api_key_env="DDPO_TEST_JUDGE_KEY", backoff_s=0.01, timeout_s=5
    )
    return JudgeClient(**{**defaults, **kw})


def test_request_shape_and_reply(chat_server):
    chat_server.script = [chat_server.ok("hello")]
    assert client_for(chat_server, temperature=0.2, max_tokens=512).chat(MESSAGES) == "hello"
    (req,) = chat_server.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == "Bearer sk-test"
    assert req["json"] == {"model": "judge-test", "messages": MESSAGES, "temperature": 0.2, "max_tokens": 512}


def test_retries_429_and_500_then_succeeds(chat_server):
    chat_server.script = [(429, {"error": "slow down"}), (500, "oops"), (503, {"error": "busy"}), chat_server.ok("ok")]
    assert client_for(chat_server).chat(MESSAGES) == "ok"
    assert len(chat_server.requests) == 4


def test_retry_after_header_overrides_backoff(chat_server):
    chat_server.script = [(429, {"error": "rate"}, {"Retry-After": "0"}), chat_server.ok("ok")]
    start = time.monotonic()
    assert client_for(chat_server, backoff_s=30).chat(MESSAGES) == "ok"
    assert time.monotonic() - start < 5


def test_malformed_replies_are_retried(chat_server):
    chat_server.script = [
        (200, "not json at all"),
        (200, {"choices": []}),
        (200, {"choices": [{"message": {}}]}),
        chat_server.ok("fine"),
    ]
    assert client_for(chat_server).chat(MESSAGES) == "fine"
    assert len(chat_server.requests) == 4


def test_client_errors_fail_at_once(chat_server):
    chat_server.script = [(404, {"error": {"message": "model not found"}})]
    with pytest.raises(JudgeError, match=r"HTTP 404.*--judge-model.*model not found"):
        client_for(chat_server).chat(MESSAGES)
    assert len(chat_server.requests) == 1


def test_retries_exhausted_names_last_error(chat_server):
    chat_server.default = (500, {"error": "down"})
    with pytest.raises(JudgeError, match=r"failed 3 times; last error: HTTP 500"):
        client_for(chat_server, max_retries=2).chat(MESSAGES)
    assert len(chat_server.requests) == 3


def test_missing_key_names_the_variable(chat_server, monkeypatch):
    monkeypatch.delenv("DDPO_TEST_JUDGE_KEY")
    with pytest.raises(JudgeError, match="DDPO_TEST_JUDGE_KEY"):
        client_for(chat_server).chat(MESSAGES)
    assert chat_server.requests == []


def test_rate_limit_spaces_requests(chat_server):
    chat_server.default = chat_server.ok("ok")
    client = client_for(chat_server, requests_per_minute=600)  # one request per 0.1 s
    start = time.monotonic()
    for _ in range(4):
        client.chat(MESSAGES)
    assert time.monotonic() - start >= 0.3


def test_unparseable_reply_is_asked_again_then_reported_unparsed(chat_server):
    parse = lambda s: int(s) if s.isdigit() else None  # noqa: E731
    chat_server.script = [chat_server.ok("maybe"), chat_server.ok("7")]
    assert judge(client_for(chat_server), MESSAGES, parse, parse_attempts=3).parsed == 7
    chat_server.requests.clear()
    chat_server.default = chat_server.ok("no idea")
    verdict = judge(client_for(chat_server), MESSAGES, parse, parse_attempts=3)
    assert verdict.parsed is None and verdict.reply == "no idea" and len(chat_server.requests) == 3


def test_cache_resumes_and_retries_only_unparsed(chat_server, tmp_path):
    parse = lambda s: int(s) if s.isdigit() else None  # noqa: E731
    path = tmp_path / "cache.jsonl"
    chat_server.script = [chat_server.ok("1"), chat_server.ok("??")]
    client = client_for(chat_server)
    first = [
        cached_judge(client, JudgeCache(path), i, [{"role": "user", "content": f"q{i}"}], parse, parse_attempts=1)
        for i in range(2)
    ]
    assert [j.parsed for j in first] == [1, None]
    with path.open("a") as f:
        f.write('{"key": "cut-off li')  # an interrupted write must not break the next run
    chat_server.requests.clear()
    chat_server.script = [chat_server.ok("2")]
    cache = JudgeCache(path)
    second = [
        cached_judge(client, cache, i, [{"role": "user", "content": f"q{i}"}], parse, parse_attempts=1)
        for i in range(2)
    ]
    assert [j.parsed for j in second] == [1, 2]
    assert [r["json"]["messages"][0]["content"] for r in chat_server.requests] == ["q1"]  # q0 came from the cache
    # another judge model is another cache key: asked again
    chat_server.requests.clear()
    chat_server.script = [chat_server.ok("5")]
    other = cached_judge(
        client_for(chat_server, model="other"), JudgeCache(path), 0, [{"role": "user", "content": "q0"}], parse
    )
    assert other.parsed == 5 and len(chat_server.requests) == 1
