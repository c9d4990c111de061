"""The VLM judge: a rubric per task, one digit 0..5 as the first answer token, score = expected digit / 5.

As in Edit-R1 / UniWorld-V2 (docs/design.md, "Formulas"): the judge reads the input image(s),
the output and the instruction, and the score is the expectation of the digit under the model's
distribution over the digit tokens at the first answer position, so it is continuous and costs
one decoding step. Three backends share the prompt (`judge_messages`) and the score
(`expected_digit_score`):
    transformers  the model in-process (any Qwen2-VL / Qwen2.5-VL directory; tests use tiny_vlm)
    vllm          an in-process vLLM engine (GPU clusters; imported only when chosen)
    openai        an OpenAI-compatible server such as `vllm serve`, via top logprobs of the first token
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import urllib.error
import urllib.request
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from posterrl.batch import on_device
from posterrl.models.samples import EditSample
from reward_server.types import ScoreBatch, scorer_device, scorer_dtype

DIGITS = tuple(range(6))
RUBRICS = {
    "extending": "The output must contain the visible crop unchanged, in place, and extend it into a complete, "
                 "coherent poster. 0: the crop is lost or nothing was extended. 5: seamless, complete poster.",
    "filling": "The gray region must be painted so the poster is whole again, with everything else unchanged. "
               "0: the region is still gray or the rest is damaged. 5: an invisible, faithful repair.",
    "rescaling": "The poster must be re-laid out at the new aspect ratio, keeping every element legible and "
                 "uncropped. 0: stretched or cropped. 5: a clean layout with all elements at the new size.",
    "identity-driven": "The given object must appear unchanged in a new poster with the requested title. "
                       "0: the object is missing or altered. 5: the exact object in a complete poster.",
    "layout-driven": "The poster must follow the layout sketch: title, subtitle and objects in their boxes. "
                     "0: the layout is ignored. 5: every element where the sketch puts it.",
    "style-driven": "The poster must use the reference poster's look (palette, texture) with the given object "
                    "and title. 0: a different style. 5: the same style, the right content.",
}
QUESTION = "Rate the edit from 0 to 5. Answer with one digit."


def judge_messages(sample: EditSample) -> tuple[list[dict], list[Image.Image]]:
    """The chat for one sample (OpenAI-style content parts) and its images in order of appearance."""
    content = [{"type": "text", "text": "Input:"}]
    content += [{"type": "image"} for _ in sample.inputs]
    content += [{"type": "text", "text": "Output:"}, {"type": "image"},
                {"type": "text", "text": f"Task: {sample.task}. Instruction: {sample.instruction}\n"
                                         f"Rubric: {RUBRICS[sample.task]}\n{QUESTION}"}]
    return [{"role": "user", "content": content}], [*sample.inputs, sample.output]


def expected_digit_score(digit_logprobs: dict[int, float]) -> float:
    """E[digit] / 5 under the softmax of the given digits' log-probabilities (or logits).

    Digits that are absent (not in an API's top-k) get no mass; with no digit at all the score is NaN.
    """
    present = {d: lp for d, lp in digit_logprobs.items() if d in DIGITS and lp > -math.inf}
    if not present:
        return float("nan")
    digits = np.array(list(present), dtype=np.float64)  # (D,)
    logits = np.array(list(present.values()), dtype=np.float64)  # (D,)
    probs = np.exp(logits - logits.max())  # (D,) stable softmax
    probs /= probs.sum()
    return float((probs * digits).sum() / max(DIGITS))


def _distribution(digit_logprobs: dict[int, float]) -> dict[str, float]:
    present = {d: lp for d, lp in digit_logprobs.items() if lp > -math.inf}
    top = max(present.values())
    total = sum(math.exp(lp - top) for lp in present.values())
    return {str(d): round(math.exp(lp - top) / total, 4) for d, lp in sorted(present.items())}


def _details(digit_logprobs: dict[int, float]) -> dict:
    if not digit_logprobs:
        return {"reason": "no digit 0..5 among the first token's candidates"}
    distribution = _distribution(digit_logprobs)
    return {"digits": distribution, "argmax": int(max(distribution, key=distribution.__getitem__))}


def _png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _openai_content(messages: list[dict], images: list[Image.Image]) -> list[dict]:
    """The chat with each image part carrying its PNG as a data URL, as OpenAI-compatible servers expect."""
    remaining = iter(images)
    out = []
    for message in messages:
        parts = [{"type": "image_url", "image_url": {"url": _png_data_url(next(remaining))}}
                 if part["type"] == "image" else part for part in message["content"]]
        out.append({"role": message["role"], "content": parts})
    return out


class _TransformersBackend:
    def __init__(self, path: str):
        from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

        self.device = scorer_device()
        self.dtype = scorer_dtype(self.device)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.image_processor = AutoImageProcessor.from_pretrained(path)
        self.digit_ids = [self.tokenizer.convert_tokens_to_ids(str(d)) for d in DIGITS]
        if self.tokenizer.unk_token_id is not None and self.tokenizer.unk_token_id in self.digit_ids:
            raise ValueError(f"judge model {path}: its tokenizer has no single-token digits 0..5")

    @torch.no_grad()
    def digit_logprobs(self, chats: Sequence[tuple[list[dict], list[Image.Image]]]) -> list[dict[int, float]]:
        from posterrl.models.tiny_vlm import encode_chat

        batch = encode_chat(self.tokenizer, self.image_processor, [c for c, _ in chats], [i for _, i in chats])
        batch = on_device(batch, self.device, self.dtype)
        logits = self.model(**batch).logits[:, -1].float()  # (B, V) the first answer token (left padding)
        digits = torch.log_softmax(logits, dim=-1)[:, self.digit_ids]  # (B, 6)
        return [dict(zip(DIGITS, row.tolist(), strict=True)) for row in digits]


class _VllmBackend:
    """An in-process vLLM engine (GPU clusters). vLLM is an optional extra: `pip install posterrl[vllm]`."""

    def __init__(self, path: str):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise ImportError("the vlm_judge backend 'vllm' needs vLLM (pip install 'posterrl[vllm]' on a GPU "
                              "machine); on CPU use backend 'transformers' or 'openai'") from exc
        self.llm = LLM(model=path, limit_mm_per_prompt={"image": 4}, max_model_len=4096)
        self.params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=20)

    def digit_logprobs(self, chats: Sequence[tuple[list[dict], list[Image.Image]]]) -> list[dict[int, float]]:
        outputs = self.llm.chat([_openai_content(m, i) for m, i in chats], self.params, use_tqdm=False)
        results = []
        for output in outputs:
            first = output.outputs[0].logprobs[0]  # {token_id: Logprob(logprob, decoded_token)}
            results.append(_digits_from_tokens((lp.decoded_token, lp.logprob) for lp in first.values()))
        return results


def _digits_from_tokens(candidates) -> dict[int, float]:
    """{digit: logprob} from (token text, logprob) candidates; byte-level markers and spaces are stripped."""
    found: dict[int, float] = {}
    for text, logprob in candidates:
        token = (text or "").replace("Ġ", "").strip()
        if len(token) == 1 and token.isdigit() and int(token) in DIGITS:
            found[int(token)] = max(found.get(int(token), -math.inf), float(logprob))
    return found


class _OpenAIBackend:
    """HTTP to an OpenAI-compatible server: one chat completion per sample, max_tokens 1, top logprobs."""

    def __init__(self, url: str, model: str, timeout_s: float = 60.0, top_logprobs: int = 20,
                 api_key_env: str | None = None):
        self.endpoint = url.rstrip("/") + "/chat/completions"
        self.model, self.timeout_s, self.top_logprobs = model, timeout_s, top_logprobs
        self.headers = {"Content-Type": "application/json"}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(f"vlm_judge: api_key_env {api_key_env} is not set (or empty) in the reward server's "
                                 "environment; export it before the run starts its cluster")
            self.headers["Authorization"] = f"Bearer {key}"

    def digit_logprobs(self, chats: Sequence[tuple[list[dict], list[Image.Image]]]) -> list[dict[int, float]]:
        return [self._one(messages, images) for messages, images in chats]

    def _one(self, messages: list[dict], images: list[Image.Image]) -> dict[int, float]:
        body = {"model": self.model, "messages": _openai_content(messages, images), "max_tokens": 1,
                "temperature": 0.0, "logprobs": True, "top_logprobs": self.top_logprobs}
        request = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(),
                                         headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"judge server {self.endpoint}: HTTP {exc.code}: {exc.read()[:300]!r}") from exc
        except (urllib.error.URLError, TimeoutError) as exc:
            raise RuntimeError(f"judge server {self.endpoint} unreachable: {exc}") from exc
        first = answer["choices"][0]["logprobs"]["content"][0]
        return _digits_from_tokens((c["token"], c["logprob"]) for c in first["top_logprobs"])


class VlmJudge:
    kind = "vlm_judge"
    score_range = (0.0, 1.0)

    def __init__(self, backend: str, path: str, url: str | None = None, batch_size: int = 8, top_logprobs: int = 20,
                 api_key_env: str | None = None):
        """top_logprobs (openai): how many first-token candidates to ask for; OpenAI's API allows 20, a vLLM
        server up to its --max-logprobs. Digits outside them get no probability mass. api_key_env (openai): the
        environment variable whose value goes out as "Authorization: Bearer ..." (vllm serve --api-key)."""
        self.backend: _TransformersBackend | _VllmBackend | _OpenAIBackend
        if backend == "transformers":
            self.backend = _TransformersBackend(path)
        elif backend == "vllm":
            self.backend = _VllmBackend(path)
        elif backend == "openai":
            if not url:
                raise ValueError("vlm_judge backend 'openai' needs url, e.g. http://127.0.0.1:8000/v1")
            self.backend = _OpenAIBackend(url, path, top_logprobs=top_logprobs, api_key_env=api_key_env)
        else:
            raise ValueError(f"vlm_judge: unknown backend {backend!r} (expected transformers, vllm or openai)")
        self.batch_size = batch_size

    def score(self, samples: Sequence[EditSample]) -> ScoreBatch:
        logprobs: list[dict[int, float]] = []
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start : start + self.batch_size]
            logprobs += self.backend.digit_logprobs([judge_messages(s) for s in chunk])
        scores = np.array([expected_digit_score(lp) for lp in logprobs], dtype=np.float64)
        return ScoreBatch(scores, [_details(lp) for lp in logprobs])
