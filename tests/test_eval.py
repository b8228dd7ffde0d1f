"""easympt eval (perplexity, bits per byte, sliding windows, local and through a server) and
lm-evaluation-harness run unmodified against `easympt serve` on the demo model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import free_port, wait_for_health

from easympt.demo import demo_checkpoint
from easympt.evaluation import EvalDataError, evaluate_texts, local_scorer, read_texts, server_scorer, sliding_windows

TEXTS = ["import os\n\ndef join(a, b):\n    return os.path.join(a, b)\n",
         "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n"
         "        self.items.append(x)\n" * 3]


@pytest.mark.parametrize("n,max_length,stride", [(10, 16, 8), (40, 16, 8), (41, 16, 5), (17, 16, 15), (3, 4, 1)])
def test_sliding_windows_score_every_token_once_with_context(n, max_length, stride):
    ids = list(range(n))
    scored = []
    for i, (window, k) in enumerate(sliding_windows(ids, max_length, stride)):
        assert len(window) <= max_length and k >= 1
        context = len(window) - k  # tokens before the first scored one
        assert context == (1 if i == 0 else max_length - stride)
        scored += window[context:]
    assert scored == ids[1:]


def test_sliding_windows_refuse_a_stride_that_leaves_no_context():
    with pytest.raises(ValueError, match="stride 16"):
        list(sliding_windows(list(range(40)), 16, 16))


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoTokenizer

    from easympt import FlaxMptForCausalLM
    from easympt.transform import mpt_from_pretrained

    params, config = mpt_from_pretrained(demo_checkpoint(), dtype="fp32", progress=False)
    return FlaxMptForCausalLM(config, dtype="fp32", _do_init=False), params, AutoTokenizer.from_pretrained(
        demo_checkpoint())


def direct_nll(model, params, tokenizer, text) -> float:
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    logp = jax.nn.log_softmax(np.asarray(model(np.asarray([ids]), params=params).logits[0], np.float64), axis=-1)
    return -float(sum(logp[t - 1, ids[t]] for t in range(1, len(ids))))


def test_windowed_perplexity_equals_the_full_pass_when_it_fits(demo):
    model, params, tok = demo
    res = evaluate_texts(TEXTS, tok, local_scorer(model, params, 256), max_length=256, batch_size=2, progress=False)
    want = sum(direct_nll(model, params, tok, t) for t in TEXTS)
    assert res.nll == pytest.approx(want, rel=1e-5)
    assert res.tokens == sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS)
    assert res.bytes == sum(len(t.encode()) for t in TEXTS)
    assert res.perplexity == pytest.approx(math.exp(want / res.tokens), rel=1e-5)
    assert res.bits_per_byte == pytest.approx(want / math.log(2) / res.bytes, rel=1e-5)
    short = evaluate_texts(TEXTS, tok, local_scorer(model, params, 16), max_length=16, stride=8, progress=False)
    assert short.tokens == res.tokens and short.nll > res.nll * 0.9  # less context, same tokens


def test_eval_through_a_server_equals_local(demo, server_process):
    model, params, tok = demo
    url, _ = server_process
    local = evaluate_texts(TEXTS, tok, local_scorer(model, params, 64), max_length=64, stride=32, progress=False)
    remote = evaluate_texts(TEXTS, tok, server_scorer(url), max_length=64, stride=32, batch_size=3, progress=False)
    assert remote.tokens == local.tokens and remote.nll == pytest.approx(local.nll, rel=1e-4)


def test_eval_cli_local_and_server(tmp_path, server_process):
    url, _ = server_process
    data = tmp_path / "docs.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    outs = []
    for extra in ([], ["--server", url]):
        p = subprocess.run([sys.executable, "-m", "easympt.cli", "eval", "--data", str(data), "--max-length", "64",
                            "--json", *extra], capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr
        outs.append(json.loads(p.stdout.strip().splitlines()[-1]))
    assert outs[0]["documents"] == 2 and outs[0]["tokens"] == outs[1]["tokens"]
    assert outs[1]["perplexity"] == pytest.approx(outs[0]["perplexity"], rel=1e-4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    p = subprocess.run([sys.executable, "-m", "easympt.cli", "eval", "--data", str(bad)], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 2 and "bad.jsonl:2: needs a string 'text' field" in p.stderr


def test_read_texts(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    assert read_texts(str(tmp_path / "a.txt")) == ["one\n\ntwo\n"]
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(EvalDataError, match="empty file"):
        read_texts(str(tmp_path / "e.txt"))
    with pytest.raises(EvalDataError, match="no such file"):
        read_texts(str(tmp_path / "missing.txt"))


# ------------------------------------------------------------- lm-evaluation-harness
@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    """`easympt serve` on the demo model, as a user starts it."""
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "easympt.cli", "serve", "--port", str(port), "--no-gradio",
                             "--max-length", "512", "--max-compile-tokens", "32", "--batch-size", "4",
                             "--no-precompile"],  # it compiles what the harness runs
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(proc, url)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


MC = [  # multiple choice over code the demo model has read (CPython's standard library)
    {"question": "import os\npath = os.path.", "choices": ["join(a, b)", "banana(a)", "zzz"], "answer": 0},
    {"question": "def __init__(self", "choices": ["):", ", x, y):", " + 1"], "answer": 0},
    {"question": "for i in range(", "choices": ["len(items)):", "import os", "class A:"], "answer": 0},
    {"question": "    return", "choices": [" None", " (((", " ]]]"], "answer": 0},
    {"question": "if x is", "choices": [" None:", " def", " import"], "answer": 0},
    {"question": "raise ValueError(", "choices": ["\"bad value\")", "for", "yield"], "answer": 0},
]
GEN = [{"prompt": "import", "target": " os"}, {"prompt": "def main(", "target": "):"},
       {"prompt": "class Foo(", "target": "object):"}]


def _task_dir(tmp_path) -> str:
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in MC) + "\n")
    (d / "gen.jsonl").write_text("\n".join(json.dumps(r) for r in GEN) + "\n")
    (d / "easympt_mc.yaml").write_text(f"""task: easympt_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
""")
    (d / "easympt_gen.yaml").write_text(f"""task: easympt_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
""")
    return str(d)


def _loglikelihood(model, params, tok, context: str, continuation: str) -> float:
    """As lm-eval builds a request: encode(context) followed by encode(context + continuation) past
    the context's length (where the two tokenizations disagree at the seam, that is what it sends)."""
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    ids = ctx + whole[len(ctx):]
    logp = jax.nn.log_softmax(np.asarray(model(np.asarray([ids]), params=params).logits[0], np.float64), axis=-1)
    return float(sum(logp[t - 1, ids[t]] for t in range(len(ctx), len(ids))))


def test_lm_eval_harness_scores_the_served_demo_model(tmp_path, server_process, demo):
    pytest.importorskip("lm_eval")
    model, params, tok = demo
    url, _ = server_process
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
           f"model=demo_model,base_url={url}/v1/completions,tokenizer={demo_checkpoint()},num_concurrent=1,"
           "max_retries=1,tokenized_requests=True,max_length=512",
           "--tasks", "easympt_mc,easympt_gen", "--include_path", _task_dir(tmp_path), "--output_path", str(out),
           "--log_samples"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (results_file,) = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if f.startswith("results")]
    results = json.load(open(results_file))["results"]

    # multiple choice: the accuracy lm-eval reports equals argmax over easympt's own log-likelihoods
    want = np.mean([int(np.argmax([_loglikelihood(model, params, tok, d["question"], c) for c in d["choices"]])
                        == d["answer"]) for d in MC])
    assert results["easympt_mc"]["acc,none"] == pytest.approx(want)
    (mc_samples,) = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs if "samples_easympt_mc" in f]
    for line in open(mc_samples):
        sample = json.loads(line)
        for args, resp in zip(sample["arguments"].values(), sample["filtered_resps"]):
            assert float(resp[0]) == pytest.approx(_loglikelihood(model, params, tok, args["arg_0"], args["arg_1"]),
                                                   abs=1e-3)

    # generate_until ran through the same server and was scored
    assert "exact_match,none" in results["easympt_gen"]
