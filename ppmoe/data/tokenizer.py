"""Byte-level BPE tokenizer (trained on the dataset, or loaded from a tokenizer.json).

Byte-level means every string is representable (no unknown token) and, with no normaliser,
`decode(encode(text)) == text` exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
# Names other tokenizers use for their end-of-document token, tried when EOS_TOKEN is absent.
_EOS_ALIASES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


def train_bpe(documents: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE with `EOS_TOKEN` as id 0 and at most `vocab_size` tokens.

    The vocabulary can come out smaller than asked when the text has too few distinct pairs.
    """
    n_base = len(pre_tokenizers.ByteLevel.alphabet()) + 1  # 256 bytes + EOS
    if vocab_size < n_base:
        raise ValueError(f"data.vocab_size must be at least {n_base} (all bytes and EOS), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # No prefix space: it would insert a character that is not in the text and break losslessness.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],  # first special token gets id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte, even unseen ones
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizers` tokenizer.json."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist (data.tokenizer)")
    return Tokenizer.from_file(str(path))


def eos_id(tok: Tokenizer) -> int:
    """Id of the end-of-document token: `EOS_TOKEN`, or a common alias in foreign tokenizers."""
    for name in _EOS_ALIASES:
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise ValueError(f"tokenizer has no end-of-document token (looked for {', '.join(_EOS_ALIASES)})")
