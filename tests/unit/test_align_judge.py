"""Rule checks, verdict parsing, and the OpenAI-compatible client against a stub on 127.0.0.1."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from omni.align.generate import GenerationError, OpenAIGenerator
from omni.align.judge import (
    ChainJudge,
    Criterion,
    JudgeTask,
    ModelJudge,
    RuleJudge,
    UndecidedError,
    check_rule,
    count_words,
    make_judge,
    parse_rule,
    parse_verdicts,
    settle,
)


class StubChat:
    """A local /v1/chat/completions: `reply(messages) -> str | (status, body)`; records requests."""

    def __init__(self, reply):
        self.requests, stub = [], self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                out = reply(body["messages"])
                status, text = (200, out) if isinstance(out, str) else out
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}
                                  if status == 200 else {"error": text}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    servers = []

    def make(reply):
        servers.append(StubChat(reply))
        return servers[-1]
    yield make
    for s in servers:
        s.close()


def test_rules_read_from_criterion_text_and_checked():
    cases = [
        ('The reply starts with "ok"', "OK, five", True), ('The reply starts with "ok"', "five ok", False),
        ('The reply ends with "done"', "five done.", True), ("Answer in JSON format", '```json\n{"a": 1}\n```', True),
        ("Answer in JSON format", "{a: 1}", False), ("Use at most 3 words", "one two three", True),
        ("Use at most 3 words", "one two three four", False), ("Write at least 2 paragraphs", "a\n\nb", True),
        ('Include the keyword "apple"', "An Apple a day", True), ('Do not use the word "banana"', "a banana", False),
        ("the reply is wrapped in brackets", "[ five ]", True), ("Reply in English", "hello there", True),
        ("请用中文回答", "你好，世界", True), ("回答字数不超过5", "一二三四五六", False),
        ("不要出现“遮羞布”这个词", "没有那个词", True), ("Answer as a bulleted list", "- a\n- b", True),
    ]
    for text, reply, expected in cases:
        rule = parse_rule(text)
        assert rule is not None, text
        assert check_rule(rule, reply) is expected, (text, reply)
    # a criterion that asks for more than a rule can check is left to a model judge
    assert parse_rule("the response mentions the price and is in JSON format") is None
    assert parse_rule("The answer is polite") is None
    assert count_words("hello 世界 ok") == 4


def test_rule_judge_uses_explicit_rules_and_leaves_the_rest_undecided():
    task = JudgeTask("q", "[ five ]", [Criterion("1", "is wrapped in brackets"), Criterion("2", "is polite"),
                                       Criterion("3", "anything", rule={"kind": "max_words", "n": 0})])
    assert RuleJudge().judge([task]) == [[True, None, False]]
    assert settle([True, None], "fail", "x") == [True, False]
    assert settle([True, None], "skip", "x") == [True, None]
    with pytest.raises(UndecidedError, match="criteria \\[2\\]"):
        settle([True, None], "error", "x")


def test_verdict_parsing_lines_and_json():
    assert parse_verdicts("1: yes\n2: no\n3 - YES", 3) == [True, False, True]
    assert parse_verdicts('```json\n{"1": "no", "2": "是"}\n```', 3) == [False, True, None]
    assert parse_verdicts("I think it is fine", 2) == [None, None]


def test_model_judge_over_an_openai_compatible_endpoint(stub, monkeypatch):
    def reply(messages):
        prompt = messages[-1]["content"]
        assert "[Checklist]" in prompt and "[Assistant reply to grade]" in prompt
        n = prompt.split("[Checklist]")[1].count("\n")
        return "\n".join(f"{i}: {'yes' if 'polite' in prompt else 'no'}" for i in range(1, n + 1))
    server = stub(reply)
    monkeypatch.setenv("OMNI_TEST_KEY", "sekret")
    gen = OpenAIGenerator(server.url, model="judge-x", api_key_env="OMNI_TEST_KEY")
    judge = ChainJudge([RuleJudge(), ModelJudge(gen)])
    task = JudgeTask("q", "[ five ]", [Criterion("1", "is wrapped in brackets"), Criterion("2", "is polite"),
                                        Criterion("3", "is kind")], system="be kind")
    assert judge.judge([task]) == [[True, True, True]]
    # only the criteria the rules left open reached the model, numbered afresh
    sent = server.requests[0]
    assert sent["model"] == "judge-x" and sent["auth"] == "Bearer sekret" and sent["path"] == "/v1/chat/completions"
    assert "1. is polite" in sent["messages"][0]["content"] and "brackets" not in sent["messages"][0]["content"]
    assert make_judge(f"rules,{server.url}").name == "rules+model"


def test_client_retries_server_errors_and_fails_fast_on_client_errors(stub):
    calls = []

    def flaky(messages):
        calls.append(1)
        return (503, "busy") if len(calls) < 3 else "fine"
    server = stub(flaky)
    assert OpenAIGenerator(server.url, backoff=0.01).chat([[{"role": "user", "content": "hi"}]]) == ["fine"]
    assert len(calls) == 3
    bad = stub(lambda m: (400, "bad request"))
    with pytest.raises(GenerationError, match="HTTP 400"):
        OpenAIGenerator(bad.url, backoff=0.01).chat([[{"role": "user", "content": "hi"}]])
    assert len(bad.requests) == 1
    with pytest.raises(ValueError, match="http"):
        OpenAIGenerator("127.0.0.1:8000")
