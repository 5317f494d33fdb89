"""The rollout HTTP API against a real server and the real tiny model: valid requests, every listed
bad input (documented 4xx, server still healthy after), the bounded queue, readiness."""
from __future__ import annotations

import os
import threading
import time

import httpx
import pytest

from mmupt.config import load_settings
from mmupt.services.rollout.api import RolloutServer, build_app
from mmupt.services.rollout.hf_backend import TransformersBackend
from rollout_support import TOKEN, data_url, png_bytes, serving, user_message

MAX_N, MAX_TOKENS, MAX_PROMPT, MAX_BODY = 4, 16, 160, 1_000_000


@pytest.fixture(scope="module")
def api_settings(tiny_model_dir, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    return load_settings(environ={}, overrides={
        "model": {"path": str(tiny_model_dir), "device": "cpu"},
        "rollout": {"max_new_tokens": 8, "max_request_n": MAX_N, "max_request_new_tokens": MAX_TOKENS,
                    "max_prompt_tokens": MAX_PROMPT, "max_request_bytes": MAX_BODY, "max_queue": 1,
                    "max_batch_prompts": 1, "retry_after_s": 1, "allowed_local_dirs": [str(allowed)]},
        "streams": {"max_image_bytes": 200_000, "max_image_pixels": 1_000_000},
        "voter": {"grader": "exact"},
        "auth": {"token": TOKEN},
    })


@pytest.fixture(scope="module")
def backend(api_settings):
    return TransformersBackend(api_settings.model)


@pytest.fixture(scope="module")
def api(api_settings, backend):
    server = RolloutServer(api_settings, TOKEN)
    server.attach(backend)
    with serving(build_app(server)) as url:
        yield type("Api", (), {"url": url, "server": server,
                               "allowed": api_settings.rollout.allowed_local_dirs[0]})
    server.close()


def chat(api, messages, **fields):
    return httpx.post(f"{api.url}/v1/chat/completions", json={"messages": messages, **fields}, timeout=60)


def assert_refused(reply: httpx.Response, status: int, words: str) -> None:
    assert reply.status_code == status, reply.text
    message = reply.json()["error"]["message"]
    assert words in message, message


def assert_healthy(api) -> None:
    assert httpx.get(f"{api.url}/healthz").status_code == 200
    reply = chat(api, user_message("What shape is it?", data_url(png_bytes())), n=2, max_tokens=2)
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["choices"]) == 2


def test_chat_completion_with_an_image_returns_n_choices_and_the_vote(api):
    reply = chat(api, user_message("What shape is it?", data_url(png_bytes())), n=3, max_tokens=6, seed=1,
                 logprobs=True)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "chat.completion" and len(body["choices"]) == 3
    for i, choice in enumerate(body["choices"]):
        assert choice["index"] == i and choice["message"]["role"] == "assistant"
        assert choice["finish_reason"] in ("stop", "length")
        assert all(t["logprob"] <= 0 for t in choice["logprobs"]["content"])
    tokens = sum(len(c["logprobs"]["content"]) for c in body["choices"])
    assert body["usage"]["completion_tokens"] == tokens
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + tokens
    assert body["policy_version"] == 0 and len(body["answers"]) == 3
    assert 0.0 <= body["vote_share"] <= 1.0


def test_temperature_zero_is_greedy_over_http(api):
    replies = [chat(api, user_message("What shape is it?", data_url(png_bytes())), n=2, max_tokens=6, seed=seed,
                    temperature=0) for seed in (1, 2)]
    assert all(r.status_code == 200 for r in replies), replies[0].text
    texts = [[c["message"]["content"] for c in r.json()["choices"]] for r in replies]
    assert texts[0] == texts[1] and texts[0][0] == texts[0][1]


def test_rollout_samples_a_voted_group_with_token_logprobs(api):
    reply = httpx.post(f"{api.url}/v1/rollout", json={
        "problem": "<image> Which shape is shown?", "images": [data_url(png_bytes())], "n": 3, "max_tokens": 5,
        "hidden_answer": "circle"}, timeout=60)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert len(body["responses"]) == 3 and body["sampling"]["n"] == 3
    for r in body["responses"]:
        assert len(r["token_ids"]) == len(r["logprobs"]) <= 5
    assert len(body["vote"]["rewards"]) == 3 and body["vote"]["label_correct"] is not None


def test_local_image_paths_inside_the_allowed_directory_are_read(api):
    path = os.path.join(api.allowed, "inside.png")
    with open(path, "wb") as f:
        f.write(png_bytes())
    for url in (path, f"file://{path}"):
        assert chat(api, user_message("Shape?", url), max_tokens=3).status_code == 200


@pytest.mark.parametrize("case", ["not_an_image", "too_many_bytes", "too_many_pixels", "bad_base64",
                                  "remote_url"])
def test_bad_images_are_refused_clearly(api, case):
    status, url, words = {
        "not_an_image": (400, data_url(b"this is not an image"), "not a readable image"),
        "too_many_bytes": (413, data_url(os.urandom(300_000)), "over the limit"),
        # A 1-bit PNG of 3000x3000 zeros is a few KB on the wire and 9M pixels decoded.
        "too_many_pixels": (413, data_url(png_bytes((3000, 3000), 0, mode="1")), "pixels"),
        "bad_base64": (400, "data:image/png;base64,@@@not-base64@@@", "base64"),
        "remote_url": (400, "https://example.com/cat.png", "remote image URLs are not fetched"),
    }[case]
    assert_refused(chat(api, user_message("Shape?", url)), status, words)
    assert_healthy(api)


def test_paths_outside_the_allowed_directories_are_refused(api, tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())
    link = os.path.join(api.allowed, "escape.png")
    if not os.path.lexists(link):
        os.symlink(secret, link)
    for path in (str(secret), os.path.join(api.allowed, "..", secret.parent.name, "secret.png"), link):
        assert_refused(chat(api, user_message("Shape?", path)), 403, "outside the allowed directories")
    assert_refused(chat(api, user_message("Shape?", "relative/path.png")), 400, "absolute")
    assert_healthy(api)


def test_sampling_limits_and_unsupported_fields_are_refused(api):
    image = data_url(png_bytes())
    assert_refused(chat(api, user_message("Shape?", image), n=MAX_N + 1), 400, "max_request_n")
    assert_refused(chat(api, user_message("Shape?", image), max_tokens=MAX_TOKENS + 1), 400,
                   "max_request_new_tokens")
    assert_refused(chat(api, user_message("word " * 400, image)), 400, "tokens")  # prompt too long
    assert_refused(chat(api, user_message("w" * 200_000, image)), 400, "characters")  # refused untokenized
    assert_refused(chat(api, user_message("Shape?", image), stream=True), 400, "stream")
    assert_refused(chat(api, user_message("Shape?", image), temperature=-0.5), 400, "temperature")
    assert_refused(chat(api, user_message("Shape?", image), frobnicate=1), 400, "frobnicate")
    assert_refused(chat(api, []), 400, "messages")
    assert_refused(chat(api, [{"role": "tool", "content": "x"}]), 400, "role")
    assert_healthy(api)


def test_request_bodies_over_the_limit_are_refused_before_reading(api):
    reply = httpx.post(f"{api.url}/v1/chat/completions", content=b"x" * (MAX_BODY + 1),
                       headers={"content-type": "application/json"})
    assert_refused(reply, 413, "over the limit")
    chunked = httpx.post(f"{api.url}/v1/chat/completions", content=iter([b'{"messages": []}']),
                         headers={"content-type": "application/json"})   # no Content-Length: chunked
    assert_refused(chunked, 411, "Content-Length")
    assert_healthy(api)


def test_full_queue_answers_429_and_a_stale_request_503_with_retry_after(api, backend):
    """max_queue=1: with the model busy, one request waits and the next is refused at once."""
    replies = {}

    def send(name):
        replies[name] = chat(api, user_message("Shape?", data_url(png_bytes())), max_tokens=3)

    api.server.queue.timeout_s = 0.3
    backend._lock.acquire()  # the model is busy: generation blocks on the real backend lock
    try:
        first = threading.Thread(target=send, args=("first",))
        first.start()
        wait_for(lambda: api.server.queue.running() == 1)  # taken by the worker, blocked on the lock
        second = threading.Thread(target=send, args=("second",))
        second.start()
        wait_for(lambda: api.server.queue.depth() == 1)    # waiting in the queue
        third = chat(api, user_message("Shape?", data_url(png_bytes())), max_tokens=3)
        assert third.status_code == 429 and third.headers["retry-after"] == "1"
        time.sleep(0.4)  # the waiting request outlives queue_timeout_s
    finally:
        backend._lock.release()
        first.join(60)
        second.join(60)
        api.server.queue.timeout_s = api.server.settings.rollout.queue_timeout_s
    assert replies["first"].status_code == 200
    assert replies["second"].status_code == 503 and replies["second"].headers["retry-after"] == "1"
    metrics = httpx.get(f"{api.url}/metrics", follow_redirects=True).text
    assert 'mmupt_rollout_rejected_total{reason="queue_full"}' in metrics
    assert_healthy(api)


def test_many_concurrent_clients_beyond_the_queue_get_429_or_503_and_the_server_recovers(api):
    """48 clients at once against a queue of 1: every answer is 200, 429 or 503 (never a broken
    connection or another 5xx), refusals carry Retry-After, and afterwards the server serves normally."""
    clients, replies, errors = 48, [], []
    barrier = threading.Barrier(clients)
    body = {"messages": user_message("Shape?", data_url(png_bytes())), "max_tokens": 3}

    def client():
        barrier.wait()
        try:
            replies.append(httpx.post(f"{api.url}/v1/chat/completions", json=body, timeout=120))
        except httpx.HTTPError as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert errors == [] and len(replies) == clients
    statuses = [r.status_code for r in replies]
    assert set(statuses) <= {200, 429, 503}, statuses
    assert statuses.count(200) >= 1 and statuses.count(429) >= clients // 2, statuses
    assert all(r.headers.get("retry-after") == "1" for r in replies if r.status_code != 200)
    assert api.server.queue.depth() == 0
    assert_healthy(api)


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_not_ready_until_weights_are_loaded(api_settings, backend):
    server = RolloutServer(api_settings, TOKEN)
    with serving(build_app(server)) as url:
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.get(f"{url}/readyz").status_code == 503
        reply = httpx.post(f"{url}/v1/chat/completions", json={"messages": user_message("Shape?")})
        assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
        assert httpx.get(f"{url}/v1/version").json()["ready"] is False
        server.attach(backend)
        try:
            assert httpx.get(f"{url}/readyz").status_code == 200
            assert httpx.get(f"{url}/v1/version").json()["version"] == 0
            assert "mmupt_rollout_queue_depth" in httpx.get(f"{url}/metrics", follow_redirects=True).text
        finally:
            server.close()


def test_the_openai_client_gets_a_valid_completion_with_an_image_and_n_choices(api):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.create(
        model="tiny", n=3, max_tokens=6, temperature=0.7, seed=3, logprobs=True,
        messages=[{"role": "user", "content": [
            {"type": "text", "text": "Which shape is shown?"},
            {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]}])
    assert completion.object == "chat.completion" and completion.model == "tiny"
    assert [c.index for c in completion.choices] == [0, 1, 2]
    for choice in completion.choices:
        assert isinstance(choice.message.content, str) and choice.message.role == "assistant"
        assert choice.finish_reason in ("stop", "length")
        assert len(choice.logprobs.content) >= 1
    assert completion.usage.completion_tokens == sum(len(c.logprobs.content) for c in completion.choices)
    extra = completion.model_extra
    assert set(extra) >= {"majority_answer", "vote_share", "policy_version"}
    with pytest.raises(openai.BadRequestError, match="max_request_n"):
        client.chat.completions.create(model="tiny", n=MAX_N + 1, messages=user_message("Shape?"))


def test_the_http_sampler_waits_out_busy_answers_and_reports_refusals(api_settings, backend):
    from mmupt.sampler import ChatRequest, HTTPSampler, SamplerError

    request = ChatRequest(messages=user_message("Shape?", data_url(png_bytes())), n=2, max_tokens=3)
    server = RolloutServer(api_settings, TOKEN)
    with serving(build_app(server)) as url:
        impatient = HTTPSampler(url, busy_wait_s=0)
        with pytest.raises(SamplerError, match="503: the model is still loading"):
            impatient.complete([request])
        loader = threading.Timer(1.0, server.attach, args=(backend,))   # weights arrive a second later
        loader.start()
        patient = HTTPSampler(url, busy_wait_s=30)
        try:
            (choices,) = patient.complete([request])
            assert len(choices) == 2 and all(c.finish_reason in ("stop", "length") for c in choices)
            with pytest.raises(SamplerError, match="max_request_n"):
                patient.complete([ChatRequest(messages=request.messages, n=MAX_N + 1)])
        finally:
            loader.join()
            server.close()
            impatient.close()
            patient.close()
