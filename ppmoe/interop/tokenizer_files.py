"""The run's `tokenizers` tokenizer as a transformers tokenizer: tokenizer.json as it is, plus
tokenizer_config.json naming the fast tokenizer class and the special tokens, so AutoTokenizer loads it
offline and encodes exactly as ppmoe's data pipeline did (byte-level BPE, no BOS, no normaliser)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer

TOKENIZER_FILE = "tokenizer.json"


def write_hf_tokenizer(tokenizer_json: Path, out: Path, eos_id: int | None, max_length: int) -> None:
    """Copy `tokenizer_json` into `out` and write tokenizer_config.json (+ special_tokens_map.json)."""
    shutil.copyfile(tokenizer_json, out / TOKENIZER_FILE)
    tok = Tokenizer.from_file(str(tokenizer_json))
    eos = tok.id_to_token(eos_id) if eos_id is not None else None
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        # documents are separated by EOS and nothing is prepended: the model never saw a BOS
        "bos_token": None, "eos_token": eos, "pad_token": eos, "unk_token": None,
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special = {"eos_token": eos, "pad_token": eos} if eos is not None else {}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
