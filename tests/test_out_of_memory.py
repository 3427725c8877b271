"""Too little memory, for real: `aiayn` under an address-space limit (RLIMIT_AS) set a fixed
headroom above what the process holds after its imports, given a batch far beyond that headroom.
One line that says what was tried and what to lower; exit status 2, never a kill."""

import os
import resource
import subprocess
import sys

import pytest

from conftest import TINY_CORPUS

HEADROOM = 1 << 30  # 1 GiB above the imports' address space
# Imports first (torch alone maps a few GiB of address space), then the limit, then the command.
LIMITED = """
import resource, sys
import torch, sentencepiece
import aiayn.training.loop, aiayn.decoding.translator
from aiayn.cli import main
status = open("/proc/self/status").read()
size = int(next(line for line in status.splitlines() if line.startswith("VmSize:")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + {headroom}, resource.getrlimit(resource.RLIMIT_AS)[1]))
sys.exit(main(sys.argv[1:]))
""".format(headroom=HEADROOM)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status (Linux)")]


def run_limited(*args: str) -> subprocess.CompletedProcess:
    if resource.getrlimit(resource.RLIMIT_AS)[1] != resource.RLIM_INFINITY:
        pytest.skip("an address-space limit is already set here; the test sets its own")
    return subprocess.run([sys.executable, "-c", LIMITED, *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_training_batch_that_cannot_fit_is_one_line_naming_batch_tokens(tmp_path):
    # All 400 pairs in one batch of a model with a 64k-wide feed-forward layer: its activations
    # alone are several GiB.
    corpus = ["--train-src", str(TINY_CORPUS / "tiny.de"), "--train-tgt", str(TINY_CORPUS / "tiny.en")]
    done = run_limited("train", *corpus, "--vocab-size", "300", "--preset", "tiny", "--model", "d_ff=65536",
                       "--batch-tokens", "100000", "--max-steps", "1", "--threads", "1", "--out", str(tmp_path / "run"))
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("aiayn train: error: out of memory: an allocation ")
    assert line.endswith("failed; lower --batch-tokens (now 100000), with --accumulate N to keep the tokens "
                         "per update, or train a smaller model")


def test_a_translation_batch_that_cannot_fit_is_one_line_naming_batch_tokens_and_beam(tmp_path, tiny_model_dir):
    source = tmp_path / "in.de"
    source.write_text("Ein Hund läuft über die Wiese und ein Kind spielt im Garten.\n" * 2000, encoding="utf-8")
    done = run_limited("translate", "--model", str(tiny_model_dir), "--input", str(source), "--output",
                       str(tmp_path / "out.en"), "--beam", "128", "--batch-tokens", "1000000", "--max-len-b", "200",
                       "--precision", "fp32")
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("aiayn translate: error: out of memory: an allocation ")
    assert line.endswith("; lower --batch-tokens (now 1000000) or --beam (now 128)")
    assert not (tmp_path / "out.en").exists()
