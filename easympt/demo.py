"""The bundled demo model and the byte-level BPE trainer it (and the tests) use.

The demo model is a small ALiBi MPT trained by scripts/train_demo_model.py on
the Python standard library's source, shipped in Hugging Face format inside
the package, so everything runs offline out of the box."""

from __future__ import annotations

import glob
import os


def train_tokenizer(vocab_size: int = 512, files: list[str] | None = None, chat_tokens: bool = False,
                    special_tokens: tuple[str, ...] = ("<|endoftext|>",)):
    """A PreTrainedTokenizerFast (byte-level BPE) trained on local files. `chat_tokens` adds ChatML's
    <|im_start|>/<|im_end|> as single ordinary tokens (so they decode as text and stop strings see them).
    `special_tokens` take the first ids in order; <|endoftext|> is eos, <|pad|> (if named) the padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if files is None:
        root = os.path.dirname(os.path.abspath(__file__))
        files = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train(files, trainer)
    if chat_tokens:
        tok.add_tokens(["<|im_start|>", "<|im_end|>"])
    pad = "<|pad|>" if "<|pad|>" in special_tokens else "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token=pad)


DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_model")


def demo_checkpoint() -> str:
    """The bundled demo model (package data): what serve, generate and `make serve` use when no model is named."""
    if not os.path.isfile(os.path.join(DEMO_DIR, "config.json")):
        raise FileNotFoundError(f"{DEMO_DIR}: the bundled demo model is missing; rebuild it with "
                                "`python scripts/train_demo_model.py`")
    return DEMO_DIR
