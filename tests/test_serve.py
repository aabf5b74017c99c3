"""`gptstack serve` through the official `openai` client: chat and completions, streamed or not, usage, n, stop
strings split across tokens, OpenAI's errors, the API key; continuous batching (concurrent greedy answers are the
sequential ones, in fewer decode steps) and a client that goes mid-answer freeing its slot."""
import http.client
import json
import threading
import time
import urllib.request

import pytest

from conftest import serving, slowed
from gptstack.checkpoint import find_tokenizer, load_model
from gptstack.generate import generate
from gptstack.serve.app import create_app
from gptstack.tokenizer import Tokenizer

openai = pytest.importorskip("openai")

KEY = "sk-test"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 1 plus 2?"}]


@pytest.fixture(scope="module")
def served(random_model_dir):
    model, tok = load_model(random_model_dir), Tokenizer.load(find_tokenizer(random_model_dir))
    with serving(create_app(model, tok, "tiny", api_key=KEY, max_batch=8)) as url:
        yield url, model, tok


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0)


def health(url) -> dict:
    with urllib.request.urlopen(url + "/health") as r:
        return json.load(r)


def greedy(model, tok, messages, n):
    ids = tok.render_chat(messages, for_generation=True)[0]
    (g,) = generate(model, [ids], n, temperature=0, stop_ids=(tok.end, tok.eot), pad_id=tok.pad)
    return ids, g


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    h = health(served[0])
    assert h["status"] == "ok" and h["slots"] == 8 and h["running"] == 0


def test_chat_is_the_engines_answer_with_the_tokenizers_usage(served, client):
    _, model, tok = served
    ids, g = greedy(model, tok, MESSAGES, 10)
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
    body = g.tokens[:-1] if g.finished else g.tokens
    assert r.choices[0].message.content == tok.decode(body, skip_special=True)
    assert r.choices[0].finish_reason == ("stop" if g.finished else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(g.tokens))
    assert r.usage.total_tokens == len(ids) + len(g.tokens)


def test_streaming_with_usage_gives_the_same_answer(client):
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices_are_the_seeded_rows_of_generate(served, client):
    _, model, tok = served
    ids = tok.render_chat(MESSAGES, for_generation=True)[0]
    gens = generate(model, [ids] * 3, 8, temperature=1.0, seed=5, stop_ids=(tok.end, tok.eot), pad_id=tok.pad)
    expected = [tok.decode(g.tokens[:-1] if g.finished else g.tokens, skip_special=True) for g in gens]
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=1.0, seed=5, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == expected and len(set(expected)) > 1
    streamed = ["", "", ""]
    for c in client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=1.0, seed=5,
                                            n=3, stream=True):
        for choice in c.choices:
            streamed[choice.index] += choice.delta.content or ""
    assert streamed == expected


def test_a_stop_string_split_across_tokens_never_reaches_the_stream(served, client):
    _, model, tok = served
    prompt = "the cat"

    def split_stop(seed):  # the end of one sampled token and the start of the next, first seen there
        (g,) = generate(model, [tok.encode(prompt)], 30, temperature=1.0, seed=seed, stop_ids=(tok.eot,))
        text, pieces = tok.decode(g.tokens, skip_special=True), [tok.decode([t]) for t in g.tokens]
        for j in range(len(pieces) - 1):
            stop = pieces[j][-1:] + pieces[j + 1][:1]
            at = len(tok.decode(g.tokens[:j + 1], skip_special=True)) - 1
            if len(stop) == 2 and stop.isalnum() and text.find(stop) == at:
                return stop, text[:at]
    seed, (stop, expected) = next((seed, found) for seed in range(100) if (found := split_stop(seed)))
    ask = dict(model="tiny", prompt=prompt, max_tokens=30, temperature=1.0, seed=seed)
    chunks = [c.choices[0].text for c in client.completions.create(**ask, stop=[stop, "\x00never"], stream=True)]
    assert "".join(chunks) == expected and not any(stop in c for c in chunks)
    r = client.completions.create(**ask, stop=stop)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"


def test_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    for t in content:  # greedy: each token is the likeliest
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob)


def test_bad_requests_are_openai_errors_without_retry(served):
    sent = []
    http = openai.DefaultHttpxClient(event_hooks={"request": [sent.append]})
    client = openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, http_client=http)  # retries left at the default
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=5)
    assert len(sent) == 1 and e.value.status_code == 400 and e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=60)
    assert e.value.body["code"] == "context_length_exceeded"
    prompt_tokens = len(served[2].render_chat(MESSAGES, for_generation=True)[0])
    assert "64 tokens" in e.value.message and f"{prompt_tokens} in the messages, 60 in the completion" in e.value.message
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument supplied: bogus"):
        client.chat.completions.create(model="tiny", messages=MESSAGES, extra_body={"bogus": 1})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "robot", "content": "hi"}])
    assert len(sent) == 5


def test_a_wrong_key_is_refused(served):
    client = openai.OpenAI(base_url=served[0] + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def post(url, path, body: bytes, headers=None):
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("POST", path, body, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def test_malformed_and_oversized_bodies_get_the_error_shape(served):
    url = served[0]
    for body, status in ((b"{not json", 400), (json.dumps({"model": "tiny"}).encode(), 400),
                         (json.dumps({"model": "tiny", "prompt": "x" * (1 << 20)}).encode(), 413),
                         (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}] * 300}).encode(), 400)):
        got, reply = post(url, "/v1/chat/completions", body)
        assert got == status and set(reply["error"]) == {"message", "type", "param", "code"}, reply
        assert "Traceback" not in json.dumps(reply)
    assert post(url, "/v1/nothing", b"{}")[0] == 404


def test_concurrent_greedy_answers_are_the_sequential_ones_in_fewer_steps(served, client):
    url = served[0]
    questions = [[{"role": "user", "content": q}] for q in ("What is 1 plus 2?", "the cat", "def f(x):", "Q: A: 3 sat")]

    def ask(messages):
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0).choices[0].message.content

    before = health(url)["decode_steps"]
    sequential = [ask(m) for m in questions]
    steps_sequential = health(url)["decode_steps"] - before
    concurrent = [None] * 4
    threads = [threading.Thread(target=lambda i=i: concurrent.__setitem__(i, ask(questions[i]))) for i in range(4)]
    before = health(url)["decode_steps"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    steps_concurrent = health(url)["decode_steps"] - before
    assert concurrent == sequential
    assert steps_concurrent < steps_sequential, (steps_concurrent, steps_sequential)


def test_a_client_that_goes_frees_its_slot(random_model_dir):
    model, tok = load_model(random_model_dir), Tokenizer.load(find_tokenizer(random_model_dir))
    with serving(create_app(slowed(model, 0.05), tok, "tiny", max_batch=4)) as url:
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "def f", "max_tokens": 50,
                                                            "stream": True, "temperature": 0}),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.readline().startswith(b"data: ")  # the answer has started
        assert health(url)["running"] == 1
        r.close()  # the client goes mid-answer
        conn.close()
        deadline = time.time() + 10
        while health(url)["running"] and time.time() < deadline:
            time.sleep(0.05)
        h = health(url)
        assert h["running"] == 0 and h["waiting"] == 0 and h["cache_bytes"] == 0
        assert h["decode_steps"] < 40  # it did not run to its 50 tokens


def test_the_serve_verb_serves_the_api_and_the_page_from_the_package(random_model_dir):
    import os
    import socket
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gptstack", "serve", "--model", str(random_model_dir), "--port", str(port),
                             "--max-batch", "2"], env={**os.environ, "GPTSTACK_API_KEY": KEY}, stdout=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert "on http://127.0.0.1:" in proc.stdout.readline()  # loopback by default
        deadline = time.time() + 60
        while True:
            try:
                assert health(url)["slots"] == 2
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline
                time.sleep(0.1)
        page = urllib.request.urlopen(url + "/").read().decode()
        assert "gptstack chat" in page and "http" not in page.replace("http-equiv", "")  # nothing from a CDN
        assert b"getReader" in urllib.request.urlopen(url + "/static/app.js").read()
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        model = str(random_model_dir)
        r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=3, temperature=0)
        assert r.usage.completion_tokens <= 3 and r.model == model
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_completion_logprobs_streamed_are_the_whole_ones(client):
    ask = dict(model="tiny", prompt="def f", max_tokens=6, temperature=0, logprobs=2)
    whole = client.completions.create(**ask).choices[0].logprobs
    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for c in client.completions.create(**ask, stream=True):
        for key in streamed:
            streamed[key] += getattr(c.choices[0].logprobs, key) if c.choices[0].logprobs else []
    assert streamed == {key: getattr(whole, key) for key in streamed}
    assert whole.text_offset == [sum(map(len, whole.tokens[:j])) for j in range(len(whole.tokens))]
    assert all(len(top) == 2 for top in whole.top_logprobs)


def test_a_client_that_goes_before_a_plain_answer_frees_its_slot(random_model_dir):
    model, tok = load_model(random_model_dir), Tokenizer.load(find_tokenizer(random_model_dir))
    with serving(create_app(slowed(model, 0.05), tok, "tiny", max_batch=4)) as url:
        host, port = url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "def f", "max_tokens": 60}),
                     {"Content-Type": "application/json"})
        deadline = time.time() + 10
        while not health(url)["running"] and time.time() < deadline:
            time.sleep(0.02)
        conn.close()  # gone before the answer
        while health(url)["running"] and time.time() < deadline:
            time.sleep(0.05)
        h = health(url)
        assert h["running"] == 0 and h["decode_steps"] < 50
