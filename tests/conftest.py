"""Shared test data and models.

- `tiny_pairs()` / `tiny_tokenizer`: a small German-English corpus committed in the repository
  (tests/data/tiny.{de,en}, 400 pairs written for these tests) and the 300-piece joint tokenizer the
  unit tests use, so they do not need Multi30k.
- `tiny_model_dir`: an untrained `tiny` model (seed 0, 512 positions) saved with that tokenizer.
- `tiny_model(seed)`: an untied `tiny` model over a 40-piece vocabulary, for the search tests.
- `MULTI30K`: the real data, for the integration tests. `make test` sets
  AIAYN_DATA=../shared/data/multi30k; without it the tests look beside the repository
  (../shared/data/multi30k), the layout of this project's machines and CI.
"""

import os
from pathlib import Path

import pytest
import torch

from aiayn.files.checkpoint import save_model
from aiayn.config import ModelConfig
from aiayn.files.data import read_parallel
from aiayn.model.transformer import Transformer
from aiayn.files.tokenizer import Tokenizer

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest-xdist worker per core: one thread each (and for the commands the
    # tests start), or the workers' OpenMP threads fight over the cores and all of them crawl.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
MULTI30K = Path(os.environ.get("AIAYN_DATA") or ROOT.parent / "shared" / "data" / "multi30k").resolve()
TINY_CORPUS = ROOT / "tests" / "data"
TINY_VOCAB_SIZE = 300
TINY_TRAIN_PAIRS = 300  # the tokenizer's (and the brief training runs') share of the corpus


def pytest_collection_modifyitems(items: list) -> None:
    """The slow tests first, longest first (`@pytest.mark.slow(seconds=...)`: a rough time on a
    2-core AVX2 machine, an ordering hint only), so that with one worker per core (`make test`) the
    longest start at once and the many short ones fill the other workers around them. pytest-xdist
    hands each worker a share of the list up front: a long test late in it waits behind others."""

    def order(item) -> tuple[bool, float]:
        slow = item.get_closest_marker("slow")
        return slow is None, -(slow.kwargs.get("seconds", 0) if slow else 0)

    items.sort(key=order)


@pytest.fixture(autouse=True)
def _kernel_cache_variables_restored():
    """The decoding commands set oneDNN's cache variables in os.environ (`bound_kernel_caches`);
    in-process CLI tests must not hand them on to later tests' subprocesses."""
    from aiayn.allocator import KERNEL_CACHE_VARIABLES

    saved = {name: os.environ.get(name) for name in KERNEL_CACHE_VARIABLES}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def tiny_pairs():
    """The repository's small corpus as `ParallelText` (src German, tgt English, 400 pairs)."""
    return read_parallel(TINY_CORPUS / "tiny.de", TINY_CORPUS / "tiny.en")


@pytest.fixture(scope="session")
def tiny_tokenizer() -> Tokenizer:
    """A 300-piece joint tokenizer trained on the first 300 pairs of the repository's corpus."""
    pairs = tiny_pairs()
    return Tokenizer.train(
        pairs.src[:TINY_TRAIN_PAIRS] + pairs.tgt[:TINY_TRAIN_PAIRS], vocab_size=TINY_VOCAB_SIZE, num_threads=1
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Tokenizer) -> Path:
    """An untrained `tiny` model (seed 0, 512 positions) with `tiny_tokenizer`, saved de -> en."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", vocab_size=tiny_tokenizer.vocab_size, max_positions=512))
    directory = tmp_path_factory.mktemp("tiny-model")
    return save_model(model, tiny_tokenizer, directory, {"src_lang": "de", "tgt_lang": "en"})


def tiny_model(seed: int = 0) -> Transformer:
    """An untied `tiny` model over a 40-piece vocabulary (64 positions), in eval mode."""
    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset("tiny", vocab_size=40, max_positions=64, share_embeddings=False)).eval()
