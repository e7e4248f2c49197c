"""Benchmarks of the Python client against a real sidecar it starts itself (release build):

1. `is_enabled` on a warm cache, beside a plain dict lookup measured in the same run (the floor
   any in-process read can reach), in ns per call.
2. Change propagation: a webhook is applied through one client; the time until a second client's
   cache (fed by WatchFlags) shows the new value, p50/p99 over many changes.

    cargo build --release && .venv/bin/python clients/python/bench.py
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))
import os  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
os.environ.setdefault("CORESDK_BIN", str(ROOT / "target" / "release" / "coresdk"))

from conftest import Sidecar, client_for, sign, stripe_event  # noqa: E402
from coresdk.v1 import webhook_pb2  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        process = Sidecar(Path(tmp))
        process.start()
        reader = client_for(process)
        writer = client_for(process)
        body = stripe_event("invoice.paid", "cus_acme_001")
        writer.handle_stripe_webhook(body, sign(body))
        time.sleep(0.2)

        n = 1_000_000
        plain = {("acme-corp", "pro_features"): True}
        floor = min(timeit.repeat(lambda: plain.get(("acme-corp", "pro_features")), number=n, repeat=5)) / n * 1e9
        cost = min(timeit.repeat(lambda: reader.is_enabled("acme-corp", "pro_features"), number=n, repeat=5)) / n * 1e9
        assert reader.is_enabled("acme-corp", "pro_features")
        print(f"is_enabled (warm cache): {cost:,.0f} ns/call; dict lookup floor {floor:,.0f} ns; ratio {cost / floor:.1f}x")

        latencies = []
        for i in range(300):
            event_type = "invoice.payment_failed" if i % 2 == 0 else "invoice.paid"
            expected = event_type == "invoice.paid"
            body = stripe_event(event_type, "cus_acme_001")
            started = time.perf_counter()
            # The writer does not wait for its own cache (the reader's is what is measured).
            writer._webhooks.HandleStripeWebhook(
                webhook_pb2.HandleStripeWebhookRequest(payload=body, signature_header=sign(body)), timeout=2
            )
            while reader.is_enabled("acme-corp", "pro_features") != expected:
                if time.perf_counter() - started > 2:
                    raise SystemExit("a change never reached the reader")
                time.sleep(0.0002)
            latencies.append((time.perf_counter() - started) * 1000)
        latencies.sort()
        p50 = statistics.median(latencies)
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        print(f"propagation webhook → other client's cache: p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {latencies[-1]:.2f} ms over {len(latencies)} changes")
        reader.close()
        writer.close()
        process.stop()


if __name__ == "__main__":
    main()
