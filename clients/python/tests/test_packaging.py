"""The committed stubs and rules copy must match what the repository's sources generate."""
from __future__ import annotations

import filecmp
import re
import subprocess
import sys
from pathlib import Path

import stripe

from conftest import ROOT, binary

PACKAGE = ROOT / "clients" / "python"


def test_committed_stubs_are_current(tmp_path: Path):
    subprocess.run([sys.executable, str(PACKAGE / "generate_stubs.py"), str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "nothing generated"
    for relative in generated:
        committed = PACKAGE / "src" / relative
        assert committed.exists(), f"{relative} is not committed: run clients/python/generate_stubs.py"
        assert filecmp.cmp(committed, tmp_path / relative, shallow=False), (
            f"{relative} is stale: run clients/python/generate_stubs.py"
        )


def test_coresdk_stripe_sign_is_accepted_by_stripes_library():
    body = '{"id":"evt_sign_1","object":"event","type":"invoice.paid","created":1700000000}'
    header = subprocess.run(
        [str(binary()), "stripe", "sign", "--secret", "whsec_cli"], input=body, capture_output=True, text=True, check=True
    ).stdout.strip()
    event = stripe.Webhook.construct_event(body, header, "whsec_cli")
    assert event["id"] == "evt_sign_1"


def test_the_mock_reads_rules_with_tomli_where_tomllib_is_missing():
    # Python 3.10 has no tomllib; the package depends on tomli there. Without tomllib (a
    # None entry in sys.modules makes its import fail) the mock must load the sidecar's rules.
    script = (
        "import sys; sys.modules['tomllib'] = None\n"
        "from coresdk import Settings\n"
        "from coresdk.mock import MockSidecar, tomllib\n"
        "assert tomllib.__name__ == 'tomli', tomllib\n"
        "mock = MockSidecar(Settings(use_mock=True), env={})\n"
        "print(mock.get_flag('acme-corp', 'pro_features').value)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_test_requirements_allow_only_what_the_client_declares():
    """A test environment with a runtime the client does not accept tests nothing a user gets:
    its dependencies and its extras' (`verify`: cryptography) alike."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((PACKAGE / "pyproject.toml").read_text())["project"]
    wanted_by_extras = [r for extra in project["optional-dependencies"].values() for r in extra]
    declared = {r.name: r.specifier for r in map(Requirement, project["dependencies"] + wanted_by_extras)}
    assert "cryptography" in declared, "the verify extra declares cryptography"
    for line in (ROOT / "scripts" / "requirements-test.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-"):
            continue
        wanted = Requirement(line)
        if wanted.name not in declared:
            continue
        pinned = [s.version for s in wanted.specifier if s.operator == "=="]
        if pinned:
            assert pinned[0] in declared[wanted.name], f"{line}: pyproject.toml declares {wanted.name}{declared[wanted.name]}"
        else:
            assert wanted.specifier == declared[wanted.name], f"{line}: pyproject.toml declares {wanted.name}{declared[wanted.name]}"


def test_the_declared_runtime_floors_are_those_the_committed_stubs_need():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    declared = {
        r.name: r.specifier
        for r in map(Requirement, tomllib.loads((PACKAGE / "pyproject.toml").read_text())["project"]["dependencies"])
    }
    stubs = PACKAGE / "src" / "coresdk" / "v1"
    grpc_version = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", (stubs / "audit_pb2_grpc.py").read_text())
    protobuf = re.search(r"ValidateProtobufRuntimeVersion\(\s*\S+,\s*(\d+),\s*(\d+),\s*(\d+),", (stubs / "audit_pb2.py").read_text())
    assert grpc_version and protobuf
    needs = {
        "grpcio": Version(grpc_version.group(1)),
        "grpcio-status": Version(grpc_version.group(1)),
        "protobuf": Version(".".join(protobuf.groups())),
    }
    for name, version in needs.items():
        # The floor is what the stubs need: nothing older is allowed, and that version is.
        floor = next((Version(s.version) for s in declared[name] if s.operator == ">="), None)
        assert floor == version, f"pyproject.toml declares {name}{declared[name]}; the stubs need {name}>={version}"
    # protobuf's gencode accepts only runtimes of its own major version.
    assert Version(f"{needs['protobuf'].major + 1}") not in declared["protobuf"]
