"""Data: documents -> byte-level BPE -> memory-mapped token shards -> batches.

`prepare_dataset` builds a dataset directory once; `BatchLoader` / `iter_eval_batches` read it;
`check_dataset` / `check_output_dir` check a run's inputs and output directory before it starts.
"""

from ppmoe.data.chunked import ChunkedLoader
from ppmoe.data.loader import BatchLoader, TokenStream, iter_eval_batches, read_meta
from ppmoe.data.prepare import TOKENIZER_FILE, prepare_dataset
from ppmoe.data.checks import check_dataset, check_output_dir, checkpoint_bytes, padded_model_vocab
from ppmoe.data.sources import describe_source, iter_documents
from ppmoe.data.tokenizer import EOS_TOKEN, eos_id, load_tokenizer, train_bpe

__all__ = [
    "BatchLoader",
    "ChunkedLoader",
    "EOS_TOKEN",
    "TokenStream",
    "TOKENIZER_FILE",
    "check_dataset",
    "check_output_dir",
    "checkpoint_bytes",
    "describe_source",
    "eos_id",
    "iter_documents",
    "iter_eval_batches",
    "load_tokenizer",
    "padded_model_vocab",
    "prepare_dataset",
    "read_meta",
    "train_bpe",
]
