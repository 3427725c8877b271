"""A fused CPU beam step: log-softmax, token masking and `search.beam_step` in one C++ pass.

Shape legend: A sentences, R decoder rows per sentence (1 at the first step, else K), K beam
size, V vocabulary, C = 2K candidates per sentence.

`search.beam_search` spends about a tenth of a CPU decoding step (int8, beam 4, 32 sentences,
8k vocabulary) outside the model, on [A*R, V] float arrays: `log_softmax` (1M `exp` calls per
step), then the pad / bos / maximum-length masks, then `beam_step`'s block maxima, top-k and
gathers, each a separate pass and a separate operator call. This module does the same arithmetic
in one C++ function per step: per row, its maximum and the log-sum-exp (a vectorised `exp`
written out below, Cephes' single-precision polynomial, about 1 ulp); then a scan of each live
beam's row that keeps the C best `score + logit - logsumexp` in a small sorted list, so only the
few values above the current C-th best go past one vector compare.

The kernel is compiled on first use by the C++ toolchain that `torch.compile` uses on the CPU
(inductor's code cache: the same compiler flags and vector ISA). The built library is then kept
in aiayn's own cache (`$AIAYN_CACHE`, else `$XDG_CACHE_HOME/aiayn`, else `~/.cache/aiayn`), keyed by
the source, PyTorch, Python and the CPU's flags, so that later processes load it directly:
importing inductor alone takes seconds, which every `aiayn translate` would otherwise pay before
its first sentence. Where building fails (no compiler), `available()` is False and the search
keeps the PyTorch path, `torch.log_softmax` + `beam_step`, which this function is tested to match: same
candidates, scores within float32 rounding. Equal scores come out in (beam, token) order.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import sys
import threading
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <cmath>
#include <limits>

using Vec = at::vec::Vectorized<float>;
using IntVec = at::vec::Vectorized<int32_t>;

// exp(x) for x <= 0 (Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, degree-5 polynomial; ~1 ulp).
static inline Vec exp_nonpositive(Vec x) {
  x = at::vec::maximum(x, Vec(-87.3f));  // below, exp underflows: the result is ~0 either way
  const Vec n = at::vec::fmadd(x, Vec(1.44269504088896341f), Vec(0.5f)).floor();
  Vec r = at::vec::fmadd(n, Vec(-0.693359375f), x);
  r = at::vec::fmadd(n, Vec(2.12194440e-4f), r);
  Vec p = at::vec::fmadd(Vec(1.9875691500e-4f), r, Vec(1.3981999507e-3f));
  p = at::vec::fmadd(p, r, Vec(8.3334519073e-3f));
  p = at::vec::fmadd(p, r, Vec(4.1665795894e-2f));
  p = at::vec::fmadd(p, r, Vec(1.6666665459e-1f));
  p = at::vec::fmadd(p, r, Vec(5.0000001201e-1f));
  p = at::vec::fmadd(p, r * r, r + Vec(1.0f));
  const IntVec bits = (at::vec::convert_to_int_of_same_size(n) + IntVec(127)) << IntVec(23);
  return p * at::vec::cast<float>(bits);  // p * 2^n
}

static float log_sum_exp(const float* x, int64_t vocab) {
  constexpr int64_t W = Vec::size();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  Vec m0(neg_inf), m1(neg_inf), m2(neg_inf), m3(neg_inf);
  int64_t t = 0;
  for (; t + 4 * W <= vocab; t += 4 * W) {
    m0 = at::vec::maximum(m0, Vec::loadu(x + t));
    m1 = at::vec::maximum(m1, Vec::loadu(x + t + W));
    m2 = at::vec::maximum(m2, Vec::loadu(x + t + 2 * W));
    m3 = at::vec::maximum(m3, Vec::loadu(x + t + 3 * W));
  }
  for (; t + W <= vocab; t += W) m0 = at::vec::maximum(m0, Vec::loadu(x + t));
  const Vec vmax = at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3));
  float m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  for (; t < vocab; ++t) m = std::max(m, x[t]);
  if (!(m > neg_inf) || std::isinf(m)) return m;  // all -inf (or +inf / nan): nothing to normalise
  const Vec vm(m);
  Vec s0(0.0f), s1(0.0f), s2(0.0f), s3(0.0f);
  t = 0;
  for (; t + 4 * W <= vocab; t += 4 * W) {
    s0 += exp_nonpositive(Vec::loadu(x + t) - vm);
    s1 += exp_nonpositive(Vec::loadu(x + t + W) - vm);
    s2 += exp_nonpositive(Vec::loadu(x + t + 2 * W) - vm);
    s3 += exp_nonpositive(Vec::loadu(x + t + 3 * W) - vm);
  }
  for (; t + W <= vocab; t += W) s0 += exp_nonpositive(Vec::loadu(x + t) - vm);
  __at_align__ float lanes[W];
  ((s0 + s1) + (s2 + s3)).store(lanes);
  double sum = 0.0;
  for (int64_t i = 0; i < W; ++i) sum += lanes[i];
  for (; t < vocab; ++t) sum += std::exp(static_cast<double>(x[t] - m));
  return m + static_cast<float>(std::log(sum));
}

extern "C" void kernel(const float* logits, const float* scores, const bool* at_max, float* lse_rows,
                       float* out_scores, int64_t* out_beams, int64_t* out_tokens,
                       const int64_t sentences, const int64_t rows_per_sentence, const int64_t beam,
                       const int64_t vocab, const int64_t count, const int64_t pad_id,
                       const int64_t bos_id, const int64_t eos_id, const int64_t threads) {
  constexpr int64_t W = Vec::size();
  const float neg_inf = -std::numeric_limits<float>::infinity();
  #pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t a = 0; a < sentences; ++a) {
    float* best = out_scores + a * count;
    int64_t* best_beam = out_beams + a * count;
    int64_t* best_token = out_tokens + a * count;
    int64_t filled = 0;
    float threshold = neg_inf;  // the count-th best so far; -inf until `count` are held
    auto consider = [&](int64_t b, int64_t token, float value) {
      if (token == pad_id || token == bos_id || !(value > threshold)) return;
      int64_t at = filled < count ? filled++ : count - 1;  // a full list drops its last
      for (; at > 0 && best[at - 1] < value; --at) {  // strict: equal values keep their order
        best[at] = best[at - 1]; best_beam[at] = best_beam[at - 1]; best_token[at] = best_token[at - 1];
      }
      best[at] = value; best_beam[at] = b; best_token[at] = token;
      if (filled == count) threshold = best[count - 1];
    };
    float* lse = lse_rows + a * rows_per_sentence;
    for (int64_t r = 0; r < rows_per_sentence; ++r)
      lse[r] = log_sum_exp(logits + (a * rows_per_sentence + r) * vocab, vocab);
    for (int64_t b = 0; b < beam; ++b) {
      const float score = scores[a * beam + b];
      if (!(score > neg_inf)) continue;  // a dead beam slot: all its continuations are -inf
      const int64_t r = rows_per_sentence > 1 ? b : 0;
      const int64_t row = a * rows_per_sentence + r;
      const float* x = logits + row * vocab;
      const float base = score - lse[r];
      if (at_max[row]) {  // at the maximum length only EOS may follow
        consider(b, eos_id, x[eos_id] + base);
        continue;
      }
      int64_t t = 0;
      for (; t + W <= vocab; t += W) {
        const Vec values = Vec::loadu(x + t) + Vec(base);
        const int below = (values > Vec(threshold)).zero_mask();  // bit i set: lane i not above
        if (below == (1 << W) - 1) continue;
        __at_align__ float lanes[W];
        values.store(lanes);
        for (int64_t i = 0; i < W; ++i)
          if (!((below >> i) & 1)) consider(b, t + i, lanes[i]);
      }
      for (; t < vocab; ++t) consider(b, t, x[t] + base);
    }
    for (; filled < count; ++filled) {  // fewer finite continuations than `count`
      best[filled] = neg_inf; best_beam[filled] = 0; best_token[filled] = pad_id;
    }
  }
}
"""

_ARGTYPES = [
    "const float*", "const float*", "const bool*", "float*", "float*", "int64_t*", "int64_t*",
    "const int64_t", "const int64_t", "const int64_t", "const int64_t", "const int64_t",
    "const int64_t", "const int64_t", "const int64_t", "const int64_t",
]
_lock = threading.Lock()
_kernel = None
_failed = False


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            return next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def cached_library() -> Path:
    """Where the built kernel is kept for later processes. The key covers everything the binary
    depends on: a library built with AVX-512 must not be loaded on an AVX2 machine sharing the
    home directory, nor one built against another PyTorch's headers."""
    key = hashlib.sha256(
        "\n".join([_SOURCE, repr(_ARGTYPES), torch.__version__, sys.version, platform.machine(), _cpu_flags()])
        .encode()
    ).hexdigest()[:20]
    root = os.environ.get("AIAYN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aiayn"
    return Path(root) / f"fused_beam_step-{key}.so"


def _load_library(path: Path):
    # What inductor's loader does before importing one of its Python-binding libraries: the
    # generated argument parser finds a tensor's data pointer through this address.
    os.environ["_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR"] = str(
        torch._C._dynamo.guards._torchinductor_pyobject_tensor_data_ptr
    )
    spec = importlib.util.spec_from_file_location(f"aiayn_fused_beam_step_{path.stem[-20:]}.kernel", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.kernel


def _build_and_keep(path: Path | None):
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    kernel = CppPythonBindingsCodeCache.load_pybinding(_ARGTYPES, _SOURCE)
    built = Path(sys.modules[kernel.__module__].__file__) if kernel.__module__ in sys.modules else None
    try:
        if path is not None and built is not None and built.is_file():
            from aiayn.files.atomic import atomic_write_bytes

            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, built.read_bytes(), mode=0o755)
    except OSError as error:  # a read-only home: later processes build through inductor again
        log.info("fused beam step not cached at %s: %s", path, error)
    return kernel


def _load():
    """The compiled kernel, or None if it cannot be built here (logged once)."""
    global _kernel, _failed
    if _kernel is not None or _failed:
        return _kernel
    with _lock:
        if _kernel is None and not _failed:
            path = None
            try:  # no home directory, an unreadable cache, a damaged or foreign library: build instead
                path = cached_library()
                if path.is_file():
                    _kernel = _load_library(path)
            except Exception as error:
                log.info("cached fused beam step %s not loadable (%s); building it", path, error)
            if _kernel is None:
                try:
                    _kernel = _build_and_keep(path)
                except Exception as error:  # no compiler, or a toolchain this PyTorch cannot drive
                    _failed = True
                    log.warning("fused beam step unavailable, using torch.log_softmax + beam_step: %s", error)
    return _kernel


def available() -> bool:
    """Whether the C++ kernel is built (building it on the first call, a few seconds, cached on disk)."""
    return _load() is not None


def fused_beam_step(
    scores: Tensor,
    logits: Tensor,
    at_max: Tensor | None,
    *,
    pad_id: int,
    bos_id: int,
    eos_id: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """`beam_step(scores, log_probs)` where log_probs is `log_softmax(logits)` with pad and bos at
    -inf, and rows flagged in `at_max` reduced to their EOS entry (as `search._next_token_scores`).

    Args:
        scores: cumulative log-probs of the live beams, float32 [A, K] (-inf marks an empty slot).
        logits: next-token logits of the decoder rows, float32 [A*R, V], R = 1 (every beam of a
            sentence continues its one row) or R = K.
        at_max: bool [A*R], rows that may only produce EOS; None for none.
    Returns:
        (candidate scores [A, C], beam index [A, C], token id [A, C]), C = 2K, sorted by score
        descending within each sentence (ties in (beam, token) order); missing candidates (fewer
        than C finite continuations) have score -inf and token pad_id.
    Raises:
        RuntimeError: the kernel is not available (see `available`).
        ValueError: shapes or dtypes that the kernel does not take.
    """
    kernel = _load()
    if kernel is None:
        raise RuntimeError("the fused beam step could not be built on this machine")
    sentences, beam = scores.shape
    rows, vocab = logits.shape
    if rows not in (sentences, sentences * beam):
        raise ValueError(f"logits {tuple(logits.shape)} do not fit scores {tuple(scores.shape)}")
    if scores.dtype != torch.float32 or logits.dtype != torch.float32 or logits.device.type != "cpu":
        raise ValueError("fused_beam_step takes float32 CPU tensors")
    count = 2 * beam
    logits, scores = logits.contiguous(), scores.contiguous()
    if at_max is None:
        at_max = torch.zeros(rows, dtype=torch.bool)
    cand_scores = torch.empty(sentences, count)
    cand_beams = torch.empty(sentences, count, dtype=torch.long)
    cand_tokens = torch.empty(sentences, count, dtype=torch.long)
    kernel(
        logits, scores, at_max.contiguous(), torch.empty(rows), cand_scores, cand_beams, cand_tokens, sentences,
        rows // sentences if sentences else 1, beam, vocab, count, pad_id, bos_id, eos_id,
        torch.get_num_threads(),
    )
    return cand_scores, cand_beams, cand_tokens
