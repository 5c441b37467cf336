"""Shared fixtures: one thread per process (2-core machines), inductor without compile workers, and a
tiny prepared dataset."""

import os
import random

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Inductor compiles in this process, not in a pool of compile workers: tests fork their ranks
# (multiproc.run_ranks), and ranks forked after the pytest process compiled (test_compile.py) hang on the
# pool's state when they compile themselves. Measured with a cold cache: 300 s hang without, 64 s with.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

WORDS = ("the king queen lord lady sword crown love death night day sweet fair speak hath doth thou thee "
         "what shall come go stay fly noble heart blood grace honour time world").split()


def write_documents(directory, n_docs=6, lines=300, seed=0):
    """Generated text documents: random sentences over a small word list (no download needed)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "."
                         for _ in range(lines))
        (directory / f"doc{i}.txt").write_text(text)
    return str(directory / "*.txt")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A prepared dataset directory (BPE vocab 300) built from generated documents."""
    from ppmoe.config import DataConfig
    from ppmoe.data import prepare_dataset

    root = tmp_path_factory.mktemp("tiny_dataset")
    pattern = write_documents(root / "docs")
    cfg = DataConfig(dataset_dir=str(root / "data"), source="files", paths=[pattern], vocab_size=300)
    prepare_dataset(cfg, log=lambda *_: None)
    return str(root / "data")
