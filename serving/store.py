"""The prediction and feedback store: every decision and every moderator label, in SQL.

SQLAlchemy, so the same code writes a SQLite file on one machine and PostgreSQL in production
(`serve.store.url`). Requests never wait for the database: rows go into a bounded queue and
one writer thread inserts them in batches; `close()` drains the queue, so a clean shutdown
loses no row (prediction rows == answered posts).

Tables (times are UTC):

    predictions  id (uuid hex, primary key), request_id, post_id, created_at, model_version,
                 stage (gate | deep), decision (allow | block), score, p_ad, p_gate,
                 sensitivity, has_text, has_image, text_chars, latency_ms,
                 features_kind (model | sampled | none), features (blob, see below)
    feedback     id, request_id, post_id, created_at, label (1 = ad), moderator, note

Feedback links to predictions by `request_id` (and `post_id` within a batch request).

`features` is what the drift and SHAP job needs, compactly: `np.savez_compressed` of the
post's handcrafted blocks as float16 (`tfidf`, `sent_emb`, `sift_bow`, `hsv`, `qr`), its
`token_ids` (int32), `has_text` / `has_image`, and `image_small` (uint8) when
`serve.store.store_image_small` is on. `features_kind` says where they came from: `model`
for posts the deep model scored (exactly what it saw), `sampled` for the share
(`serve.store.gate_feature_fraction`) of gate-decided posts featurized in the background so
that the drift reference covers all traffic, `none` otherwise. Read with `read_predictions`,
`decode_features` and `stack_features`.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
import sqlalchemy as sa

log = logging.getLogger(__name__)

FLOAT_BLOCKS: Final = ("tfidf", "sent_emb", "sift_bow", "hsv", "qr")
FEATURE_KINDS: Final = ("model", "sampled", "none")

metadata = sa.MetaData()

predictions = sa.Table(
    "predictions",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("request_id", sa.String(64), nullable=False, index=True),
    sa.Column("post_id", sa.String(200), nullable=False),
    sa.Column("created_at", sa.DateTime(), nullable=False, index=True),
    sa.Column("model_version", sa.String(200), nullable=False),
    sa.Column("stage", sa.String(8), nullable=False),
    sa.Column("decision", sa.String(8), nullable=False),
    sa.Column("score", sa.Float(), nullable=False),
    sa.Column("p_ad", sa.Float(), nullable=True),
    sa.Column("p_gate", sa.Float(), nullable=True),
    sa.Column("sensitivity", sa.Float(), nullable=True),
    sa.Column("has_text", sa.Boolean(), nullable=False),
    sa.Column("has_image", sa.Boolean(), nullable=False),
    sa.Column("text_chars", sa.Integer(), nullable=False),
    sa.Column("latency_ms", sa.Float(), nullable=False),
    sa.Column("features_kind", sa.String(8), nullable=False),
    sa.Column("features", sa.LargeBinary(), nullable=True),
)

feedback = sa.Table(
    "feedback",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.String(64), nullable=False, index=True),
    sa.Column("post_id", sa.String(200), nullable=True),
    sa.Column("created_at", sa.DateTime(), nullable=False),
    sa.Column("label", sa.Integer(), nullable=False),
    sa.Column("moderator", sa.String(200), nullable=True),
    sa.Column("note", sa.Text(), nullable=True),
)

_STOP = object()


class StoreError(RuntimeError):
    """The store cannot be opened (bad URL, unreachable database, missing driver)."""


def utcnow() -> datetime:
    """Naive UTC: SQLite has no time zones, so every time in the store is UTC without one."""
    return datetime.now(UTC).replace(tzinfo=None)


def new_id() -> str:
    return uuid.uuid4().hex


# --------------------------------------------------------------------------- engine


def make_engine(url: str) -> sa.Engine:
    """An engine for `url`, creating a SQLite file's folder; WAL lets readers (the monitoring
    job, feedback look-ups) read while the writer writes."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise StoreError(
            f"serve.store.url '{url}' is not an SQLAlchemy URL (sqlite:///path.db, "
            f"postgresql://user:pass@host/db)"
        ) from exc
    kwargs: dict[str, Any] = {"future": True}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = sa.create_engine(parsed, **kwargs)
    except Exception as exc:  # missing DB driver, bad options
        raise StoreError(f"serve.store.url '{parsed.render_as_string()}': {exc}") from exc
    if parsed.get_backend_name() == "sqlite":

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

    return engine


def create_tables(engine: sa.Engine) -> None:
    try:
        metadata.create_all(engine)
    except sa.exc.SQLAlchemyError as exc:
        raise StoreError(f"cannot create the store's tables at {engine.url!r}: {exc}") from exc


# --------------------------------------------------------------------------- feature blobs


def encode_features(arrays: Mapping[str, np.ndarray], include_image: bool = False) -> bytes:
    """One post's feature arrays (a row of FeaturePipeline's output) as a compressed blob."""
    out: dict[str, np.ndarray] = {}
    for name in FLOAT_BLOCKS:
        if name in arrays:
            out[name] = np.asarray(arrays[name], dtype=np.float16).reshape(-1)
    if "token_ids" in arrays:
        out["token_ids"] = np.asarray(arrays["token_ids"], dtype=np.int32).reshape(-1)
    for name in ("has_text", "has_image"):
        if name in arrays:
            out[name] = np.asarray(arrays[name], dtype=bool).reshape(())
    if include_image and "image_small" in arrays:
        out["image_small"] = np.asarray(arrays["image_small"], dtype=np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **out)
    return buf.getvalue()


def decode_features(blob: bytes, float32: bool = True) -> dict[str, np.ndarray]:
    """The arrays `encode_features` stored; handcrafted blocks as float32 unless `float32=False`."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        out = {k: npz[k] for k in npz.files}
    if float32:
        for name in FLOAT_BLOCKS:
            if name in out:
                out[name] = out[name].astype(np.float32)
    return out


def stack_features(blobs: Iterable[bytes | None]) -> dict[str, np.ndarray]:
    """Decoded blobs stacked row by row (rows without features are skipped): each handcrafted
    block (N, width), `token_ids` (N, L), the flags (N,), and `row` (N,), the index of each
    stacked row in `blobs`, to line them up with the DataFrame."""
    rows: list[int] = []
    decoded: list[dict[str, np.ndarray]] = []
    for i, blob in enumerate(blobs):
        if blob is None or (isinstance(blob, float) and np.isnan(blob)):
            continue
        rows.append(i)
        decoded.append(decode_features(bytes(blob)))
    if not decoded:
        return {"row": np.zeros(0, dtype=np.int64)}
    keys = [k for k in decoded[0] if all(k in d for d in decoded)]
    out = {k: np.stack([d[k] for d in decoded]) for k in keys}
    out["row"] = np.asarray(rows, dtype=np.int64)
    return out


# --------------------------------------------------------------------------- readers


def read_predictions(
    url: str,
    since: datetime | str | None = None,
    limit: int | None = None,
) -> pd.DataFrame:
    """The predictions table as a DataFrame, oldest first.

    `since` keeps rows created at or after it (UTC; a datetime or an ISO string); `limit`
    keeps the most recent `limit` of those. The `features` column holds the raw blobs: decode
    one with `decode_features`, all of them with `stack_features(df["features"])`.
    """
    engine = make_engine(url)
    try:
        query = sa.select(predictions)
        if since is not None:
            if isinstance(since, str):
                since = datetime.fromisoformat(since)
            if since.tzinfo is not None:
                since = since.astimezone(UTC).replace(tzinfo=None)
            query = query.where(predictions.c.created_at >= since)
        if limit is not None:
            query = query.order_by(predictions.c.created_at.desc(), predictions.c.id.desc())
            query = query.limit(int(limit))
        else:
            query = query.order_by(predictions.c.created_at, predictions.c.id)
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(predictions.name):
                return pd.DataFrame(columns=[c.name for c in predictions.columns])
            df = pd.DataFrame(conn.execute(query).mappings().all(),
                              columns=[c.name for c in predictions.columns])
    finally:
        engine.dispose()
    if limit is not None:
        df = df.iloc[::-1].reset_index(drop=True)
    return df


def read_feedback(url: str, since: datetime | str | None = None) -> pd.DataFrame:
    """The feedback table, oldest first (join it to predictions on request_id and post_id)."""
    engine = make_engine(url)
    try:
        query = sa.select(feedback).order_by(feedback.c.created_at, feedback.c.id)
        if since is not None:
            if isinstance(since, str):
                since = datetime.fromisoformat(since)
            if since.tzinfo is not None:
                since = since.astimezone(UTC).replace(tzinfo=None)
            query = query.where(feedback.c.created_at >= since)
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table(feedback.name):
                return pd.DataFrame(columns=[c.name for c in feedback.columns])
            return pd.DataFrame(conn.execute(query).mappings().all(),
                                columns=[c.name for c in feedback.columns])
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- the writer


class PredictionStore:
    """Queues rows and writes them on one background thread; `close()` flushes everything."""

    def __init__(
        self,
        url: str,
        queue_size: int = 20000,
        write_batch: int = 256,
        flush_interval_s: float = 0.2,
        include_image: bool = False,
    ) -> None:
        self.url = url
        self.include_image = include_image
        self.engine = make_engine(url)
        self.write_batch = max(1, write_batch)
        self.flush_interval_s = max(0.001, flush_interval_s)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, queue_size))
        self._thread: threading.Thread | None = None
        self.written = {"predictions": 0, "feedback": 0}
        self.failed = 0
        self.on_write: Any = None  # callable(table, rows, seconds), for metrics

    def start(self) -> None:
        create_tables(self.engine)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
            self._thread.start()

    def close(self, timeout: float = 120.0) -> None:
        """Write every queued row, then stop the writer."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("store writer still busy after %.0f s; %d rows unwritten", timeout,
                          self._queue.qsize())
            self._thread = None
        self.engine.dispose()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def has_room(self, rows: int) -> bool:
        return self._queue.qsize() + rows <= self._queue.maxsize

    def put_prediction(self, row: dict[str, Any]) -> None:
        """Queue a prediction row; `features` may be the post's arrays (encoded by the writer)."""
        self._put(("predictions", row))

    def put_feedback(self, row: dict[str, Any]) -> None:
        self._put(("feedback", row))

    def _put(self, item: tuple[str, dict[str, Any]]) -> None:
        # `has_room` is checked before a request is processed; a short wait covers the race
        # between that check and this put, so an answered post is never dropped.
        self._queue.put(item, timeout=30.0)

    def find_request(self, request_id: str) -> list[str]:
        """Post ids of a stored request (written rows only)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(predictions.c.post_id).where(predictions.c.request_id == request_id)
            ).all()
        return [r[0] for r in rows]

    def count(self, table: str = "predictions") -> int:
        tbl = predictions if table == "predictions" else feedback
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(tbl)).scalar_one())

    # ------------------------------------------------------------------ thread

    def _run(self) -> None:
        stopping = False
        while not stopping:
            items: list[tuple[str, dict[str, Any]]] = []
            deadline = 0.0
            while len(items) < self.write_batch:
                try:
                    if items:
                        item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    else:
                        item = self._queue.get()
                        deadline = time.monotonic() + self.flush_interval_s
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    # Everything put before the stop marker is already in the queue.
                    while True:
                        try:
                            rest = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if rest is not _STOP:
                            items.append(rest)
                    break
                items.append(item)
            if items:
                self._write(items)

    def _write(self, items: Sequence[tuple[str, dict[str, Any]]]) -> None:
        by_table: dict[str, list[dict[str, Any]]] = {}
        for table, row in items:
            if isinstance(row.get("features"), dict):
                # Encoded here, on the writer thread, to keep it off the request path.
                row["features"] = encode_features(row["features"], self.include_image)
            by_table.setdefault(table, []).append(row)
        for attempt in range(5):
            start = time.perf_counter()
            try:
                with self.engine.begin() as conn:
                    for table, rows in by_table.items():
                        conn.execute(sa.insert(predictions if table == "predictions" else feedback), rows)
            except sa.exc.SQLAlchemyError as exc:
                log.warning("store write of %d rows failed (attempt %d of 5): %s",
                            len(items), attempt + 1, exc)
                time.sleep(0.2 * 2**attempt)
                continue
            for table, rows in by_table.items():
                self.written[table] += len(rows)
                if self.on_write is not None:
                    self.on_write(table, len(rows), time.perf_counter() - start)
            return
        self.failed += len(items)
        log.error("store: %d rows could not be written to %s and are lost",
                  len(items), self.engine.url.render_as_string())
