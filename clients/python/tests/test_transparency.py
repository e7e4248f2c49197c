"""The offline verifiers of coresdk.transparency against published test vectors and a reference
tree written here from RFC 6962's definitions (not the code under test), their tamper cases,
and the proofs the mock and the real sidecar serve."""
from __future__ import annotations

import base64
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import coresdk.mock
from coresdk import ProblemError, Settings
from coresdk.mock import MockSidecar
from coresdk.models import InclusionProof
from coresdk.transparency import (
    EMPTY_ROOT,
    MAX_NOTE_BYTES,
    TransparencyError,
    VerifierKey,
    key_id,
    leaf_hash,
    open_checkpoint,
    open_note,
    parse_checkpoint,
    root_from_inclusion_proof,
    verify_checkpoint_consistency,
    verify_consistency,
    verify_inclusion,
    verify_record_inclusion,
)

from conftest import ENV, ROOT

# -- a reference tree, written from RFC 6962 section 2.1 ------------------------------------------


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def ref_root(leaves: list[bytes]) -> bytes:
    if not leaves:
        return _h(b"")
    if len(leaves) == 1:
        return _h(b"\x00" + leaves[0])
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return _h(b"\x01" + ref_root(leaves[:k]) + ref_root(leaves[k:]))


def ref_path(m: int, leaves: list[bytes]) -> list[bytes]:
    if len(leaves) <= 1:
        return []
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    if m < k:
        return ref_path(m, leaves[:k]) + [ref_root(leaves[k:])]
    return ref_path(m - k, leaves[k:]) + [ref_root(leaves[:k])]


def ref_subproof(m: int, leaves: list[bytes], b: bool) -> list[bytes]:
    n = len(leaves)
    if m == n:
        return [] if b else [ref_root(leaves)]
    k = 1
    while k * 2 < n:
        k *= 2
    if m <= k:
        return ref_subproof(m, leaves[:k], b) + [ref_root(leaves[k:])]
    return ref_subproof(m - k, leaves[k:], False) + [ref_root(leaves[:k])]


def ref_consistency(m: int, leaves: list[bytes]) -> list[bytes]:
    return [] if m in (0, len(leaves)) else ref_subproof(m, leaves, True)


# -- RFC 6962 test vectors -------------------------------------------------------------------------
# transparency-dev/merkle testonly/constants.go (LeafInputs, RootHashes) and
# testonly/reference_test.go (TestRefInclusionProof, TestRefConsistencyProof), the vectors of
# certificate-transparency's merkle tests.

LEAVES = [bytes.fromhex(h) for h in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]]
ROOTS = [bytes.fromhex(h) for h in [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]]
INCLUSION = [
    (0, 1, []),
    (0, 2, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"]),
    (1, 2, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]
CONSISTENCY = [
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
]


def test_the_reference_tree_reproduces_the_published_vectors():
    # The reference that the randomized tests below trust is itself checked first.
    for size, root in enumerate(ROOTS):
        assert ref_root(LEAVES[:size]) == root
    for index, size, path in INCLUSION:
        assert ref_path(index, LEAVES[:size]) == [bytes.fromhex(h) for h in path]
    for m, n, path in CONSISTENCY:
        assert ref_consistency(m, LEAVES[:n]) == [bytes.fromhex(h) for h in path]
    assert EMPTY_ROOT == ROOTS[0]


@pytest.mark.parametrize("index,size,path", INCLUSION)
def test_inclusion_vectors_verify(index, size, path):
    proof = [bytes.fromhex(h) for h in path]
    verify_inclusion(leaf_hash(LEAVES[index]), index, size, proof, ROOTS[size])
    assert root_from_inclusion_proof(leaf_hash(LEAVES[index]), index, size, proof) == ROOTS[size]


@pytest.mark.parametrize("m,n,path", CONSISTENCY)
def test_consistency_vectors_verify(m, n, path):
    verify_consistency(m, n, [bytes.fromhex(h) for h in path], ROOTS[m], ROOTS[n])


def _flip(h: bytes) -> bytes:
    return bytes([h[0] ^ 1]) + h[1:]


def test_inclusion_tampering_is_detected():
    index, size = 5, 8
    proof = ref_path(index, LEAVES)
    leaf = leaf_hash(LEAVES[index])
    verify_inclusion(leaf, index, size, proof, ROOTS[size])
    cases = {
        "altered record": (leaf_hash(LEAVES[index] + b"!"), index, size, proof, ROOTS[size]),
        "altered hash": (leaf, index, size, [proof[0], _flip(proof[1]), proof[2]], ROOTS[size]),
        "wrong index": (leaf, 4, size, proof, ROOTS[size]),
        # The path of leaf 5 has the same shape in 7 leaves as in 8: the root tells them apart.
            "wrong size": (leaf, index, 7, proof, ROOTS[7]),
        "wrong root": (leaf, index, size, proof, ROOTS[7]),
        "truncated": (leaf, index, size, proof[:-1], ROOTS[size]),
        "extended": (leaf, index, size, proof + [ROOTS[1]], ROOTS[size]),
        "reordered": (leaf, index, size, [proof[1], proof[0], proof[2]], ROOTS[size]),
        "index past the tree": (leaf, 8, size, proof, ROOTS[size]),
        "leaf data as the leaf hash": (LEAVES[7].ljust(32, b"\0"), 7, size, ref_path(7, LEAVES), ROOTS[size]),
        "a short hash": (leaf, index, size, [proof[0][:31], proof[1], proof[2]], ROOTS[size]),
    }
    for name, args in cases.items():
        with pytest.raises(TransparencyError):
            verify_inclusion(*args)
            pytest.fail(name)


def test_consistency_tampering_is_detected():
    proof = ref_consistency(6, LEAVES)
    verify_consistency(6, 8, proof, ROOTS[6], ROOTS[8])
    cases = {
        "altered hash": (6, 8, [proof[0], _flip(proof[1]), proof[2]], ROOTS[6], ROOTS[8]),
        "old root of another tree": (6, 8, proof, ROOTS[5], ROOTS[8]),
        "new root of another tree": (6, 8, proof, ROOTS[6], ROOTS[7]),
        "wrong old size": (5, 8, proof, ROOTS[6], ROOTS[8]),
        "wrong new size": (6, 7, proof, ROOTS[6], ROOTS[7]),
        "truncated": (6, 8, proof[:-1], ROOTS[6], ROOTS[8]),
        "extended": (6, 8, proof + [ROOTS[1]], ROOTS[6], ROOTS[8]),
        "empty": (6, 8, [], ROOTS[6], ROOTS[8]),
        "shrinking": (8, 6, proof, ROOTS[8], ROOTS[6]),
        "equal sizes, different roots": (8, 8, [], ROOTS[7], ROOTS[8]),
        "equal sizes, a proof": (8, 8, [ROOTS[1]], ROOTS[8], ROOTS[8]),
        "from the empty tree, a proof": (0, 8, [ROOTS[1]], ROOTS[0], ROOTS[8]),
        "from the empty tree, not its root": (0, 8, [], ROOTS[1], ROOTS[8]),
    }
    for name, args in cases.items():
        with pytest.raises(TransparencyError):
            verify_consistency(*args)
            pytest.fail(name)
    verify_consistency(0, 8, [], ROOTS[0], ROOTS[8])
    verify_consistency(8, 8, [], ROOTS[8], ROOTS[8])


def test_random_trees_up_to_2000_leaves():
    rng = random.Random(14)
    leaves = [rng.randbytes(rng.randrange(0, 40)) for _ in range(2000)]
    roots: dict[int, bytes] = {}
    for _ in range(60):
        n = rng.randrange(1, 2001)
        roots.setdefault(n, ref_root(leaves[:n]))
        for m in {0, n - 1, rng.randrange(n)}:
            proof = ref_path(m, leaves[:n])
            verify_inclusion(leaf_hash(leaves[m]), m, n, proof, roots[n])
            with pytest.raises(TransparencyError):
                verify_inclusion(leaf_hash(leaves[m] + b"x"), m, n, proof, roots[n])
            if n > 1:
                with pytest.raises(TransparencyError):
                    verify_inclusion(leaf_hash(leaves[m]), (m + 1) % n, n, proof, roots[n])
        old = rng.randrange(1, n + 1)
        roots.setdefault(old, ref_root(leaves[:old]))
        proof = ref_consistency(old, leaves[:n])
        verify_consistency(old, n, proof, roots[old], roots[n])
        if old < n:
            with pytest.raises(TransparencyError):
                verify_consistency(old, n, proof, leaf_hash(b"not the root"), roots[n])
            with pytest.raises(TransparencyError):
                verify_consistency(old, n, [_flip(proof[0])] + proof[1:], roots[old], roots[n])


def test_proofs_are_bounded():
    with pytest.raises(TransparencyError, match="more than the 64"):
        verify_inclusion(leaf_hash(b""), 0, 2**53 - 1, [ROOTS[1]] * 65, ROOTS[1])
    with pytest.raises(TransparencyError, match="more than the 64"):
        verify_consistency(1, 2**53 - 1, [ROOTS[1]] * 65, ROOTS[1], ROOTS[1])
    with pytest.raises(TransparencyError):
        verify_inclusion(leaf_hash(b""), 0, 2**64, [], ROOTS[1])


# -- signed notes: Go's sumdb/note test vectors (golang.org/x/mod, sumdb/note/note_test.go) ------

PETER = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
PETER_SIG = "\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n"
ENOCH_SIG = "\u2014 EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n"


def test_go_note_vectors_open():
    assert open_note(TEXT + "\n" + PETER_SIG, PETER) == TEXT
    # Another key's signature (a witness's) is ignored; each key finds its own.
    assert open_note(TEXT + "\n" + PETER_SIG + ENOCH_SIG, PETER) == TEXT
    assert open_note(TEXT + "\n" + PETER_SIG + ENOCH_SIG, ENOCH) == TEXT
    assert str(VerifierKey.parse(PETER)) == PETER


def test_go_note_vectors_refused():
    with pytest.raises(TransparencyError, match="no signature of EnochRoot"):
        open_note(TEXT + "\n" + PETER_SIG, ENOCH)
    with pytest.raises(TransparencyError, match="does not verify"):
        open_note(TEXT.replace("cryptography", "cryptographY") + "\n" + PETER_SIG, PETER)
    with pytest.raises(TransparencyError, match="does not verify"):
        open_note(TEXT + "\n" + PETER_SIG[:60] + "ABCD" + PETER_SIG[60:], PETER)
    # Go's malformed notes (TestOpen's badMsgs).
    for bad in [
        TEXT,
        TEXT + "\n",
        TEXT + "\n" + PETER_SIG[:-1],
        "\x01" + TEXT + "\n" + PETER_SIG,
        TEXT + "\n" + "\u2014 Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=",
        TEXT + "\n" + PETER_SIG + "Unexpected line.\n",
    ]:
        with pytest.raises(TransparencyError):
            open_note(bad, PETER)
    with pytest.raises(TransparencyError, match="UTF-8"):
        open_note(b"\xff" + (TEXT + "\n" + PETER_SIG).encode(), PETER)


def test_go_verifier_key_manglings_are_refused():
    # Go's TestNewVerifier: every proper substring and every byte changed by one is refused.
    raw = PETER.encode()
    for i in range(len(raw) + 1):
        for j in range(i + 1, len(raw) + 1):
            if (i, j) != (0, len(raw)):
                with pytest.raises(TransparencyError):
                    VerifierKey.parse(raw[i:j].decode())
    for i in range(len(raw)):
        mangled = raw[:i] + bytes([raw[i] + 1]) + raw[i + 1 :]
        with pytest.raises(TransparencyError):
            VerifierKey.parse(mangled.decode())
    with pytest.raises(TransparencyError):
        VerifierKey.parse("PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==")
    with pytest.raises(TransparencyError):
        VerifierKey.parse("PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")


# -- checkpoints ---------------------------------------------------------------------------------


class Log:
    """A checkpoint signer written here from the C2SP specs, with cryptography's Ed25519."""

    def __init__(self, name: str = "example.com/log"):
        self.name = name
        self.key = Ed25519PrivateKey.generate()
        public = self.key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        typed = b"\x01" + public
        self.key_id = hashlib.sha256(name.encode() + b"\n" + typed).digest()[:4]
        self.vkey = f"{name}+{self.key_id.hex()}+{base64.b64encode(typed).decode()}"

    def sign(self, text: str) -> str:
        signature = base64.b64encode(self.key_id + self.key.sign(text.encode())).decode()
        return f"{text}\n\u2014 {self.name} {signature}\n"

    def checkpoint(self, size: int, root: bytes, origin: str | None = None, extra: str = "") -> str:
        return self.sign(f"{origin or self.name}\n{size}\n{base64.b64encode(root).decode()}\n{extra}")


# The example of c2sp.org/tlog-checkpoint (its key is not published: parsed, not opened).
C2SP_EXAMPLE = (
    "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n\n"
    "\u2014 example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n"
)


def test_the_c2sp_example_checkpoint_parses():
    checkpoint = parse_checkpoint(C2SP_EXAMPLE)
    assert (checkpoint.origin, checkpoint.size, checkpoint.extensions) == ("example.com/behind-the-sofa", 20852163, ())
    assert checkpoint.root_hash == base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=")
    assert checkpoint.text == "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    [signature] = checkpoint.signatures
    assert (signature.name, signature.key_id, len(signature.signature)) == ("example.com/behind-the-sofa", 0x033de0ae, 64)


def _canonical(seq: int, event: str) -> bytes:
    """A record's canonical bytes (RFC 8785: sorted keys, no spaces), as the sidecar seals them."""
    fields = {"v": 1, "seq": seq, "time": "2026-01-01T00:00:00.000Z", "tenant": "acme", "actor": "u1",
              "event": event, "outcome": "ok", "metadata": {}}
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


RECORDS = [_canonical(i + 1, f"app.e{i + 1}") for i in range(8)]


def test_checkpoints_open_and_prove_records():
    log = Log()
    note = log.checkpoint(8, ref_root(RECORDS))
    checkpoint = open_checkpoint(note, log.vkey, origin=log.name)
    assert (checkpoint.origin, checkpoint.size, checkpoint.root_hash) == (log.name, 8, ref_root(RECORDS))
    proof = InclusionProof(5, 8, ref_path(5, RECORDS))
    proven = verify_record_inclusion(RECORDS[5], 6, proof, checkpoint)
    # What the proof covers, read from the verified bytes.
    assert (proven["seq"], proven["event"], proven["tenant"], proven["actor"]) == (6, "app.e6", "acme", "u1")
    with pytest.raises(TransparencyError):
        verify_record_inclusion(RECORDS[5] + b" ", 6, proof, checkpoint)
    with pytest.raises(TransparencyError, match="not of record 5"):
        verify_record_inclusion(RECORDS[4], 5, proof, checkpoint)
    log_checkpoint_8 = open_checkpoint(log.checkpoint(8, ROOTS[8]), log.vkey)
    old = open_checkpoint(log.checkpoint(6, ROOTS[6]), log.vkey)
    verify_checkpoint_consistency(old, log_checkpoint_8, ref_consistency(6, LEAVES))
    with pytest.raises(TransparencyError):
        verify_checkpoint_consistency(old, log_checkpoint_8, ref_consistency(5, LEAVES))
    # Extension lines are allowed, and signed.
    assert open_checkpoint(log.checkpoint(8, ROOTS[8], extra="ext\n"), log.vkey).extensions == ("ext",)


def test_a_record_proven_must_say_the_seq_it_is_proven_at():
    # Leaf 5 of this tree is a record that says it is record 7: its bytes are in the signed
    # tree, but not as what they claim to be.
    leaves = RECORDS[:5] + [_canonical(7, "app.e7")] + RECORDS[6:]
    log = Log()
    checkpoint = open_checkpoint(log.checkpoint(8, ref_root(leaves)), log.vkey)
    proof = InclusionProof(5, 8, ref_path(5, leaves))
    verify_inclusion(leaf_hash(leaves[5]), 5, 8, proof.hashes, checkpoint.root_hash)
    with pytest.raises(TransparencyError, match="own seq is not the 6"):
        verify_record_inclusion(leaves[5], 6, proof, checkpoint)
    # Leaves that are not a JSON object with a seq are no audit records.
    for leaf in (b"not json", b"[6]", b'{"v":1}', b'{"seq":"6"}', b'{"seq":true}', b'{"seq":NaN}', b"\xef\xbb\xbf{\"seq\":6}"):
        leaves = RECORDS[:5] + [leaf] + RECORDS[6:]
        checkpoint = open_checkpoint(log.checkpoint(8, ref_root(leaves)), log.vkey)
        with pytest.raises(TransparencyError):
            verify_record_inclusion(leaf, 6, InclusionProof(5, 8, ref_path(5, leaves)), checkpoint)
            pytest.fail(repr(leaf))


def test_a_checkpoint_must_name_the_log_of_its_key():
    # The key signs the note text, not its own name: a note of another origin signed by this
    # key (or a signature line relabelled onto another log's note) must not open as that log's.
    log = Log()
    other = log.checkpoint(8, ROOTS[8], origin="example.com/other")
    with pytest.raises(TransparencyError, match="not the key's name"):
        open_checkpoint(other, log.vkey)
    with pytest.raises(TransparencyError, match="not the key's name"):
        open_checkpoint(other, log.vkey, origin="example.com/other")
    # An origin asked for other than the key's name refuses even the key's own checkpoints.
    with pytest.raises(TransparencyError, match="origin"):
        open_checkpoint(log.checkpoint(8, ROOTS[8]), log.vkey, origin="example.com/other")


def test_lone_surrogates_are_refused_as_not_utf8():
    log = Log()
    note = log.checkpoint(8, ROOTS[8])
    with pytest.raises(TransparencyError, match="not valid UTF-8"):
        open_checkpoint(note.replace("example.com", "example\ud800.com", 1), log.vkey)
    with pytest.raises(TransparencyError, match="not valid UTF-8"):
        VerifierKey.parse("log\udc00" + log.vkey[len(log.name):])
    with pytest.raises(TransparencyError, match="not valid UTF-8"):
        key_id("log\ud800", b"\x01" + bytes(32))


def test_the_exact_power_of_two_test_at_large_sizes():
    # 2^50 + 1 is no power of two, though log2 rounds it to 50 (the Node client's old test).
    m = 2**50 + 1
    a, x, y = _h(b"a"), _h(b"x"), _h(b"y")
    # MTH(D[0:2^50]) = a; leaves 2^50 and 2^50 + 1 hash to x and y.
    old_root, new_root = _h(b"\x01" + a + x), _h(b"\x01" + a + _h(b"\x01" + x + y))
    verify_consistency(m, m + 1, [x, y, a], old_root, new_root)
    with pytest.raises(TransparencyError):
        verify_consistency(m, m + 1, [x, y, a], old_root, _flip(new_root))


def test_forged_and_malformed_checkpoints_are_refused():
    log, forger = Log(), Log()
    note = log.checkpoint(8, ROOTS[8])
    root_b64 = base64.b64encode(ROOTS[8]).decode()
    with pytest.raises(TransparencyError, match="no signature of"):
        open_checkpoint(note, forger.vkey)
    # The same name with another key: a forgery, whose key id does not match.
    impostor = Log(log.name)
    with pytest.raises(TransparencyError, match="no signature of"):
        open_checkpoint(impostor.checkpoint(8, ROOTS[8]), log.vkey)
    # A signature line of the right key id over another tree.
    forged = note.replace("\n8\n", "\n9\n", 1)
    with pytest.raises(TransparencyError, match="does not verify"):
        open_checkpoint(forged, log.vkey)
    with pytest.raises(TransparencyError, match="origin"):
        open_checkpoint(note, log.vkey, origin="example.com/other")
    bad_bodies = {
        "two lines": f"{log.name}\n8\n",
        "leading zero": f"{log.name}\n08\n{root_b64}\n",
        "negative": f"{log.name}\n-8\n{root_b64}\n",
        "size too large": f"{log.name}\n{2**53}\n{root_b64}\n",
        "short root": f"{log.name}\n8\n{base64.b64encode(ROOTS[8][:31]).decode()}\n",
        "unpadded root": f"{log.name}\n8\n{root_b64.rstrip('=')}\n",
        "empty extension line": f"{log.name}\n8\n{root_b64}\n\next\n",
        "empty origin": f"\n8\n{root_b64}\n",
        "carriage return": f"{log.name}\r\n8\n{root_b64}\n",
        "tab": f"{log.name}\t\n8\n{root_b64}\n",
    }
    for name, body in bad_bodies.items():
        with pytest.raises(TransparencyError):
            open_checkpoint(log.sign(body), log.vkey)
            pytest.fail(name)
    with pytest.raises(TransparencyError, match="bytes, over"):
        parse_checkpoint(log.checkpoint(8, ROOTS[8], extra="x" * MAX_NOTE_BYTES + "\n"))


def test_the_transparency_module_needs_cryptography_only_for_signatures():
    # A None entry in sys.modules makes the import fail as if the package were missing.
    script = (
        "import sys; sys.modules['cryptography'] = None\n"
        "from coresdk.transparency import leaf_hash, verify_inclusion, open_note\n"
        f"verify_inclusion(leaf_hash(b''), 0, 1, [], bytes.fromhex('{ROOTS[1].hex()}'))\n"
        "try:\n"
        f"    open_note({TEXT + chr(10) + PETER_SIG!r}, {PETER!r})\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "pip install 'coresdk[verify]'" in out


# -- the mock and the real sidecar ---------------------------------------------------------------


def _records(sdk, count: int) -> list:
    return [sdk.audit(f"app.proof.{i}", outcome="ok", actor="prover", metadata={"i": i}) for i in range(count)]


def test_explicit_size_proofs_verify_offline(sdk):
    appended = _records(sdk, 12)
    head = appended[-1].seq
    records = {r.seq: r for r in sdk.audit_query(limit=1000)}
    assert sorted(records) == list(range(1, head + 1))
    leaves = [records[seq].canonical for seq in range(1, head + 1)]
    for size in (1, 2, 5, 8, head - 1, head):
        root = ref_root(leaves[:size])
        for seq in {1, size, (size + 1) // 2}:
            proof = sdk.audit_inclusion_proof(seq, size)
            assert (proof.leaf_index, proof.tree_size, proof.checkpoint) == (seq - 1, size, "")
            assert proof.hashes == ref_path(seq - 1, leaves[:size])
            verify_inclusion(leaf_hash(records[seq].canonical), seq - 1, size, proof.hashes, root)
        for old in (0, 1, 3, size):
            if old <= size:
                c = sdk.audit_consistency_proof(old, size)
                assert (c.from_size, c.to_size) == (old, size)
                assert c.hashes == ref_consistency(old, leaves[:size])
                verify_consistency(old, size, c.hashes, ref_root(leaves[:old]), root)
    verified = sdk.audit_verify(full=True)
    assert verified.ok and verified.head_seq == head


def _refused(call) -> ProblemError:
    with pytest.raises(ProblemError) as caught:
        call()
    return caught.value


def test_proof_requests_are_refused_as_the_sidecar_refuses_them(sdk):
    head = _records(sdk, 3)[-1].seq
    e = _refused(lambda: sdk.audit_inclusion_proof(0, head))
    assert (e.status, e.problem.reason) == (400, "INVALID_ARGUMENT")
    assert "seq: is required" in e.problem.detail
    e = _refused(lambda: sdk.audit_inclusion_proof(3, 2))
    assert (e.status, e.problem.reason) == (400, "INVALID_ARGUMENT")
    assert "tree_size: is 2, smaller than the seq 3" in e.problem.detail
    e = _refused(lambda: sdk.audit_inclusion_proof(1, head + 1))
    assert (e.status, e.problem.reason, e.code) == (400, "OUT_OF_RANGE", grpc.StatusCode.OUT_OF_RANGE)
    assert f"holds {head} records, fewer than the tree size {head + 1}" in e.problem.detail
    e = _refused(lambda: sdk.audit_consistency_proof(3, 2))
    assert (e.status, e.problem.reason) == (400, "INVALID_ARGUMENT")
    assert "from_size: is 3, larger than to_size 2" in e.problem.detail
    e = _refused(lambda: sdk.audit_consistency_proof(1, head + 5))
    assert (e.status, e.problem.reason) == (400, "OUT_OF_RANGE")


def mock() -> MockSidecar:
    return MockSidecar(Settings(use_mock=True), env=ENV)


def test_an_answer_without_its_proof_is_a_stored_record():
    # The sidecar answers include_proof without inclusion_proof when no checkpoint covered the
    # record in time: the record is stored, and the answer is a success, not an error.
    from coresdk.models import AuditRecord, WebhookResult
    from coresdk.v1 import audit_pb2, webhook_pb2

    record = AuditRecord.from_proto(audit_pb2.AuditRecord(seq=3, event="app.x", canonical=b"{}"))
    assert (record.seq, record.inclusion_proof) == (3, None)
    result = WebhookResult.from_proto(webhook_pb2.HandleStripeWebhookResponse(outcome=1, audit_seq=3))
    assert (result.audit_seq, result.inclusion_proof) == (3, None)
    proven = AuditRecord.from_proto(audit_pb2.AuditRecord(seq=3, inclusion_proof=audit_pb2.InclusionProof(leaf_index=2, tree_size=3)))
    assert proven.inclusion_proof is not None and proven.inclusion_proof.leaf_index == 2


def test_the_mock_signs_no_checkpoint_of_the_empty_log(monkeypatch):
    # As the sidecar: its first checkpoint is signed after its first record. A mock's log
    # starts with its tenants' seeding record; this one is a sidecar's started without any.
    with monkeypatch.context() as m:
        m.setattr(MockSidecar, "_seal", lambda *args, **kwargs: None)
        sdk = mock()
    for call in (sdk.audit_checkpoint, lambda: sdk.audit_consistency_proof(0)):
        e = _refused(call)
        assert (e.status, e.problem.reason, e.code) == (404, "CHECKPOINT_NOT_FOUND", grpc.StatusCode.NOT_FOUND)
    sdk.audit("app.first", outcome="ok", actor="prover")
    assert open_checkpoint(sdk.audit_checkpoint(), sdk.audit_verifier_key).size == 1


def test_the_mock_refuses_include_proof_without_cryptography_before_writing():
    # As the sidecar refuses CHECKPOINTS_OFF: nothing is written when no proof can be given.
    script = (
        "import sys; sys.modules['cryptography'] = None\n"
        "from conftest import ENV, sign, stripe_event\n"
        "from coresdk import Settings\n"
        "from coresdk.mock import MockSidecar\n"
        "sdk = MockSidecar(Settings(use_mock=True), env=ENV)\n"
        "print(len(sdk.audit_query(limit=1000)))\n"
        "body = stripe_event('invoice.paid', 'cus_acme_001')\n"
        "for call in (lambda: sdk.audit('app.x', outcome='ok', actor='a', include_proof=True),\n"
        "             lambda: sdk.handle_stripe_webhook(body, sign(body), include_proof=True)):\n"
        "    try:\n"
        "        call()\n"
        "        print('answered')\n"
        "    except ImportError:\n"
        "        pass\n"
        "print(len(sdk.audit_query(limit=1000)))\n"
    )
    tests = Path(__file__).resolve().parent
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=tests).stdout
    before, after = out.split()
    assert before == after, out


def test_the_mock_signs_checkpoints_a_verifier_accepts():
    sdk = mock()
    record = sdk.audit("app.signed", outcome="ok", actor="prover", include_proof=True)
    assert record is not None and record.inclusion_proof is not None
    checkpoint = open_checkpoint(record.inclusion_proof.checkpoint, sdk.audit_verifier_key)
    assert checkpoint.origin.startswith("coresdk.mock/") and checkpoint.size == record.seq
    verify_record_inclusion(record.canonical, record.seq, record.inclusion_proof, checkpoint)
    # The checkpoint of a size is signed once: asking again answers the same note.
    assert sdk.audit_checkpoint() == record.inclusion_proof.checkpoint
    later = _records(sdk, 5)[-1]
    newest = open_checkpoint(sdk.audit_checkpoint(), sdk.audit_verifier_key)
    assert newest.size == later.seq
    c = sdk.audit_consistency_proof(checkpoint.size)
    assert c.to_size == newest.size
    verify_checkpoint_consistency(checkpoint, newest, c.hashes)
    proof = sdk.audit_inclusion_proof(record.seq)
    assert proof.tree_size == newest.size and proof.checkpoint == sdk.audit_checkpoint()
    verify_record_inclusion(record.canonical, record.seq, proof, newest)
    # Another mock is another log: its key does not open this one's checkpoints.
    with pytest.raises(TransparencyError):
        open_checkpoint(sdk.audit_checkpoint(), mock().audit_verifier_key)


def test_the_mock_proves_webhook_records():
    from conftest import sign, stripe_event  # noqa: F401  (sign lives beside stripe_event)

    sdk = mock()
    body = stripe_event("invoice.paid", "cus_acme_001", id="in_proof")
    result = sdk.handle_stripe_webhook(body, sign(body), include_proof=True)
    assert result.inclusion_proof is not None and result.inclusion_proof.leaf_index == result.audit_seq - 1
    checkpoint = open_checkpoint(result.inclusion_proof.checkpoint, sdk.audit_verifier_key)
    record = next(r for r in sdk.audit_query(limit=1000) if r.seq == result.audit_seq)
    verify_record_inclusion(record.canonical, record.seq, result.inclusion_proof, checkpoint)


def test_the_mock_proves_kept_records_after_dropping_old_ones(monkeypatch):
    monkeypatch.setattr(coresdk.mock, "MAX_AUDIT_RECORDS", 10)
    sdk = mock()
    _records(sdk, 40)
    kept = sdk.audit_query(limit=1000)
    assert kept[0].seq > 1, "nothing was dropped"
    checkpoint = open_checkpoint(sdk.audit_checkpoint(), sdk.audit_verifier_key)
    for record in kept:
        verify_record_inclusion(record.canonical, record.seq, sdk.audit_inclusion_proof(record.seq), checkpoint)
    e = _refused(lambda: sdk.audit_inclusion_proof(1, checkpoint.size))
    assert e.problem.reason == "MOCK_CAPACITY"
    assert sdk.audit_verify().tree_root == checkpoint.root_hash.hex()


# -- the real sidecar's checkpoints ----------------------------------------------------------------


@pytest.fixture
def checkpointing(tmp_path: Path):
    """A sidecar that signs a checkpoint of a moved head every 50 ms, its client, and the
    verifier key `coresdk audit public-key` prints for its store."""
    from conftest import Sidecar, binary, client_for

    process = Sidecar(tmp_path, {"CORESDK_AUDIT_CHECKPOINT_INTERVAL_S": "0.05"})
    process.start()
    client = client_for(process, timeout_ms=5000)
    vkey = subprocess.run(
        [str(binary()), "audit", "public-key", "--store", process.store], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    yield client, vkey
    client.close()
    process.stop()


def test_the_sidecar_proves_appended_records_against_signed_checkpoints(checkpointing):
    client, vkey = checkpointing
    assert VerifierKey.parse(vkey).name.startswith("coresdk.audit/")
    record = client.audit("app.proved", outcome="ok", actor="prover", metadata={"n": 1}, include_proof=True)
    assert record is not None and record.inclusion_proof is not None
    checkpoint = open_checkpoint(record.inclusion_proof.checkpoint, vkey)
    assert checkpoint.size >= record.seq == record.inclusion_proof.leaf_index + 1
    verify_record_inclusion(record.canonical, record.seq, record.inclusion_proof, checkpoint)
    # The record as the log stores it is the one proved.
    stored = next(r for r in client.audit_query(limit=1000) if r.seq == record.seq)
    assert stored.canonical == record.canonical
    with pytest.raises(TransparencyError):
        verify_record_inclusion(record.canonical.replace(b'"ok"', b'"ko"'), record.seq, record.inclusion_proof, checkpoint)

    _records(client, 5)
    later = client.audit("app.proved", outcome="ok", actor="prover", include_proof=True)
    assert later is not None and later.inclusion_proof is not None
    newest = open_checkpoint(client.audit_checkpoint(), vkey)
    assert newest.size >= later.seq and newest.origin == checkpoint.origin
    consistency = client.audit_consistency_proof(checkpoint.size)
    assert consistency.to_size == newest.size
    verify_checkpoint_consistency(checkpoint, newest, consistency.hashes)
    # Against the newest checkpoint (tree size 0): its note comes with the proof.
    proof = client.audit_inclusion_proof(record.seq)
    assert proof.checkpoint and proof.tree_size == open_checkpoint(proof.checkpoint, vkey).size
    verify_record_inclusion(record.canonical, record.seq, proof, open_checkpoint(proof.checkpoint, vkey))

    verified = client.audit_verify()
    assert verified.ok and verified.checkpoint_size > 0 and len(verified.tree_root) == 64
    full = client.audit_verify(full=True)
    assert full.ok and full.records_checked == full.head_seq >= later.seq


def test_the_sidecar_proves_webhook_records(checkpointing):
    from conftest import sign, stripe_event

    client, vkey = checkpointing
    body = stripe_event("invoice.paid", "cus_acme_001", id="in_proof")
    result = client.handle_stripe_webhook(body, sign(body), include_proof=True)
    assert result.inclusion_proof is not None and result.inclusion_proof.leaf_index == result.audit_seq - 1
    checkpoint = open_checkpoint(result.inclusion_proof.checkpoint, vkey)
    record = next(r for r in client.audit_query(limit=1000) if r.seq == result.audit_seq)
    verify_record_inclusion(record.canonical, record.seq, result.inclusion_proof, checkpoint)
    # Another key (the mock's) does not open the sidecar's checkpoints.
    with pytest.raises(TransparencyError, match="no signature of"):
        open_checkpoint(result.inclusion_proof.checkpoint, mock().audit_verifier_key)


def test_the_async_client_awaits_the_tree_calls():
    import asyncio

    from coresdk.aio import AsyncSDK

    async def run() -> None:
        sdk = AsyncSDK(mock())
        record = await sdk.audit("app.async", outcome="ok", actor="prover", include_proof=True)
        checkpoint = open_checkpoint(await sdk.audit_checkpoint(), sdk.sync.audit_verifier_key)
        verify_record_inclusion(record.canonical, record.seq, await sdk.audit_inclusion_proof(record.seq), checkpoint)
        consistency = await sdk.audit_consistency_proof(1)
        verify_consistency(1, checkpoint.size, consistency.hashes, leaf_hash(sdk.sync.audit_query(limit=1)[0].canonical), checkpoint.root_hash)
        assert (await sdk.audit_verify(full=True)).ok

    asyncio.run(run())
