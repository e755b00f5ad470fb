"""Which bundle answers requests, and hot reload of a new one without dropping a request.

A load (at start, on `POST /admin/reload`, or when polling sees the registry alias move or a
local bundle folder change) runs on a background thread: fetch, load, warm up through the
deep-model worker, then one assignment swaps `current`. Requests take `current` once when
they start and keep that bundle to the end, so in-flight requests finish on the old model
and the old one is freed when the last of them is done. A load that fails leaves the old
model serving; the failure is kept for `GET /readyz` and counted in
`adfilter_model_reloads_total{result="failure"}`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from serving.bundle import Bundle, current_revision, fetch, parse_source

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class ModelManager:
    def __init__(
        self,
        source: str,
        tracking_uri: str,
        cache_dir: str,
        device: str = "auto",
        default_threshold: float = 0.85,
        poll_seconds: float = 0.0,
        optimize: bool = False,
        gate_thresholds: tuple[float | None, float | None] = (None, None),
        warmup: Callable[[Bundle], None] | None = None,
        on_swap: Callable[[Bundle], None] | None = None,
        on_result: Callable[[str], None] | None = None,
    ) -> None:
        self.source = parse_source(source)
        self.tracking_uri = tracking_uri
        self.cache_dir = cache_dir
        self.device_setting = device
        self.default_threshold = default_threshold
        self.poll_seconds = poll_seconds
        self.optimize = optimize
        self.gate_thresholds = gate_thresholds
        self.warmup = warmup
        self.on_swap = on_swap
        self.on_result = on_result
        self._current: Bundle | None = None
        self._load_lock = threading.Lock()
        self._loading = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_poll_error: str | None = None
        self.reloads = 0

    # ------------------------------------------------------------------ state

    @property
    def current(self) -> Bundle | None:
        return self._current

    @property
    def loading(self) -> bool:
        return self._loading.is_set()

    def status(self) -> dict[str, Any]:
        bundle = self._current
        return {
            "ready": bundle is not None,
            "loading": self.loading,
            "source": self.source.spec,
            "model": bundle.info() if bundle is not None else None,
            "last_reload_error": self.last_error,
            "last_reload_error_at": self.last_error_at,
            "last_poll_error": self.last_poll_error,
            "reloads": self.reloads,
        }

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Load the configured source in the background, and poll it if asked to."""
        self.reload()
        if self.poll_seconds > 0:
            t = threading.Thread(target=self._poll, name="model-poll", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        self._threads = []

    def reload(self, source: str | None = None, force: bool = True) -> bool:
        """Start a background load; False when one is already running."""
        if not self._load_lock.acquire(blocking=False):
            return False
        self._loading.set()
        t = threading.Thread(target=self._load_locked, args=(source, force), name="model-load",
                             daemon=True)
        t.start()
        self._threads = [x for x in self._threads if x.is_alive()] + [t]
        return True

    def wait_idle(self, timeout: float = 300.0) -> bool:
        """Block until no load is running (for tests and the startup of `serve`)."""
        deadline = time.monotonic() + timeout
        while self.loading and time.monotonic() < deadline:
            time.sleep(0.02)
        return not self.loading

    # ------------------------------------------------------------------ loading

    def load_now(self, source: str | None = None, force: bool = True) -> Bundle | None:
        """Load synchronously on the calling thread (raises on failure)."""
        with self._load_lock:
            self._loading.set()
            try:
                return self._load(source, force)
            finally:
                self._loading.clear()

    def _load_locked(self, source: str | None, force: bool) -> None:
        # A background load has no caller to raise to: `_load` has already logged the failure,
        # counted it and put it in `last_error` (shown by /readyz), and the old model serves on.
        try:
            with contextlib.suppress(Exception):
                self._load(source, force)
        finally:
            self._loading.clear()
            self._load_lock.release()

    def _load(self, source_spec: str | None, force: bool) -> Bundle | None:
        start = time.perf_counter()
        try:
            source = parse_source(source_spec) if source_spec else self.source
            path, version, revision = fetch(source, self.tracking_uri, self.cache_dir)
            current = self._current
            if (not force and current is not None and current.revision == revision
                    and current.source == source.spec):
                self._result("unchanged")
                return current
            bundle = self._load_bundle(path, version, revision, source.spec)
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.last_error_at = time.time()
            self._result("failure")
            what = "keeping model " + self._current.version if self._current else "no model loaded"
            log.error("model load from %s failed (%s): %s", source_spec or self.source.spec, what,
                      self.last_error)
            raise
        previous = self._current
        self._current = bundle  # the swap: one reference assignment
        if source_spec:
            self.source = source
        self.reloads += 1
        self.last_error = None
        self.last_error_at = None
        self._result("success")
        if self.on_swap is not None:
            self.on_swap(bundle)
        log.info("serving model %s from %s (was %s; loaded in %.1f s)", bundle.version,
                 bundle.source, previous.version if previous else "none",
                 time.perf_counter() - start)
        return bundle

    def _load_bundle(self, path: Any, version: str, revision: str, source: str) -> Bundle:
        device = resolve_device(self.device_setting)
        try:
            bundle = Bundle.load(path, version, revision, source, device, self.default_threshold,
                                 self.optimize, self.gate_thresholds)
            if self.warmup is not None:
                self.warmup(bundle)
            return bundle
        except Exception as exc:
            if self.device_setting != "auto" or device == "cpu":
                raise
            # A traced graph may carry CPU-only constants; auto falls back to the CPU.
            log.warning("model %s does not run on %s (%s); loading it on the CPU", path, device, exc)
            bundle = Bundle.load(path, version, revision, source, "cpu", self.default_threshold,
                                 self.optimize, self.gate_thresholds)
            if self.warmup is not None:
                self.warmup(bundle)
            return bundle

    def _result(self, result: str) -> None:
        if self.on_result is not None:
            self.on_result(result)

    def _poll(self) -> None:
        attempted: str | None = None
        while not self._stop.wait(self.poll_seconds):
            current = self._current
            try:
                revision = current_revision(self.source, self.tracking_uri)
                self.last_poll_error = None
            except Exception as exc:  # the registry may be down for a while; keep polling
                self.last_poll_error = f"{type(exc).__name__}: {exc}"
                log.warning("polling %s failed: %s", self.source.spec, exc)
                continue
            if current is not None and revision == current.revision:
                continue
            if revision == attempted:
                continue  # that revision failed to load; wait for the next one
            log.info("%s changed (revision %s): reloading", self.source.spec, revision)
            if self.reload(force=False):
                attempted = revision
