"""The HTTP server against a real uvicorn on loopback, with a tiny untrained model.

Every endpoint, every refused input (status code and message), a model failure (500, then the
server keeps serving) and micro-batching under 32 concurrent requests.
"""

import asyncio
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="serving needs the optional extra aiayn[serve]")
httpx = pytest.importorskip("httpx", reason="the server tests need httpx")

from aiayn.model.transformer import Transformer
from aiayn.config import DecodeConfig
from aiayn.serve.app import create_app
from aiayn.serve.http import background_server
from aiayn.serve.limits import ServerLimits
from aiayn.serve.worker import BatchingWorker

SENTENCES = [
    "Ein Mann fährt Fahrrad.",
    "Zwei Hunde spielen im Schnee.",
    "Eine Frau liest ein Buch.",
    "Kinder spielen Fußball auf einer Wiese.",
]
LIMITS = ServerLimits(max_body_bytes=4096, max_chars=200, max_texts=8, max_attention_chars=100)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path) -> Path:
    return tiny_model_dir


@pytest.fixture(scope="module")
def translator(model_dir: Path):
    from aiayn.decoding.translator import Translator

    return Translator.load(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir: Path):
    """A second, independent copy for expected outputs (the served one belongs to the worker)."""
    from aiayn.decoding.translator import Translator

    return Translator.load(model_dir)


@pytest.fixture(scope="module")
def base_url(translator):
    app = create_app(translator, max_batch_sentences=32, max_wait_ms=20, limits=LIMITS)
    with background_server(app) as url:
        yield url


@pytest.fixture()
def client(base_url: str):
    with httpx.Client(base_url=base_url, timeout=60) as session:
        yield session


def assert_still_serving(client) -> None:
    assert client.get("/health").json()["status"] == "ok"
    response = client.post("/translate", json={"text": SENTENCES[0], "beam_size": 1})
    assert response.status_code == 200, response.text


# --- endpoints -------------------------------------------------------------------------------


def test_health(client) -> None:
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert set(body["stats"]) >= {"requests", "sentences", "model_calls", "errors"}


def test_info_describes_the_served_model(client, translator) -> None:
    info = client.get("/info").json()
    assert info["src_lang"] == "de" and info["tgt_lang"] == "en"
    assert info["model"] == translator.model.config.to_dict()
    assert info["vocab_size"] == translator.tokenizer.vocab_size == 300
    # Counted before the linear layers were packed for oneDNN (packed weights are not parameters).
    assert info["parameters"] == translator.num_parameters == Transformer(translator.model.config).num_parameters()
    assert info["limits"]["max_texts"] == LIMITS.max_texts
    assert info["batching"] == {"enabled": True, "max_batch_sentences": 32, "max_wait_ms": 20.0}


def test_translate_one_text_matches_the_translator(client, reference) -> None:
    response = client.post("/translate", json={"text": SENTENCES[1]})
    assert response.status_code == 200, response.text
    assert response.json() == {"translations": reference.translate([SENTENCES[1]])}


def test_translate_texts_with_settings(client, reference) -> None:
    body = {"texts": SENTENCES, "beam_size": 2, "length_penalty": 1.0}
    response = client.post("/translate", json=body)
    assert response.status_code == 200, response.text
    expected = reference.translate(SENTENCES, DecodeConfig(beam_size=2, length_penalty=1.0))
    assert response.json()["translations"] == expected
    assert "nbest" not in response.json()


def test_translate_nbest_lists_are_sorted_and_lead_with_the_translation(client, reference) -> None:
    response = client.post("/translate", json={"texts": SENTENCES[:2], "beam_size": 4, "nbest": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = reference.translate(SENTENCES[:2], DecodeConfig(beam_size=4, nbest=3))
    assert [[h["text"] for h in hyps] for hyps in body["nbest"]] == [
        [t for t, _ in hyps] for hyps in expected
    ]
    for translation, hypotheses in zip(body["translations"], body["nbest"]):
        assert len(hypotheses) == 3
        assert translation == hypotheses[0]["text"]
        scores = [h["score"] for h in hypotheses]
        assert scores == sorted(scores, reverse=True)
    for got, want in zip(body["nbest"], expected):
        assert [h["score"] for h in got] == pytest.approx([score for _, score in want], abs=1e-4)


def test_translate_empty_sentence_gives_empty_translation(client) -> None:
    response = client.post("/translate", json={"texts": ["", SENTENCES[0]]})
    assert response.status_code == 200, response.text
    assert response.json()["translations"][0] == ""


def test_attention_shapes_and_normalisation(client, translator) -> None:
    response = client.post("/attention", json={"text": SENTENCES[0]})
    assert response.status_code == 200, response.text
    body = response.json()
    config = translator.model.config
    source, target = len(body["source_tokens"]), len(body["target_tokens"])
    assert len(body["target_input_tokens"]) == target
    assert (len(body["cross"]), len(body["cross"][0])) == (config.n_decoder_layers, config.n_heads)
    assert len(body["encoder_self"]) == config.n_encoder_layers
    for layer in body["cross"]:
        for head in layer:
            assert len(head) == target and all(len(row) == source for row in head)
            for row in head:  # each query's weights are a distribution (up to 4-decimal rounding)
                assert sum(row) == pytest.approx(1.0, abs=source * 1e-4)
    assert all(len(row) == source for row in body["encoder_self"][0][0])
    assert all(len(row) == target for row in body["decoder_self"][0][0])
    assert all(round(value, 4) == value for value in body["cross"][0][0][0])


def test_attention_with_a_forced_target_matches_the_translator(client, reference) -> None:
    target = "A man rides a bike."
    response = client.post("/attention", json={"text": SENTENCES[0], "target": target})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = reference.attention(SENTENCES[0], target)
    assert body["target_tokens"] == list(expected.target_tokens)
    assert body["source_tokens"] == list(expected.source_tokens)
    assert body["cross"] == expected.cross.double().round(decimals=4).tolist()


@pytest.mark.slow
def test_translate_returns_alignments_and_samples_on_request(client, reference) -> None:
    response = client.post("/translate", json={"texts": SENTENCES[:2], "alignment": True, "nbest": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = reference.translate(SENTENCES[:2], DecodeConfig(nbest=2), return_scores=True)
    flat = [(SENTENCES[i], text) for i, hyps in enumerate(expected) for text, _ in hyps]
    alignments = reference.align([s for s, _ in flat], [t for _, t in flat])
    assert [h["alignment"] for hyps in body["nbest"] for h in hyps] == alignments
    assert body["alignments"] == [alignments[0], alignments[2]]
    assert "alignments" not in client.post("/translate", json={"text": SENTENCES[0]}).json()
    sample = {"texts": SENTENCES, "sampling_topk": 0, "temperature": 1.5, "nbest": 6, "seed": 3}
    first, again = (client.post("/translate", json=sample).json() for _ in range(2))
    assert first == again and len(first["nbest"][0]) == 6  # 6 samples with the default beam of 4
    assert first["nbest"] == [[{"text": t, "score": pytest.approx(v, abs=1e-4)} for t, v in hyps]
                              for hyps in reference.translate(SENTENCES, DecodeConfig(
                                  sampling_topk=0, temperature=1.5, nbest=6, seed=3), return_scores=True)]
    assert client.post("/translate", json={**sample, "sampling_topp": 0.0}).status_code == 422


def test_explain_walks_one_layer_with_the_attention_maps_numbers(client, reference) -> None:
    target = "A man rides a bike."
    expected = reference.attention(SENTENCES[0], target)
    for kind, key in (("cross", "cross"), ("encoder", "encoder_self"), ("decoder", "decoder_self")):
        response = client.post("/explain", json={"text": SENTENCES[0], "target": target, "kind": kind, "layer": 1})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["target_tokens"] == list(expected.target_tokens)
        assert body["kinds"][kind][0] is None  # one layer at a time: the response stays bounded
        walk = body["kinds"][kind][1]
        for head in range(len(walk["heads"])):
            weights = torch.tensor(walk["heads"][head]["weights"], dtype=torch.float64)
            assert torch.allclose(weights, getattr(expected, key)[1, head].double(), atol=1e-4)
        assert len(body["next_pieces"]) == len(expected.target_tokens)
    response = client.post("/explain", json={"text": SENTENCES[0], "kind": "cross", "layer": 5})
    assert response.status_code == 422 and "layer 5 out of range" in _message(response)
    response = client.post("/explain", json={"text": SENTENCES[0], "kind": "sideways"})
    assert response.status_code == 422
    response = client.post("/explain", json={"text": "spielen " * 10})  # 80 chars: within the limit
    assert response.status_code == 422 and "numbers" in _message(response)  # but a walk over 100 000
    assert client.get("/explain.js").headers["content-type"].startswith("text/javascript")


def test_page_is_self_contained(client) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert 'id="heatmap"' in page and 'id="translate"' in page
    assert "http://" not in page and "https://" not in page, (
        "the page must not load anything from the internet"
    )


def test_openapi_docs(client) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/translate", "/attention", "/health", "/info"} <= set(paths)


# --- refused input ---------------------------------------------------------------------------

BAD_REQUESTS = [
    # (id, path, json body or raw bytes, status, text the message must contain)
    ("malformed-json", "/translate", b'{"text": "Ein Mann', 422, "JSON decode error"),
    ("text-not-string", "/translate", {"text": 5}, 422, "Input should be a valid string"),
    ("texts-not-list", "/translate", {"texts": "Ein Mann."}, 422, "Input should be a valid list"),
    ("text-and-texts", "/translate", {"text": "a", "texts": ["b"]}, 422, "exactly one of 'text'"),
    ("no-text", "/translate", {"beam_size": 4}, 422, "exactly one of 'text'"),
    ("beam-zero", "/translate", {"text": "a", "beam_size": 0}, 422, "greater than or equal to 1"),
    (
        "beam-too-large",
        "/translate",
        {"text": "a", "beam_size": 17},
        422,
        "less than or equal to 16",
    ),
    (
        "nbest-over-beam",
        "/translate",
        {"text": "a", "beam_size": 2, "nbest": 3},
        422,
        "nbest (3) must be <= beam_size (2)",
    ),
    (
        "negative-penalty",
        "/translate",
        {"text": "a", "length_penalty": -1},
        422,
        "greater than or equal to 0",
    ),
    (
        "unknown-field",
        "/translate",
        {"text": "a", "beam": 4},
        422,
        "Extra inputs are not permitted",
    ),
    ("empty-texts", "/translate", {"texts": []}, 422, "'texts' is empty"),
    (
        "too-many-texts",
        "/translate",
        {"texts": ["a"] * 9},
        422,
        "9 texts in one request; the limit is 8",
    ),
    (
        "too-long",
        "/translate",
        {"texts": ["a", "x" * 201]},
        422,
        "text 1 has 201 characters; the limit is 200",
    ),
    (
        "attention-too-long",
        "/attention",
        {"text": "x" * 101},
        422,
        "text has 101 characters; the limit is 100",
    ),
    ("attention-empty", "/attention", {"text": "  "}, 422, "'text' is empty"),
    ("attention-no-text", "/attention", {"target": "a"}, 422, "Field required"),
    ("body-too-large", "/translate", {"text": "x" * 5000}, 413, "the limit is 4096 bytes"),
    # JSON's "\udcff" escape decodes to a lone surrogate: a str, but not text (the tokenizer fails).
    (
        "lone-surrogate",
        "/translate",
        b'{"text": "\\udcff"}',
        422,
        "text is not valid Unicode text: character 0 is a lone surrogate (U+DCFF)",
    ),
    (
        "lone-surrogate-in-texts",
        "/translate",
        b'{"texts": ["Ein Mann.", "ab\\ud800"]}',
        422,
        "texts[1] is not valid Unicode text: character 2 is a lone surrogate (U+D800)",
    ),
    (
        "attention-lone-surrogate",
        "/attention",
        b'{"text": "Ein Mann.", "target": "\\udcff"}',
        422,
        "target is not valid Unicode text",
    ),
    ("surrogate-field-name", "/translate", b'{"text": "a", "\\udcff": 1}', 422, "valid string"),
    ("nan-penalty", "/translate", b'{"text": "a", "length_penalty": NaN}', 422, "finite number"),
    ("infinite-penalty", "/translate", b'{"text": "a", "length_penalty": Infinity}', 422, "finite number"),
]


def _message(response) -> str:
    detail = response.json()["detail"]
    return detail if isinstance(detail, str) else "; ".join(error["msg"] for error in detail)


@pytest.mark.parametrize(
    "path, body, status, message",
    [case[1:] for case in BAD_REQUESTS],
    ids=[case[0] for case in BAD_REQUESTS],
)
def test_bad_request_is_refused_with_a_message(client, path, body, status, message) -> None:
    if isinstance(body, bytes):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert message in _message(response)
    assert_still_serving(client)


def test_chunked_body_without_length_is_limited_too(client) -> None:
    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    response = client.post(
        "/translate", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert "too large" in _message(response)
    assert_still_serving(client)


def test_wrong_method_and_unknown_path(client) -> None:
    assert client.get("/translate").status_code == 405
    assert client.get("/nowhere").status_code == 404
    assert_still_serving(client)


@pytest.mark.parametrize(
    "path, method_name", [("/translate", "translate"), ("/attention", "attention")]
)
def test_model_failure_gives_500_once_then_the_server_recovers(
    client, translator, monkeypatch, path, method_name
) -> None:
    original = getattr(translator, method_name)
    calls = []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated model failure")
        return original(*args, **kwargs)

    monkeypatch.setattr(translator, method_name, fail_once)
    errors_before = client.get("/health").json()["stats"]["errors"]
    response = client.post(path, json={"text": SENTENCES[0]})
    assert response.status_code == 500
    assert (
        _message(response)
        == f"{method_name.replace('translate', 'translation')} failed: RuntimeError: simulated model failure"
    )
    assert client.get("/health").json()["stats"]["errors"] == errors_before + 1
    again = client.post(path, json={"text": SENTENCES[0]})
    assert again.status_code == 200, again.text
    assert len(calls) == 2
    assert_still_serving(client)


# --- micro-batching --------------------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_requests_are_answered_correctly_and_merged(base_url, reference) -> None:
    texts = [SENTENCES[i % len(SENTENCES)] + " " * (i // len(SENTENCES)) for i in range(32)]
    expected = {text: reference.translate([text])[0] for text in set(texts)}

    async def fire() -> list:
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as session:
            before = (await session.get("/health")).json()["stats"]
            responses = await asyncio.gather(
                *(session.post("/translate", json={"text": t}) for t in texts)
            )
            after = (await session.get("/health")).json()["stats"]
            return before, responses, after

    before, responses, after = asyncio.run(fire())
    for text, response in zip(texts, responses):
        assert response.status_code == 200, response.text
        assert response.json()["translations"] == [expected[text]]
    requests = after["requests"] - before["requests"]
    calls = after["model_calls"] - before["model_calls"]
    assert requests == 32
    assert calls < requests / 2, (
        f"{calls} model calls for {requests} requests: batching did not merge them"
    )


class _RecordingTranslator:
    """Stands in for `Translator` to check the worker's grouping exactly: records each call."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[tuple[list[str], int, int, float]] = []
        self.delay = delay

    def translate(self, sentences, decode, *, return_scores):
        assert return_scores
        time.sleep(self.delay)
        self.calls.append((list(sentences), decode.beam_size, decode.nbest, decode.length_penalty))
        return [[(f"{s}/{decode.beam_size}/{k}", -float(k)) for k in range(decode.nbest)] for s in sentences]


def _submit_all(worker: BatchingWorker, jobs: list[tuple[list[str], DecodeConfig]]) -> list:
    """Submit while the worker is blocked on a first slow call, so all jobs are queued together."""
    gate = threading.Event()
    worker.start()
    blocker = worker.submit_call(gate.wait)
    futures = [worker.submit_translate(sentences, settings) for sentences, settings in jobs]
    gate.set()
    blocker.result(10)
    results = [future.result(10) for future in futures]
    worker.stop()
    return results


def test_worker_groups_by_settings_and_never_splits_a_request() -> None:
    translator = _RecordingTranslator()
    worker = BatchingWorker(translator, max_batch_sentences=4, max_wait_ms=50)
    beam4, beam1 = DecodeConfig(beam_size=4), DecodeConfig(beam_size=1)
    jobs = [
        (["a", "b"], beam4),
        (["c"], beam1),
        (["d"], beam4),
        (["e", "f"], beam4),
        (["g"], beam1),
    ]
    results = _submit_all(worker, jobs)
    assert [[hyps[0][0] for hyps in result] for result in results] == [
        ["a/4/0", "b/4/0"],
        ["c/1/0"],
        ["d/4/0"],
        ["e/4/0", "f/4/0"],
        ["g/1/0"],
    ]
    # First batch: a b c d (4 sentences; "e f" would overflow it), split by settings;
    # second batch: e f g.
    assert [(sentences, beam) for sentences, beam, _, _ in translator.calls] == [
        (["a", "b", "d"], 4),
        (["c"], 1),
        (["e", "f"], 4),
        (["g"], 1),
    ]
    stats = worker.snapshot()
    assert {key: stats[key] for key in ("requests", "sentences", "model_calls", "errors")} == {
        "requests": 5,
        "sentences": 7,
        "model_calls": 5,  # 4 + blocker
        "errors": 0,
    }
    assert (stats["queued"], stats["cancelled"], stats["retried_alone"]) == (0, 0, 0)


def test_worker_without_batching_runs_one_call_per_request() -> None:
    translator = _RecordingTranslator()
    worker = BatchingWorker(translator, max_batch_sentences=32, max_wait_ms=50, batching=False)
    settings = DecodeConfig(beam_size=2, nbest=2)
    results = _submit_all(worker, [([s], settings) for s in "abc"])
    assert results == [[[(f"{s}/2/0", 0.0), (f"{s}/2/1", -1.0)]] for s in "abc"]
    assert [sentences for sentences, *_ in translator.calls] == [["a"], ["b"], ["c"]]


def test_worker_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_batch_sentences must be >= 1, got 0"):
        BatchingWorker(_RecordingTranslator(), max_batch_sentences=0)
    with pytest.raises(ValueError, match="max_wait_ms must be >= 0"):
        BatchingWorker(_RecordingTranslator(), max_wait_ms=-1)
    with pytest.raises(ValueError, match="max_chars must be a positive int, got 0"):
        ServerLimits(max_chars=0)


def test_translate_splits_sentences_on_request(client, reference) -> None:
    paragraph = f"{SENTENCES[0]} {SENTENCES[1]}"
    body = {"texts": [paragraph, " "], "beam_size": 2, "alignment": True, "split_sentences": True}
    response = client.post("/translate", json=body)
    assert response.status_code == 200, response.text
    alone = reference.translate(SENTENCES[:2], DecodeConfig(beam_size=2))
    assert response.json()["translations"] == [" ".join(alone), ""]
    first = response.json()["alignments"][0].split()
    assert first and all(int(pair.split("-")[0]) < len(paragraph.split()) for pair in first)
    only_blank = client.post("/translate", json={"texts": [" "], "split_sentences": True})
    assert only_blank.status_code == 200 and only_blank.json()["translations"] == [""]
    many = client.post("/translate", json={"text": "Ein Hund läuft. " * 9, "split_sentences": True})
    assert many.status_code == 422 and "the texts hold 9 sentences; the limit is 8" in _message(many)
