"""The VLM judge: the expected-digit score by hand, a tiny Qwen2-VL and a tiny Qwen2.5-VL end to end, and the
OpenAI-compatible HTTP path against a local server that answers with known logprobs."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

from posterrl.data.tasks import TASKS, build_samples
from posterrl.models.samples import EditSample
from posterrl.models.tiny_vlm import FAMILIES, build_tiny_vlm
from reward_server.judge import VlmJudge, expected_digit_score, judge_messages


def edits(n_posters=1):
    return [EditSample(s.id, s.task, s.instruction, s.inputs, s.target, s.meta)
            for i in range(n_posters) for s in build_samples(i, 0, 64, TASKS)]


def test_expected_digit_score_by_hand():
    assert expected_digit_score({d: 0.0 for d in range(6)}) == pytest.approx(2.5 / 5)  # uniform: mean digit 2.5
    assert expected_digit_score({3: 0.0, 1: -math.inf}) == pytest.approx(3 / 5)  # all mass on 3
    # p(4) = 0.75, p(5) = 0.25: E = 3 + 1.25 = 4.25 -> 0.85; absent digits get no mass
    assert expected_digit_score({4: math.log(0.75), 5: math.log(0.25)}) == pytest.approx(0.85)
    # logits are softmaxed first: logits (0, ln 3) on digits (0, 5) give p = (1/4, 3/4): E = 3.75 -> 0.75
    assert expected_digit_score({0: 0.0, 5: math.log(3)}) == pytest.approx(0.75)
    assert math.isnan(expected_digit_score({}))


def test_prompt_has_every_image_and_the_rubric():
    sample = edits()[TASKS.index("style-driven")]
    messages, images = judge_messages(sample)
    parts = messages[0]["content"]
    assert sum(p["type"] == "image" for p in parts) == len(images) == len(sample.inputs) + 1
    assert images[-1] is sample.output
    assert "reference poster's look" in parts[-1]["text"] and sample.instruction in parts[-1]["text"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny_vlm(request, tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / f"tiny_{request.param}", request.param)


def test_transformers_judge_end_to_end(tiny_vlm):
    judge = VlmJudge("transformers", str(tiny_vlm), batch_size=4)
    samples = edits()
    batch = judge.score(samples)
    assert batch.scores.shape == (6,) and np.isfinite(batch.scores).all()
    assert ((batch.scores >= 0) & (batch.scores <= 1)).all()
    for details in batch.details:  # one distribution over the six digits per sample
        assert set(details["digits"]) == {str(d) for d in range(6)}
        assert sum(details["digits"].values()) == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_array_equal(judge.score(samples).scores, batch.scores)  # deterministic
    one_by_one = np.concatenate([judge.score([s]).scores for s in samples])
    np.testing.assert_allclose(one_by_one, batch.scores, atol=1e-5)  # left padding does not change a score


class _CannedJudge(BaseHTTPRequestHandler):
    requests: list[dict] = []
    authorization: list[str | None] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _CannedJudge.requests.append(body)
        _CannedJudge.authorization.append(self.headers.get("Authorization"))
        top = [{"token": "4", "logprob": math.log(0.5)}, {"token": "Ġ5", "logprob": math.log(0.25)},
               {"token": "x", "logprob": math.log(0.2)}, {"token": "2", "logprob": math.log(0.05)}]
        answer = {"choices": [{"logprobs": {"content": [{"token": "4", "logprob": top[0]["logprob"],
                                                          "top_logprobs": top}]}}]}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_backend_reads_top_logprobs():
    server = HTTPServer(("127.0.0.1", 0), _CannedJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        judge = VlmJudge("openai", "served-judge", url=f"http://127.0.0.1:{server.server_port}/v1")
        samples = edits()[:2]
        batch = judge.score(samples)
    finally:
        server.shutdown()
    # digits 4, 5, 2 with p 0.5, 0.25, 0.05 (the non-digit "x" is ignored): renormalised over 0.8,
    # E = (4 * 0.5 + 5 * 0.25 + 2 * 0.05) / 0.8 = 3.35 / 0.8 = 4.1875 -> 0.8375
    assert batch.scores.tolist() == pytest.approx([0.8375, 0.8375])
    assert batch.details[0]["argmax"] == 4
    body = _CannedJudge.requests[0]
    assert body["model"] == "served-judge" and body["max_tokens"] == 1 and body["logprobs"] is True
    images = [p for p in body["messages"][0]["content"] if p["type"] == "image_url"]
    assert len(images) == len(samples[0].inputs) + 1
    assert images[0]["image_url"]["url"].startswith("data:image/png;base64,")


def test_openai_backend_sends_the_api_key_from_the_named_variable(monkeypatch):
    monkeypatch.setenv("POSTERRL_TEST_JUDGE_KEY", "sk-local-123")
    server = HTTPServer(("127.0.0.1", 0), _CannedJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _CannedJudge.authorization.clear()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        VlmJudge("openai", "m", url=url, api_key_env="POSTERRL_TEST_JUDGE_KEY").score(edits()[:1])
        VlmJudge("openai", "m", url=url).score(edits()[:1])
    finally:
        server.shutdown()
    assert _CannedJudge.authorization == ["Bearer sk-local-123", None]
    monkeypatch.delenv("POSTERRL_TEST_JUDGE_KEY")
    with pytest.raises(ValueError, match="POSTERRL_TEST_JUDGE_KEY is not set"):
        VlmJudge("openai", "m", url=url, api_key_env="POSTERRL_TEST_JUDGE_KEY")


def test_unreachable_server_names_the_url():
    judge = VlmJudge("openai", "m", url="http://127.0.0.1:9/v1")
    with pytest.raises(RuntimeError, match="http://127.0.0.1:9/v1/chat/completions unreachable"):
        judge.score(edits()[:1])
