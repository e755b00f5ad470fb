"""The online path: `adfilter serve` (see docker/README.md).

    app.py       FastAPI routes, request parsing and the bad-input answers
    cascade.py   who decides a post: the fastText gate or the deep model
    gate.py      the fastText gate from the bundle (gate.bin + gate.json)
    bundle.py    a model bundle from a folder or the MLflow registry; the TorchScript runtime
    batcher.py   micro-batching of featurize + forward on one worker thread
    manager.py   the current bundle and hot reload
    store.py     the prediction and feedback store (SQLAlchemy) and its readers
    metrics.py   Prometheus metrics
    server.py    uvicorn, with a clean shutdown
    bench.py     `make bench`

Imports `adfilter` only; the model itself is TorchScript, so no training code is needed.
"""
