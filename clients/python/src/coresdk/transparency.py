"""Offline verification of the audit log's Merkle tree: C2SP tlog-checkpoint notes signed per
C2SP signed-note (Ed25519), RFC 9162 inclusion and consistency proofs. Nothing here talks to the
sidecar or trusts it: a verifier key obtained out of band (`coresdk audit public-key`) and the
bytes the sidecar served are all it takes.

    from coresdk.transparency import open_checkpoint, verify_record_inclusion
    checkpoint = open_checkpoint(note, "coresdk.example/audit+1a2b3c4d+AU...")  # signature checked
    record = sdk.audit("app.login", outcome="ok", actor="u1", include_proof=True)
    proven = verify_record_inclusion(record.canonical, record.seq, record.inclusion_proof, checkpoint)
    proven["event"], proven["actor"], proven["tenant"]  # what the proof covers

The proof covers a record's `canonical` bytes only: read what it says (event, actor, tenant,
outcome, metadata) from what `verify_record_inclusion` returns, not from the record's other
fields, which the sidecar (or anyone between) could change without the proof noticing.

The proof algorithms are written from RFC 9162 sections 2.1.3.2 and 2.1.4.2; the note formats
from c2sp.org/signed-note and c2sp.org/tlog-checkpoint. Checking a signature needs the
`cryptography` package (`pip install 'coresdk[verify]'`); the proofs need only hashlib.

Every failure raises `TransparencyError` (a ValueError) saying what did not verify; a function
that returns did verify.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

HASH_SIZE = 32
# The sidecar's bound on a cosigned checkpoint (AddCosignatures): three short lines plus
# signature lines of 100-200 bytes each, far more than the 16 signatures signed-note asks
# verifiers to accept at least.
MAX_NOTE_BYTES = 16 * 1024
# A proof of a tree of up to 2^64 leaves has at most 64 hashes (RFC 9162 section 2.1.3.1).
MAX_PROOF_HASHES = 64
# The largest tree size that JavaScript numbers (the Node client's) hold exactly; both clients
# refuse more so they agree on every note.
MAX_TREE_SIZE = 2**53 - 1
EMPTY_ROOT = hashlib.sha256(b"").digest()

ED25519 = 0x01
_SIGNATURE_LINE = re.compile(r"\u2014 (?P<name>[^\s+]+) (?P<sig>[A-Za-z0-9+/]+={0,2})")
_DECIMAL = re.compile(r"0|[1-9][0-9]*")
_HEX8 = re.compile(r"[0-9a-fA-F]{8}")


class TransparencyError(ValueError):
    """A note, key or proof that does not verify (or is not well formed)."""


def leaf_hash(data: bytes) -> bytes:
    """RFC 6962 leaf hash: SHA-256(0x00 || data). An audit record's leaf data are its `canonical` bytes."""
    return hashlib.sha256(b"\x00" + bytes(data)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 6962 interior node hash: SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def _hashes(proof: Sequence[bytes], what: str) -> list[bytes]:
    if len(proof) > MAX_PROOF_HASHES:
        raise TransparencyError(f"{what} has {len(proof)} hashes, more than the {MAX_PROOF_HASHES} any tree needs")
    out = []
    for i, h in enumerate(proof):
        if not isinstance(h, (bytes, bytearray, memoryview)) or len(h) != HASH_SIZE:
            raise TransparencyError(f"{what} hash {i} is not a {HASH_SIZE}-byte SHA-256 value")
        out.append(bytes(h))
    return out


def _size(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > MAX_TREE_SIZE:
        raise TransparencyError(f"{what} must be an integer from 0 to {MAX_TREE_SIZE}, not {value!r}")
    return value


def _root(value: bytes, what: str) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) != HASH_SIZE:
        raise TransparencyError(f"{what} is not a {HASH_SIZE}-byte SHA-256 value")
    return bytes(value)


def root_from_inclusion_proof(leaf: bytes, leaf_index: int, tree_size: int, proof: Sequence[bytes]) -> bytes:
    """The root that `proof` leads to from the leaf hash `leaf` at `leaf_index` in a tree of
    `tree_size` leaves (RFC 9162 section 2.1.3.2, steps 1-5 without the final comparison)."""
    leaf_index, tree_size = _size(leaf_index, "leaf_index"), _size(tree_size, "tree_size")
    path = _hashes(proof, "the inclusion proof")
    r = _root(leaf, "the leaf hash")
    if leaf_index >= tree_size:
        raise TransparencyError(f"leaf {leaf_index} is not in a tree of {tree_size} leaves")
    fn, sn = leaf_index, tree_size - 1
    for p in path:
        if sn == 0:
            raise TransparencyError("the inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise TransparencyError("the inclusion proof is shorter than the tree is deep")
    return r


def verify_inclusion(leaf: bytes, leaf_index: int, tree_size: int, proof: Sequence[bytes], root: bytes) -> None:
    """That the leaf hash `leaf` is leaf `leaf_index` of the tree of `tree_size` leaves whose
    root is `root` (RFC 9162 section 2.1.3.2)."""
    root = _root(root, "the root")
    if root_from_inclusion_proof(leaf, leaf_index, tree_size, proof) != root:
        raise TransparencyError(f"the inclusion proof of leaf {leaf_index} does not lead to the root of the tree of {tree_size} leaves")


def verify_consistency(from_size: int, to_size: int, proof: Sequence[bytes], from_root: bytes, to_root: bytes) -> None:
    """That the tree of `to_size` leaves with root `to_root` extends (keeps every leaf of, in
    order) the tree of `from_size` leaves with root `from_root` (RFC 9162 section 2.1.4.2)."""
    from_size, to_size = _size(from_size, "from_size"), _size(to_size, "to_size")
    path = _hashes(proof, "the consistency proof")
    from_root, to_root = _root(from_root, "the first root"), _root(to_root, "the second root")
    if from_size > to_size:
        raise TransparencyError(f"a tree of {to_size} leaves cannot extend one of {from_size}")
    if from_size == to_size:
        # RFC 9162: the proof between equal sizes is empty, and the roots must be the same.
        if path:
            raise TransparencyError("a consistency proof between equal tree sizes must be empty")
        if from_root != to_root:
            raise TransparencyError(f"two different roots for the tree of {to_size} leaves")
        return
    if from_size == 0:
        # Every tree extends the empty one, whose root is SHA-256 of nothing.
        if path:
            raise TransparencyError("a consistency proof from the empty tree must be empty")
        if from_root != EMPTY_ROOT:
            raise TransparencyError("the root of the empty tree is not SHA-256 of nothing")
        return
    if not path:
        raise TransparencyError("the consistency proof is empty")
    if from_size & (from_size - 1) == 0:
        path = [from_root] + path
    fn, sn = from_size - 1, to_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise TransparencyError("the consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise TransparencyError("the consistency proof is shorter than the trees are deep")
    if fr != from_root:
        raise TransparencyError(f"the consistency proof does not lead to the root of the tree of {from_size} leaves")
    if sr != to_root:
        raise TransparencyError(f"the consistency proof does not lead to the root of the tree of {to_size} leaves")


# -- signed notes ------------------------------------------------------------------------------


def _b64(text: str, what: str) -> bytes:
    """Strict RFC 4648 section 4 base64: the standard alphabet, padded, canonical."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise TransparencyError(f"{what} is not base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise TransparencyError(f"{what} is not canonical base64")
    return raw


def _valid_name(name: str) -> bool:
    # signed-note: non-empty, no Unicode spaces, no '+'. str.isspace covers the Unicode spaces.
    return bool(name) and "+" not in name and not any(c.isspace() for c in name)


def _utf8(text: str, what: str) -> bytes:
    # A lone surrogate has no UTF-8 form.
    try:
        return text.encode("utf-8", "strict")
    except UnicodeEncodeError:
        raise TransparencyError(f"{what} is not valid UTF-8") from None


def key_id(name: str, typed_key: bytes) -> int:
    """The signed-note key ID: the first 4 bytes (big-endian) of SHA-256(name || 0x0A || type || key)."""
    return int.from_bytes(hashlib.sha256(_utf8(name, "the key name") + b"\n" + typed_key).digest()[:4], "big")


@dataclass(frozen=True)
class VerifierKey:
    """An Ed25519 note verifier key, written `<name>+<8 hex key id>+<base64(0x01 || public key)>`."""

    name: str
    key_id: int
    public_key: bytes

    @classmethod
    def parse(cls, text: str) -> "VerifierKey":
        if not isinstance(text, str):
            raise TransparencyError("a verifier key is a string")
        parts = text.strip().split("+", 2)
        if len(parts) != 3:
            raise TransparencyError("a verifier key is <name>+<key id>+<base64 key>")
        name, hex_id, encoded = parts
        if not _valid_name(name):
            raise TransparencyError("the verifier key's name is empty or holds a space or '+'")
        _utf8(name, "the verifier key's name")
        if not _HEX8.fullmatch(hex_id):
            raise TransparencyError("the verifier key's id is not 8 hex digits")
        typed = _b64(encoded, "the verifier key")
        if len(typed) != 33 or typed[0] != ED25519:
            raise TransparencyError("the verifier key is not an Ed25519 key (type 0x01 and 32 bytes)")
        wanted = int(hex_id, 16)
        if key_id(name, typed) != wanted:
            raise TransparencyError("the verifier key's id does not match its name and key")
        return cls(name=name, key_id=wanted, public_key=typed[1:])

    def __str__(self) -> str:
        encoded = base64.b64encode(bytes([ED25519]) + self.public_key).decode("ascii")
        return f"{self.name}+{self.key_id:08x}+{encoded}"


@dataclass(frozen=True)
class NoteSignature:
    name: str
    key_id: int
    signature: bytes


@dataclass(frozen=True)
class Checkpoint:
    """A parsed C2SP tlog-checkpoint. `text` is the signed note text (ending in a newline);
    `signatures` every signature line, verified or not: only `open_checkpoint` checks them."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()
    text: str = ""
    signatures: tuple[NoteSignature, ...] = field(default_factory=tuple)


def _note_text(note: Union[str, bytes]) -> str:
    raw = _utf8(note, "the note") if isinstance(note, str) else bytes(note)
    if len(raw) > MAX_NOTE_BYTES:
        raise TransparencyError(f"the note is {len(raw)} bytes, over the {MAX_NOTE_BYTES}-byte bound")
    try:
        text = raw.decode("utf-8", "strict")
    except UnicodeDecodeError:
        raise TransparencyError("the note is not valid UTF-8") from None
    if any(ord(c) < 0x20 and c != "\n" for c in text):
        raise TransparencyError("the note holds a control character other than newline")
    return text


def parse_note(note: Union[str, bytes]) -> tuple[str, tuple[NoteSignature, ...]]:
    """Splits a signed note (C2SP signed-note) into its text (ending in a newline) and its
    signature lines, strictly, WITHOUT checking any signature."""
    text = _note_text(note)
    if not text.endswith("\n"):
        raise TransparencyError("the note does not end with a newline")
    split = text.rfind("\n\n")
    if split < 0:
        raise TransparencyError("the note has no blank line before its signatures")
    body, signature_block = text[: split + 1], text[split + 2 :]
    signatures = []
    for line in signature_block[:-1].split("\n") if signature_block else []:
        m = _SIGNATURE_LINE.fullmatch(line)
        if m is None:
            raise TransparencyError("a signature line is not '\u2014 <key name> <base64 signature>'")
        blob = _b64(m.group("sig"), f"the signature of {m.group('name')}")
        if len(blob) < 5:
            raise TransparencyError(f"the signature of {m.group('name')} is too short")
        signatures.append(NoteSignature(m.group("name"), int.from_bytes(blob[:4], "big"), blob[4:]))
    if not signatures:
        raise TransparencyError("the note has no signature lines")
    return body, tuple(signatures)


def open_note(note: Union[str, bytes], key: Union[str, VerifierKey]) -> str:
    """The text of `note` once its signature by `key` verifies. As C2SP signed-note has it,
    signatures of other keys (a witness's, a rotated key's) are ignored, and one of `key` that
    does not verify rejects the note."""
    verifier = key if isinstance(key, VerifierKey) else VerifierKey.parse(key)
    text, signatures = parse_note(note)
    message = text.encode("utf-8")
    verified = False
    for sig in signatures:
        if sig.name != verifier.name or sig.key_id != verifier.key_id:
            continue
        if len(sig.signature) != 64 or not _ed25519_verify(verifier.public_key, sig.signature, message):
            raise TransparencyError(f"the signature of {verifier.name}+{verifier.key_id:08x} does not verify")
        verified = True
    if not verified:
        raise TransparencyError(f"the note carries no signature of {verifier.name}+{verifier.key_id:08x}")
    return text


def parse_checkpoint(note: Union[str, bytes]) -> Checkpoint:
    """Parses a signed checkpoint strictly (C2SP tlog-checkpoint), WITHOUT checking any
    signature: the text of a note must not be trusted before `open_checkpoint` verified it."""
    body, signatures = parse_note(note)
    lines = body[:-1].split("\n")
    if len(lines) < 3 or any(not line for line in lines):
        raise TransparencyError("a checkpoint is at least three non-empty lines: origin, tree size, root hash")
    origin, size_line, root_line = lines[0], lines[1], lines[2]
    if not _DECIMAL.fullmatch(size_line):
        raise TransparencyError("the checkpoint's tree size is not a decimal number without leading zeros")
    size = int(size_line)
    if size > MAX_TREE_SIZE:
        raise TransparencyError(f"the checkpoint's tree size is over {MAX_TREE_SIZE}")
    root = _b64(root_line, "the checkpoint's root hash")
    if len(root) != HASH_SIZE:
        raise TransparencyError("the checkpoint's root hash is not 32 bytes")
    return Checkpoint(origin, size, root, tuple(lines[3:]), body, signatures)


def _ed25519_verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    except ImportError:
        raise ImportError(
            "checking a note's signature needs the `cryptography` package: pip install 'coresdk[verify]'"
        ) from None
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def open_checkpoint(note: Union[str, bytes], key: Union[str, VerifierKey], *, origin: str | None = None) -> Checkpoint:
    """The checkpoint of `note` once its signature by `key` verifies (see `open_note`) and its
    origin line is the key's name, as C2SP tlog-checkpoint names a log's key after its origin
    (and as `coresdk audit check-proof` requires): the signature does not cover the key name,
    so without this a signature line relabelled with another log's name would vouch for it.
    `origin`, when given, must also be the checkpoint's origin line (so one other than the
    key's name refuses every note)."""
    verifier = key if isinstance(key, VerifierKey) else VerifierKey.parse(key)
    checkpoint = parse_checkpoint(note)
    open_note(note, verifier)
    if checkpoint.origin != verifier.name:
        raise TransparencyError(
            f"the checkpoint's origin is {checkpoint.origin!r}, not the key's name {verifier.name!r}: a key of another name vouches for another log"
        )
    if origin is not None and checkpoint.origin != origin:
        raise TransparencyError(f"the checkpoint's origin is {checkpoint.origin!r}, not {origin!r}")
    return checkpoint


def _record_fields(canonical: bytes, seq: int) -> dict[str, Any]:
    """The JSON object of a record's canonical bytes, whose "seq" must be `seq`. JSON numbers
    are compared by value, as the Node client's JSON.parse sees them, so both clients agree."""
    try:
        text = bytes(canonical).decode("utf-8", "strict")
        fields = json.loads(text, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise TransparencyError("the record's canonical bytes are not JSON") from None
    if not isinstance(fields, dict):
        raise TransparencyError("the record's canonical bytes are not a JSON object")
    said = fields.get("seq")
    if isinstance(said, bool) or not isinstance(said, (int, float)) or said != seq:
        raise TransparencyError(f"the record's own seq is not the {seq} its proof is of: it was sealed somewhere else")
    return fields


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def verify_record_inclusion(canonical: bytes, seq: int, proof: Any, checkpoint: Checkpoint) -> dict[str, Any]:
    """That the audit record with `seq` and these `canonical` bytes is in the tree a checkpoint
    (from `open_checkpoint`) signs, and that the "seq" inside those bytes is `seq`. `proof` is
    an `InclusionProof` (or anything with `leaf_index`, `tree_size` and `hashes`) for that
    checkpoint's tree size.

    Returns the record as the proof covers it: the JSON object of `canonical` (`v`, `seq`,
    `time`, `tenant`, `actor`, `event`, `outcome`, `metadata`). Read the record from it: an
    `AuditRecord`'s other fields (`event`, `actor`, `tenant_id`, ...) are not covered by the
    proof."""
    seq = _size(seq, "seq")
    if seq == 0:
        raise TransparencyError("records are numbered from 1")
    if proof.leaf_index != seq - 1:
        raise TransparencyError(f"the proof is of leaf {proof.leaf_index}, not of record {seq} (leaf {seq - 1})")
    if proof.tree_size != checkpoint.size:
        raise TransparencyError(f"the proof is for a tree of {proof.tree_size} records, the checkpoint signs {checkpoint.size}")
    verify_inclusion(leaf_hash(canonical), seq - 1, checkpoint.size, proof.hashes, checkpoint.root_hash)
    return _record_fields(canonical, seq)


def verify_checkpoint_consistency(old: Checkpoint, new: Checkpoint, proof: Sequence[bytes]) -> None:
    """That checkpoint `new` extends checkpoint `old` (both from `open_checkpoint`, same origin)."""
    if old.origin != new.origin:
        raise TransparencyError(f"the checkpoints are of two logs ({old.origin!r}, {new.origin!r})")
    verify_consistency(old.size, new.size, proof, old.root_hash, new.root_hash)


__all__ = [
    "EMPTY_ROOT",
    "MAX_NOTE_BYTES",
    "MAX_PROOF_HASHES",
    "Checkpoint",
    "NoteSignature",
    "TransparencyError",
    "VerifierKey",
    "key_id",
    "leaf_hash",
    "node_hash",
    "open_checkpoint",
    "open_note",
    "parse_checkpoint",
    "parse_note",
    "root_from_inclusion_proof",
    "verify_checkpoint_consistency",
    "verify_consistency",
    "verify_inclusion",
    "verify_record_inclusion",
]
