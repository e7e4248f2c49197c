"""The SecurePay example's check script, in mock mode and against the real sidecar."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT, Sidecar

SCRIPT = ROOT / "examples" / "securepay" / "run_checks.py"


def run_checks(env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_securepay_checks_in_mock_mode():
    out = run_checks({"CORESDK_USE_MOCK": "true", "CORESDK_JWT_SECRET": "securepay-demo-jwt-secret-32-bytes-min", "STRIPE_WEBHOOK_SECRET": "whsec_test_secret"})
    assert out.count("[PASS]") == 12 and out.rstrip().endswith("12/12 passed")


def test_securepay_checks_against_the_sidecar(tmp_path):
    process = Sidecar(tmp_path, {"CORESDK_JWT_SECRET": "securepay-demo-jwt-secret-32-bytes-min"})
    process.start()
    env = {
        "CORESDK_USE_MOCK": "false",
        "CORESDK_SIDECAR_ADDR": process.addr,
        "CORESDK_JWT_SECRET": "securepay-demo-jwt-secret-32-bytes-min",
        "STRIPE_WEBHOOK_SECRET": "whsec_test_secret",
    }
    try:
        # Twice against the same durable sidecar, as the README runs it: the second run must
        # not depend on a fresh store.
        outs = [run_checks(env), run_checks(env)]
    finally:
        process.stop()
    for out in outs:
        assert out.count("[PASS]") == 12 and out.rstrip().endswith("12/12 passed")
