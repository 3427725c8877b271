"""Property-based requests to every route, generated from the server's own OpenAPI schema
(schemathesis, valid and schema-breaking bodies): no 5xx, every 4xx a JSON detail naming the
field or saying why, no traceback in the log. benchmarks/fuzz_server.py sends thousands."""

import logging

import pytest

pytest.importorskip("httpx", reason="the server tests need httpx")

from aiayn.decoding.translator import Translator  # noqa: E402
from aiayn.serve.app import create_app  # noqa: E402
from aiayn.serve.http import background_server  # noqa: E402
from aiayn.serve.limits import ServerLimits  # noqa: E402

EXAMPLES = 120  # per mode


@pytest.mark.slow(seconds=25)
def test_generated_requests_to_every_route_get_no_5xx_and_a_named_field(tiny_model_dir, caplog):
    # Imported here, not at collection: schemathesis and hypothesis take seconds to import, in
    # every pytest worker, and only this test uses them.
    pytest.importorskip("schemathesis", reason="the fuzz test needs schemathesis (the dev extra)")
    from benchmarks.fuzz_server import MODES, fuzz

    # Small requests and a generous deadline: an untrained model decodes every beam to the longest
    # output allowed, and a slow machine must not turn that into a 504.
    limits = ServerLimits(max_texts=4, max_chars=80, max_attention_chars=80, request_timeout_s=600)
    app = create_app(Translator.load(tiny_model_dir), limits=limits)
    routes = {f"{method.upper()} {path}" for path, item in app.openapi()["paths"].items() for method in item}
    with caplog.at_level(logging.ERROR), background_server(app) as url:
        result = fuzz(url, app.openapi(), EXAMPLES, seed=0)
    assert result["problems"] == []
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    assert result["requests"] >= EXAMPLES * len(MODES) * 0.8  # hypothesis may stop early on small spaces
    sent = {key.rsplit(" ", 1)[0] for key in result["statuses"]}
    assert sent == routes  # every route was tried
    statuses = {int(key.rsplit(" ", 1)[1]) for key in result["statuses"]}
    assert 200 in statuses and 422 in statuses and max(statuses) < 500
