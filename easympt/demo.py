"""A stand-in model for offline use: random MPT weights and a byte-level BPE
trained on easympt's own source. It exercises the whole stack (conversion,
engine, server, UIs) without a download; its text is noise, not language."""

from __future__ import annotations

import glob
import os

DEMO_GEOMETRY = dict(d_model=128, n_heads=4, n_layers=4, max_seq_len=2048)


def train_tokenizer(vocab_size: int = 512, files: list[str] | None = None, chat_tokens: bool = False):
    """A PreTrainedTokenizerFast (byte-level BPE) trained on local files. `chat_tokens` adds ChatML's
    <|im_start|>/<|im_end|> as single ordinary tokens (so they decode as text and stop strings see them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if files is None:
        root = os.path.dirname(os.path.abspath(__file__))
        files = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    if chat_tokens:
        tok.add_tokens(["<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")


def random_demo_checkpoint(path: str | None = None, seed: int = 0) -> str:
    """Write (once) a Hugging Face-format random MPT + tokenizer; returns its directory."""
    import jax

    from easympt.config import MptConfig
    from easympt.model import FlaxMptForCausalLM
    from easympt.transform import mpt_to_pretrained

    path = path or os.path.join(os.path.expanduser(os.environ.get("EASYMPT_CACHE", "~/.cache/easympt")),
                                "random-demo")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    tokenizer = train_tokenizer()
    config = MptConfig.preset("tiny", vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                              **DEMO_GEOMETRY)
    model = FlaxMptForCausalLM(config, _do_init=False)
    params = model.init_weights(jax.random.PRNGKey(seed), (1, 1))
    return mpt_to_pretrained(params, config, path, tokenizer=tokenizer)
