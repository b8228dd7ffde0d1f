"""OpenAI logprobs, echo and token-id prompts on /v1/completions and /v1/chat/completions, checked
against the log-softmax of the model's own logits (random-weight model, local tokenizer)."""

import contextlib
import json

import httpx
import jax
import numpy as np
import pytest

from easympt import FlaxMptForCausalLM


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def model_logprobs(server, ids) -> np.ndarray:
    """log_softmax of the served model's logits for one token sequence: [T, V]."""
    model = FlaxMptForCausalLM(server.model.config, dtype="fp32", _do_init=False)
    logits = np.asarray(model(np.asarray([ids]), params=server.params).logits[0], np.float64)
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))


def test_greedy_logprobs_equal_the_models_log_softmax(server, client):
    ids = server.tokenizer("def add(a, b):", add_special_tokens=False)["input_ids"]
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 6, "temperature": 0, "logprobs": 5})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    gen = []
    for k, want_lp in enumerate(lp["token_logprobs"]):
        row = model_logprobs(server, ids + gen)[-1]
        token = int(np.argmax(row))  # greedy: the model's argmax
        assert want_lp == pytest.approx(row[token], abs=1e-4)
        assert lp["tokens"][k] == server.tokenizer.decode([token])
        top = lp["top_logprobs"][k]
        assert len(top) <= 5 and max(top.values()) == want_lp  # greedy: the chosen one is the likeliest
        best5 = np.sort(row)[::-1][:5]
        assert sorted(top.values(), reverse=True) == pytest.approx(best5[:len(top)], abs=1e-4)
        gen.append(token)
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])


def test_echo_with_max_tokens_zero_scores_the_prompt(server, client):
    ids = server.tokenizer("import json\nprint(json.dumps({}))", add_special_tokens=False)["input_ids"]
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == server.tokenizer.decode(ids)
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    ref = model_logprobs(server, ids)
    want = [ref[t - 1, ids[t]] for t in range(1, len(ids))]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    assert all(len(t) == 1 for t in lp["top_logprobs"][1:])
    assert r.json()["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


def test_lm_eval_payload_batch_of_token_lists(server, client):
    """What lm-evaluation-harness's local-completions sends for loglikelihood requests."""
    texts = ["The answer is 4", "def f(x): return x"]
    batch = [server.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    r = client.post("/v1/completions", json={"model": server.config.model_name, "prompt": batch, "temperature": 0,
                                             "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True})
    assert r.status_code == 200, r.text
    for ids, choice in zip(batch, sorted(r.json()["choices"], key=lambda c: c["index"])):
        lp = choice["logprobs"]["token_logprobs"]
        assert len(lp) == len(ids) + 1
        ref = model_logprobs(server, ids)
        assert lp[1:len(ids)] == pytest.approx([ref[t - 1, ids[t]] for t in range(1, len(ids))], abs=1e-4)
        assert lp[-1] == pytest.approx(ref[-1].max(), abs=1e-4)


def test_streamed_chunks_carry_their_tokens_logprobs(client):
    body = {"prompt": "for i in range(", "max_tokens": 8, "temperature": 0, "logprobs": 2}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    got = []
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                lp = json.loads(line[6:])["choices"][0]["logprobs"]
                if lp:
                    got += lp["token_logprobs"]
    assert got == pytest.approx(whole["token_logprobs"], abs=1e-5)


def test_chat_logprobs_in_openais_chat_shape(server, client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                                                  "temperature": 0, "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert 1 <= len(content) <= 5
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert len(entry["top_logprobs"]) == 2 and entry["logprob"] == entry["top_logprobs"][0]["logprob"]
        assert entry["bytes"] == list(entry["token"].encode("utf-8"))
    plain = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 5, "temperature": 0}).json()
    assert plain["choices"][0]["logprobs"] is None
    assert "".join(e["token"] for e in content) == plain["choices"][0]["message"]["content"]


def test_openai_client_reads_logprobs(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    out = client.completions.create(model=server.config.model_name, prompt=[[5, 6, 7, 8]], max_tokens=0, echo=True,
                                    logprobs=0)
    assert out.choices[0].logprobs.token_logprobs[0] is None and len(out.choices[0].logprobs.tokens) == 4


@pytest.mark.parametrize("body,needle", [
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "logprobs": -1}, "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens: 0"),
    ({"prompt": "x", "echo": True, "stream": True}, "echo"),
    ({"prompt": [1, 2, 10**6]}, "outside the vocabulary"),
    ({"prompt": [[1, 2], [-3]]}, "outside the vocabulary"),
    ({"prompt": [1, "a"]}, "prompt"),
])
def test_bad_logprob_requests_are_a_named_400(client, body, needle):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]
    assert client.get("/health").status_code == 200


def test_chat_top_logprobs_needs_logprobs(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})
    assert r.status_code == 400 and "top_logprobs" in r.json()["error"]["message"]


@contextlib.contextmanager
def extra_eos(server, token: int):
    """`token` ends replies while the block runs."""
    batch = server.device_batch
    saved = batch.eos_ids
    batch.eos_ids = saved + (token,)
    try:
        yield
    finally:
        batch.eos_ids = saved


def test_a_stop_token_is_scored_but_not_shown(server, client):
    """As OpenAI and vLLM: a reply that ends on EOS reports the EOS token's log-probability (lm-eval's
    echo + max_tokens 1 requests count on exactly one scored token past the prompt)."""
    ids = server.tokenizer("x = 1", add_special_tokens=False)["input_ids"]
    first = int(np.argmax(model_logprobs(server, ids)[-1]))
    r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1,
                                             "temperature": 0, "stop_token_ids": [first]} )
    assert r.status_code == 400  # stop_token_ids is not an OpenAI field: refused by name
    with extra_eos(server, first):  # make the greedy next token a stop token
        r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 1, "echo": True, "logprobs": 1,
                                                 "temperature": 0})
    choice = r.json()["choices"][0]
    assert choice["text"] == server.tokenizer.decode(ids) and choice["finish_reason"] == "stop"
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1
    assert lp["token_logprobs"][-1] == pytest.approx(model_logprobs(server, ids)[-1, first], abs=1e-4)


def test_a_stop_token_met_while_decoding_is_scored_too(server, client):
    for text in ("def f(x):", "import os", "class A:", "x = [1, 2", "while True:", "return self."):
        ids = server.tokenizer(text, add_special_tokens=False)["input_ids"]
        greedy = []
        for _ in range(3):
            greedy.append(int(np.argmax(model_logprobs(server, ids + greedy)[-1])))
        if greedy[2] not in greedy[:2]:
            break
    else:
        pytest.skip("every prompt's third greedy token repeats an earlier one")
    with extra_eos(server, greedy[2]):
        r = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 8, "logprobs": 0, "temperature": 0})
    lp = r.json()["choices"][0]["logprobs"]
    assert r.json()["usage"]["completion_tokens"] == 2 and len(lp["token_logprobs"]) == 3
    assert lp["tokens"][-1] == server.tokenizer.decode([greedy[2]])
