"""Task heads against transformers' PyTorch MptForSequenceClassification /
MptForTokenClassification / MptForQuestionAnswering: logits on padded batches,
every loss, loading and writing the heads, partition rules, fine-tuning."""

import numpy as np
import pytest

from conftest import assert_logits_close, make_hf_checkpoint
from easympt import (FlaxMptForQuestionAnswering, FlaxMptForSequenceClassification, FlaxMptForTokenClassification,
                     MptConfig)
from easympt.heads import model_class_for
from easympt.transform import mpt_from_pretrained, mpt_to_pretrained

PAD = 0


def padded_batch(vocab=128, lengths=(20, 15, 9), T=20, seed=0):
    """Left- and right-padded rows; real tokens never equal the pad id."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (len(lengths), T))
    mask = np.zeros_like(ids)
    for r, n in enumerate(lengths):
        if r % 2:  # left padding
            ids[r, :T - n], mask[r, T - n:] = PAD, 1
        else:
            ids[r, n:], mask[r, :n] = PAD, 1
    return ids, mask


def torch_model(path, architecture):
    import transformers

    return getattr(transformers, architecture).from_pretrained(str(path)).eval()


def load(path):
    params, config = mpt_from_pretrained(str(path), dtype="fp32", progress=False)
    return model_class_for(config)(config, dtype="fp32", _do_init=False), params


def tensor(x):
    import torch

    return torch.tensor(np.asarray(x))


@pytest.mark.parametrize("problem_type,num_labels", [
    ("single_label_classification", 3), ("multi_label_classification", 4), ("regression", 1), ("regression", 2),
])
def test_sequence_classification_matches_transformers(tmp_path, problem_type, num_labels):
    import torch

    path = make_hf_checkpoint(tmp_path / "m", seed=1, architecture="MptForSequenceClassification",
                              num_labels=num_labels, problem_type=problem_type, pad_token_id=PAD)
    model, params = load(path)
    assert isinstance(model, FlaxMptForSequenceClassification)
    assert model.config.num_labels == num_labels and model.config.problem_type == problem_type
    ids, mask = padded_batch()
    rng = np.random.default_rng(2)
    if problem_type == "single_label_classification":
        labels = rng.integers(0, num_labels, (3,))
    elif problem_type == "multi_label_classification":
        labels = rng.integers(0, 2, (3, num_labels)).astype(np.float32)
    else:
        labels = rng.normal(size=(3,) if num_labels == 1 else (3, num_labels)).astype(np.float32)
    out = model(ids, mask, params=params, labels=labels)
    with torch.no_grad():
        ref = torch_model(path, "MptForSequenceClassification")(tensor(ids), attention_mask=tensor(mask),
                                                                 labels=tensor(labels))
    assert out.logits.shape == (3, num_labels)
    assert_logits_close(out.logits, ref.logits.numpy())
    np.testing.assert_allclose(float(out.loss), float(ref.loss), rtol=1e-4)


def test_problem_type_guessed_like_transformers(tmp_path):
    """No problem_type in the config: integer labels mean single-label, float labels multi-label."""
    import torch

    path = make_hf_checkpoint(tmp_path / "m", seed=2, architecture="MptForSequenceClassification", num_labels=3,
                              pad_token_id=PAD)
    model, params = load(path)
    ids, mask = padded_batch()
    for labels in (np.array([0, 2, 1]), np.array([[1, 0, 1], [0, 0, 1], [1, 1, 0]], np.float32)):
        with torch.no_grad():
            ref = torch_model(path, "MptForSequenceClassification")(tensor(ids), attention_mask=tensor(mask),
                                                                     labels=tensor(labels))
        np.testing.assert_allclose(float(model(ids, mask, params=params, labels=labels).loss), float(ref.loss),
                                   rtol=1e-4)


def test_sequence_classification_without_pad_token(tmp_path):
    path = make_hf_checkpoint(tmp_path / "m", architecture="MptForSequenceClassification", num_labels=2)
    model, params = load(path)
    ids, _ = padded_batch()
    with pytest.raises(ValueError, match="pad_token_id"):
        model(ids, params=params)
    import torch

    with torch.no_grad():
        ref = torch_model(path, "MptForSequenceClassification")(tensor(ids[:1])).logits.numpy()
    assert_logits_close(model(ids[:1], params=params).logits, ref)


def test_token_classification_matches_transformers(tmp_path):
    import torch

    path = make_hf_checkpoint(tmp_path / "m", seed=3, architecture="MptForTokenClassification", num_labels=5,
                              pad_token_id=PAD)
    model, params = load(path)
    assert isinstance(model, FlaxMptForTokenClassification)
    ids, mask = padded_batch()
    labels = np.random.default_rng(4).integers(0, 5, ids.shape)
    labels[mask == 0] = -100  # padding ignored, as a transformers data collator marks it
    out = model(ids, mask, params=params, labels=labels)
    with torch.no_grad():
        ref = torch_model(path, "MptForTokenClassification")(tensor(ids), attention_mask=tensor(mask),
                                                              labels=tensor(labels))
    assert_logits_close(out.logits, ref.logits.numpy(), mask=mask)
    np.testing.assert_allclose(float(out.loss), float(ref.loss), rtol=1e-4)


def test_question_answering_matches_transformers(tmp_path):
    import torch

    path = make_hf_checkpoint(tmp_path / "m", seed=5, architecture="MptForQuestionAnswering", pad_token_id=PAD)
    model, params = load(path)
    assert isinstance(model, FlaxMptForQuestionAnswering)
    ids, mask = padded_batch()
    start, end = np.array([3, 7, 25]), np.array([5, 12, 30])  # the last row's span lies outside: ignored
    out = model(ids, mask, params=params, start_positions=start, end_positions=end)
    with torch.no_grad():
        ref = torch_model(path, "MptForQuestionAnswering")(tensor(ids), attention_mask=tensor(mask),
                                                            start_positions=tensor(start), end_positions=tensor(end))
    assert_logits_close(out.start_logits, ref.start_logits.numpy(), mask=mask)
    assert_logits_close(out.end_logits, ref.end_logits.numpy(), mask=mask)
    np.testing.assert_allclose(float(out.loss), float(ref.loss), rtol=1e-4)


@pytest.mark.parametrize("architecture", ["MptForSequenceClassification", "MptForTokenClassification",
                                          "MptForQuestionAnswering"])
def test_heads_round_trip_to_transformers(tmp_path, architecture):
    """mpt_to_pretrained writes the head back: transformers loads it (no missing keys) with equal weights."""
    import torch

    path = make_hf_checkpoint(tmp_path / "m", seed=6, architecture=architecture, num_labels=3, pad_token_id=PAD)
    model, params = load(path)
    out = mpt_to_pretrained(params, model.config, str(tmp_path / "out"))
    import transformers

    back, info = getattr(transformers, architecture).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    orig = torch_model(path, architecture).state_dict()
    for k, v in back.state_dict().items():
        torch.testing.assert_close(v, orig[k], rtol=0, atol=0)


def test_partition_rules_cover_head_parameters():
    from easympt.sharding import match_partition_rules

    config = MptConfig.preset("tiny").for_task("MptForTokenClassification", num_labels=4)
    for cls in (FlaxMptForSequenceClassification, FlaxMptForTokenClassification, FlaxMptForQuestionAnswering):
        shapes = cls(config, _do_init=False).params_shape()
        specs = match_partition_rules(config.get_partition_rules(), shapes)
        head = [k for k in shapes if k != "transformer"]
        assert head and all(k in specs for k in head)


def test_unknown_architecture_and_problem_type_are_refused(tmp_path):
    from easympt.config import ConfigError

    config = MptConfig.preset("tiny")
    with pytest.raises(ConfigError, match="problem_type"):
        config.for_task("MptForSequenceClassification", num_labels=2, problem_type="ranking")
    with pytest.raises(ConfigError, match="architectures \\['MptForCausalLMWithValueHead'\\] is not an MPT"):
        config.for_task("MptForCausalLMWithValueHead")


def test_classifier_fine_tunes_from_a_causal_lm(tmp_path):
    """A classifier started from a causal LM's trunk learns a tiny labelled set with the trainer."""
    from easympt import FlaxMptForCausalLM
    from easympt.training import TrainConfig, Trainer

    base = MptConfig.preset("tiny", pad_token_id=PAD, vocab_size=64)
    lm = FlaxMptForCausalLM(base, dtype="fp32", seed=0)
    config = base.for_task("MptForSequenceClassification", id2label={0: "negative", 1: "positive"})
    model = FlaxMptForSequenceClassification(config, dtype="fp32", _do_init=False)
    params = model.params_from_causal_lm(lm.params)
    np.testing.assert_array_equal(params["transformer"]["wte"]["embedding"], lm.params["transformer"]["wte"]["embedding"])
    rng = np.random.default_rng(0)
    ids, mask = padded_batch(vocab=64, lengths=tuple(rng.integers(4, 16, 32)), T=16)
    labels = (ids == 7).any(1).astype(np.int32)  # "does token 7 occur?"
    rows = {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32), "labels": labels}
    tc = TrainConfig(output_dir=str(tmp_path / "run"), seq_len=16, batch_size=8, learning_rate=3e-3, max_steps=40,
                     warmup_steps=2, save_every=1000)
    trainer = Trainer(model, params, rows, tc, eval_rows=rows)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.5 * before, (before, after)
    out = mpt_to_pretrained(trainer.params, config, str(tmp_path / "export"))
    assert MptConfig.from_pretrained(out).architecture == "MptForSequenceClassification"
