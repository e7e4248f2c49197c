"""Client settings, from the environment like the sidecar's."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping, Optional

TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    sidecar_addr: str = "localhost:50051"
    fail_mode: str = "open"
    use_mock: bool = False
    timeout_ms: int = 1000
    # Kept out of repr: settings end up in logs and tracebacks.
    admin_token: Optional[str] = field(default=None, repr=False)
    api_token: Optional[str] = field(default=None, repr=False)
    problem_type_base: str = "https://coresdk.dev/problems"
    # TLS to the sidecar (the settings `coresdk health` reads too): on when any is given. The
    # CA that signed the sidecar's certificate (else the system's roots), the name to expect
    # in it (else the address's host), and a client certificate for mutual TLS.
    tls_ca_file: Optional[str] = None
    tls_server_name: Optional[str] = None
    tls_client_cert_file: Optional[str] = None
    tls_client_key_file: Optional[str] = None
    # Audit records kept while the sidecar is away under fail mode `open`.
    spool_limit: int = 10_000

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "Settings":
        env = os.environ if env is None else env
        fail_mode = env.get("CORESDK_FAIL_MODE", "open").strip().lower()
        if fail_mode not in ("open", "closed"):
            raise ValueError(f"CORESDK_FAIL_MODE must be 'open' or 'closed', not {fail_mode!r}")
        timeout = env.get("CORESDK_TIMEOUT_MS", "1000")
        if not timeout.isdigit() or int(timeout) <= 0:
            raise ValueError(f"CORESDK_TIMEOUT_MS must be a positive integer, not {timeout!r}")
        client_cert = env.get("CORESDK_SIDECAR_TLS_CLIENT_CERT_FILE") or None
        client_key = env.get("CORESDK_SIDECAR_TLS_CLIENT_KEY_FILE") or None
        if (client_cert is None) != (client_key is None):
            raise ValueError(
                "CORESDK_SIDECAR_TLS_CLIENT_CERT_FILE and CORESDK_SIDECAR_TLS_CLIENT_KEY_FILE go together: set both, or neither"
            )
        return cls(
            sidecar_addr=env.get("CORESDK_SIDECAR_ADDR", "localhost:50051"),
            fail_mode=fail_mode,
            use_mock=env.get("CORESDK_USE_MOCK", "false").strip().lower() in TRUE,
            timeout_ms=int(timeout),
            admin_token=env.get("CORESDK_ADMIN_TOKEN") or None,
            api_token=env.get("CORESDK_API_TOKEN") or None,
            problem_type_base=env.get("CORESDK_PROBLEM_TYPE_BASE", "https://coresdk.dev/problems"),
            tls_ca_file=env.get("CORESDK_SIDECAR_TLS_CA_FILE") or None,
            tls_server_name=env.get("CORESDK_SIDECAR_TLS_SERVER_NAME") or None,
            tls_client_cert_file=client_cert,
            tls_client_key_file=client_key,
        )

    @property
    def uses_tls(self) -> bool:
        return any((self.tls_ca_file, self.tls_server_name, self.tls_client_cert_file, self.tls_client_key_file))
