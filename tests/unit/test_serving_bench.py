"""The benchmark's own logic: the load mix, the accuracy figures and the target comparison."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from serving.bench import _accuracy, build_mix, compare, render_table


def _posts(n: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < 0.3).astype(int)
    image = np.where(rng.random(n) < 0.4, "aW1n", "")
    return pd.DataFrame({"id": [f"p{i}" for i in range(n)], "text": [f"text {i}" for i in range(n)],
                         "label": label, "image_b64": image})


def test_mix_follows_the_shares() -> None:
    posts = _posts()
    bodies, counts = build_mix(posts, 4000, clean_share=0.9, image_share=0.3, seed=1)
    assert len(bodies) == 4000 == sum(counts.values())
    clean = (counts["clean_text"] + counts["clean_image"]) / 4000
    image = (counts["clean_image"] + counts["ad_image"]) / 4000
    assert clean == pytest.approx(0.9, abs=0.02) and image == pytest.approx(0.3, abs=0.02)
    by_id = posts.set_index("id")
    for body in bodies[:200]:
        row = by_id.loc[body["id"]]
        assert ("image" in body) == (row["image_b64"] != "")
    assert build_mix(posts, 50, 0.9, 0.3, seed=1)[0] == bodies[:50]  # seeded


def test_mix_swaps_modality_when_a_pool_is_empty() -> None:
    posts = _posts()
    posts.loc[posts["label"] == 1, "image_b64"] = ""  # no ad has an image
    _, counts = build_mix(posts, 500, 0.5, 0.5, seed=0)
    assert counts["ad_image"] == 0 and counts["ad_text"] > 0


def test_accuracy_and_comparison() -> None:
    posts = pd.DataFrame({"label": [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]})
    deep = [{"decision": d, "stage": "deep"} for d in
            ["block", "block", "block", "allow", "allow", "allow", "allow", "allow", "block", "allow"]]
    cascade = [dict(r) for r in deep]
    cascade[2] = {"decision": "allow", "stage": "gate"}   # a lost ad
    cascade[5] = {"decision": "block", "stage": "gate"}   # an added false kill
    acc_d, blocked_d = _accuracy(posts, deep)
    acc_c, blocked_c = _accuracy(posts, cascade)
    assert acc_d["recall"] == 0.75 and acc_d["false_kills"] == 1
    assert acc_d["false_kill_rate"] == pytest.approx(1 / 6)
    assert acc_c["recall"] == 0.5 and acc_c["test_gate_share"] == 0.2
    report = {
        "cascade": {**acc_c, "throughput_rps": 120.0, "p99_ms": 80.0, "p50_ms": 5.0,
                    "stage_share": {"gate": 0.8, "deep": 0.2}, "server": {}},
        "deep_only": {**acc_d, "throughput_rps": 20.0, "p99_ms": 400.0, "p50_ms": 300.0,
                      "stage_share": {"gate": 0.0, "deep": 1.0}, "server": {}},
        "machine": {"cpu_count": 2, "load_average_before": [1.0, 1.0, 1.0]},
        "load": {"requests": 10, "concurrency": 8}, "bundle": {"model_version": "v"},
    }
    cmp = compare(report, posts, {"cascade": blocked_c, "deep_only": blocked_d})
    assert cmp["speedup"] == 6.0 and cmp["recall_loss_points"] == pytest.approx(25.0)
    assert cmp["added_false_kills"] == 1
    assert cmp["met"] == {"speedup": True, "recall_loss": False, "no_added_false_kills": False,
                          "cascade_p99": True}
    assert len(cmp["notes"]) == 2
    # With open-loop phases, the highest rate under the p99 target is reported and checked.
    from serving.bench import slo_rate

    tries = [{"rate_rps": 10.0, "p99_ms": 60.0, "p50_ms": 9.0, "errors": 0},
             {"rate_rps": 20.0, "p99_ms": 95.0, "p50_ms": 12.0, "errors": 1},
             {"rate_rps": 30.0, "p99_ms": 140.0, "p50_ms": 20.0, "errors": 0}]
    assert slo_rate(tries, 100.0) == 10.0 and slo_rate(tries[2:], 100.0) is None
    report["cascade"]["at_rates"], report["cascade"]["slo_rps"] = tries[2:], None
    with_rate = compare(report, posts, {"cascade": blocked_c, "deep_only": blocked_d})
    assert with_rate["met"]["cascade_p99_at_a_rate"] is False
    assert any("140.0 ms at 30/s" in n for n in with_rate["notes"])
    report["cascade"]["at_rates"], report["cascade"]["slo_rps"] = tries, 10.0
    assert compare(report, posts, {"cascade": blocked_c, "deep_only": blocked_d})["met"]["cascade_p99_at_a_rate"]
    assert "highest rate p99<100ms" in render_table({**report, "comparison": cmp})
    report["comparison"] = cmp
    table = render_table(report)
    assert "throughput_rps" in table and "recall_loss=NO" in table


def test_arrival_times_are_a_seeded_poisson_process() -> None:
    from serving.bench import BenchError, arrival_times

    t = arrival_times(4000, rate=25.0, seed=3)
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    assert len(t) / t[-1] == pytest.approx(25.0, rel=0.06)
    gaps = np.diff(t)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.06)  # exponential: CV 1
    assert np.array_equal(t, arrival_times(4000, 25.0, 3))
    with pytest.raises(BenchError, match="rate"):
        arrival_times(10, 0.0, 0)


def test_open_loop_driver_keeps_its_schedule_against_a_real_server() -> None:
    """Against a loopback HTTP server that answers after 50 ms, the open loop sends on schedule
    (it does not wait for answers) and charges every request its latency from the schedule."""
    import asyncio
    import json
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from serving.bench import _drive_open

    class Slow(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(0.05)
            body = json.dumps({"stage": "gate"}).encode()
            code = 400 if self.path != "/v1/moderate" else 200
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        out = asyncio.run(_drive_open(url, [{"text": "x"}] * 60, rate=40.0, seed=0, max_seconds=30))
    finally:
        server.shutdown()
    assert out["requests"] == out["ok"] == 60 and out["errors"] == 0
    # 60 requests at 40/s take about 1.5 s, not the 3 s a one-at-a-time loop would need.
    assert out["elapsed_s"] < 2.8
    assert 50.0 <= out["p50_ms"] < 500.0 and out["stage_share"]["gate"] == 1.0
