"""HTTP API and web page: `aiayn serve --model DIR`.

Endpoints (OpenAPI docs at `/docs`):
    POST /translate   {"text": str} or {"texts": [str]}, optional beam_size, nbest, length_penalty
    POST /attention   {"text": str, "target": str | null} -> tokens and attention weights
    POST /explain     one layer of the step-by-step walk of a sentence pair (`aiayn explain`)
    GET  /health      liveness plus request / model-call / queue counters
    GET  /info        model config, languages, vocabulary and parameter counts, limits, counters
    GET  /            the single static page (src/aiayn/static/index.html)

Modules, each importing only those above it:
    limits.py    `ServerLimits`, the micro-batching defaults, /attention's response size (no FastAPI)
    worker.py    `BatchingWorker`: the one thread that owns the model and merges requests
    schemas.py   request and response bodies (pydantic)
    http.py      plumbing: body-size middleware, error handlers, uvicorn's protocol with a read
                 timeout, `background_server` for tests and benchmarks
    routes.py    the routes in groups, and `Gate`: limits and worker outcomes as HTTP statuses
    app.py       `create_app` (a list of those steps) and `serve`

Admission control (`ServerLimits`): at most `max_queue` requests wait for the model (more get 503
with Retry-After); a request not answered within `request_timeout_s` gets 503 if it never started
(and is dropped) or 504 if it was being computed; a request whose client hangs up is dropped
before it is computed; one request that fails a batched model call fails alone. uvicorn caps open
connections (`max_connections`, 503 beyond), closes idle keep-alive connections (`keep_alive_s`)
and connections whose request does not arrive in full within `read_timeout_s`.

FastAPI and uvicorn are the optional extra `aiayn[serve]` and are imported lazily: importing
`limits` or `worker` does not need them.
"""
