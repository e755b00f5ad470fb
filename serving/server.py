"""`adfilter serve`: the API under uvicorn, with a clean shutdown on SIGTERM / Ctrl-C.

On a signal uvicorn stops accepting connections and lets in-flight requests finish; then the
app's lifespan stops the model poller, finishes the deep worker's queue and flushes the
prediction store, so every answered post has its row.
"""

from __future__ import annotations

import logging
import os

from adfilter.config import Params

log = logging.getLogger(__name__)


def serve(
    params: Params,
    host: str | None = None,
    port: int | None = None,
    bundle: str | None = None,
    cascade: bool | None = None,
    store_url: str | None = None,
    poll_seconds: float | None = None,
    tracking_uri: str | None = None,
) -> None:
    """Run the API until a signal stops it (host/port/bundle/... default to `params.serve`)."""
    # Never reach a model hub at run time; set before transformers is imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import uvicorn

    from serving.app import create_app

    app = create_app(params, bundle, cascade=cascade, store_url=store_url,
                     poll_seconds=poll_seconds, tracking_uri=tracking_uri)
    host = host or params.serve.host
    port = params.serve.port if port is None else port
    log.info("adfilter serve on http://%s:%d (bundle %s, cascade %s)", host, port,
             bundle or params.serve.bundle,
             params.serve.cascade if cascade is None else cascade)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=os.environ.get("ADFILTER_LOG_LEVEL", "info").lower(),
        access_log=False,          # per-request figures are in /metrics and the store
        timeout_keep_alive=30,
        server_header=False,
    )
    uvicorn.Server(config).run()
