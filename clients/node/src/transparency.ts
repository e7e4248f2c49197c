// Offline verification of the audit log's Merkle tree: C2SP tlog-checkpoint notes signed per
// C2SP signed-note (Ed25519), RFC 9162 inclusion and consistency proofs. Nothing here talks to
// the sidecar or trusts it: a verifier key obtained out of band (`coresdk audit public-key`) and
// the bytes the sidecar served are all it takes. The semantics are the Python client's
// (clients/python/src/coresdk/transparency.py): the same checks, bounds and messages.
//
// The proof algorithms are written from RFC 9162 sections 2.1.3.2 and 2.1.4.2; the note formats
// from c2sp.org/signed-note and c2sp.org/tlog-checkpoint. Ed25519 is node:crypto's.
//
// Every failure throws a TransparencyError saying what did not verify; a function that returns
// did verify.
//
// The proof covers a record's `canonical` bytes only: read what it says (event, actor, tenant,
// outcome, metadata) from what `verifyRecordInclusion` returns, not from the record's other
// fields, which the sidecar (or anyone between) could change without the proof noticing.

import { createHash, createPublicKey, verify as verifySignature, type KeyObject } from 'node:crypto';

export const HASH_SIZE = 32;
/**
 * The sidecar's bound on a cosigned checkpoint (AddCosignatures): three short lines plus
 * signature lines of 100-200 bytes each, far more than the 16 signatures signed-note asks
 * verifiers to accept at least.
 */
export const MAX_NOTE_BYTES = 16 * 1024;
/** A proof of a tree of up to 2^64 leaves has at most 64 hashes (RFC 9162 section 2.1.3.1). */
export const MAX_PROOF_HASHES = 64;
/** The largest tree size a JavaScript number holds exactly (both clients refuse more). */
export const MAX_TREE_SIZE = Number.MAX_SAFE_INTEGER;
/** The root of the empty tree: SHA-256 of nothing. */
export const EMPTY_ROOT: Buffer = createHash('sha256').digest();

const ED25519 = 0x01;
const SIGNATURE_LINE = /^\u2014 ([^\p{White_Space}+]+) ([A-Za-z0-9+/]+={0,2})$/u;
const DECIMAL = /^(0|[1-9][0-9]*)$/;
const HEX8 = /^[0-9a-fA-F]{8}$/;
const BASE64 = /^[A-Za-z0-9+/]*={0,2}$/;
// An Ed25519 public key as SPKI DER: this fixed prefix, then the 32 key bytes (RFC 8410).
const ED25519_SPKI_PREFIX = Buffer.from('302a300506032b6570032100', 'hex');

/** A note, key or proof that does not verify (or is not well formed). */
export class TransparencyError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TransparencyError';
  }
}

type Bytes = Uint8Array;

function sha256(...parts: Bytes[]): Buffer {
  const hash = createHash('sha256');
  for (const part of parts) hash.update(part);
  return hash.digest();
}

/** RFC 6962 leaf hash: SHA-256(0x00 ‖ data). An audit record's leaf data are its `canonical` bytes. */
export function leafHash(data: Bytes): Buffer {
  return sha256(Uint8Array.of(0), data);
}

/** RFC 6962 interior node hash: SHA-256(0x01 ‖ left ‖ right). */
export function nodeHash(left: Bytes, right: Bytes): Buffer {
  return sha256(Uint8Array.of(1), left, right);
}

function hashes(proof: readonly Bytes[], what: string): Buffer[] {
  if (!Array.isArray(proof)) throw new TransparencyError(`${what} is not a list of hashes`);
  if (proof.length > MAX_PROOF_HASHES) {
    throw new TransparencyError(`${what} has ${proof.length} hashes, more than the ${MAX_PROOF_HASHES} any tree needs`);
  }
  return proof.map((h, i) => {
    if (!(h instanceof Uint8Array) || h.length !== HASH_SIZE) {
      throw new TransparencyError(`${what} hash ${i} is not a ${HASH_SIZE}-byte SHA-256 value`);
    }
    return Buffer.from(h);
  });
}

function size(value: number, what: string): number {
  if (!Number.isSafeInteger(value) || value < 0) {
    throw new TransparencyError(`${what} must be an integer from 0 to ${MAX_TREE_SIZE}, not ${String(value)}`);
  }
  return value;
}

function root(value: Bytes, what: string): Buffer {
  if (!(value instanceof Uint8Array) || value.length !== HASH_SIZE) {
    throw new TransparencyError(`${what} is not a ${HASH_SIZE}-byte SHA-256 value`);
  }
  return Buffer.from(value);
}

// Tree sizes reach 2^53, past the 32 bits JavaScript's bit operators work on: these halve and
// test the low bit arithmetically instead.
const odd = (n: number): boolean => n % 2 === 1;
const half = (n: number): number => Math.floor(n / 2);
// Exact: Math.log2 rounds (log2(2^50 + 1) is 50).
const isPowerOfTwo = (n: number): boolean => {
  const b = BigInt(n);
  return b > 0n && (b & (b - 1n)) === 0n;
};

/**
 * The root that `proof` leads to from the leaf hash `leaf` at `leafIndex` in a tree of
 * `treeSize` leaves (RFC 9162 section 2.1.3.2, steps 1-5 without the final comparison).
 */
export function rootFromInclusionProof(leaf: Bytes, leafIndex: number, treeSize: number, proof: readonly Bytes[]): Buffer {
  size(leafIndex, 'leafIndex');
  size(treeSize, 'treeSize');
  const path = hashes(proof, 'the inclusion proof');
  let r = root(leaf, 'the leaf hash');
  if (leafIndex >= treeSize) throw new TransparencyError(`leaf ${leafIndex} is not in a tree of ${treeSize} leaves`);
  let fn = leafIndex;
  let sn = treeSize - 1;
  for (const p of path) {
    if (sn === 0) throw new TransparencyError('the inclusion proof is longer than the tree is deep');
    if (odd(fn) || fn === sn) {
      r = nodeHash(p, r);
      if (!odd(fn)) {
        while (fn !== 0 && !odd(fn)) {
          fn = half(fn);
          sn = half(sn);
        }
      }
    } else {
      r = nodeHash(r, p);
    }
    fn = half(fn);
    sn = half(sn);
  }
  if (sn !== 0) throw new TransparencyError('the inclusion proof is shorter than the tree is deep');
  return r;
}

/**
 * That the leaf hash `leaf` is leaf `leafIndex` of the tree of `treeSize` leaves whose root is
 * `treeRoot` (RFC 9162 section 2.1.3.2).
 */
export function verifyInclusion(leaf: Bytes, leafIndex: number, treeSize: number, proof: readonly Bytes[], treeRoot: Bytes): void {
  const wanted = root(treeRoot, 'the root');
  if (!rootFromInclusionProof(leaf, leafIndex, treeSize, proof).equals(wanted)) {
    throw new TransparencyError(`the inclusion proof of leaf ${leafIndex} does not lead to the root of the tree of ${treeSize} leaves`);
  }
}

/**
 * That the tree of `toSize` leaves with root `toRoot` extends (keeps every leaf of, in order)
 * the tree of `fromSize` leaves with root `fromRoot` (RFC 9162 section 2.1.4.2).
 */
export function verifyConsistency(fromSize: number, toSize: number, proof: readonly Bytes[], fromRoot: Bytes, toRoot: Bytes): void {
  size(fromSize, 'fromSize');
  size(toSize, 'toSize');
  let path = hashes(proof, 'the consistency proof');
  const first = root(fromRoot, 'the first root');
  const second = root(toRoot, 'the second root');
  if (fromSize > toSize) throw new TransparencyError(`a tree of ${toSize} leaves cannot extend one of ${fromSize}`);
  if (fromSize === toSize) {
    // RFC 9162: the proof between equal sizes is empty, and the roots must be the same.
    if (path.length > 0) throw new TransparencyError('a consistency proof between equal tree sizes must be empty');
    if (!first.equals(second)) throw new TransparencyError(`two different roots for the tree of ${toSize} leaves`);
    return;
  }
  if (fromSize === 0) {
    // Every tree extends the empty one, whose root is SHA-256 of nothing.
    if (path.length > 0) throw new TransparencyError('a consistency proof from the empty tree must be empty');
    if (!first.equals(EMPTY_ROOT)) throw new TransparencyError('the root of the empty tree is not SHA-256 of nothing');
    return;
  }
  if (path.length === 0) throw new TransparencyError('the consistency proof is empty');
  if (isPowerOfTwo(fromSize)) path = [first, ...path];
  let fn = fromSize - 1;
  let sn = toSize - 1;
  while (odd(fn)) {
    fn = half(fn);
    sn = half(sn);
  }
  let fr = path[0] as Buffer;
  let sr = fr;
  for (const c of path.slice(1)) {
    if (sn === 0) throw new TransparencyError('the consistency proof is longer than the tree is deep');
    if (odd(fn) || fn === sn) {
      fr = nodeHash(c, fr);
      sr = nodeHash(c, sr);
      if (!odd(fn)) {
        while (fn !== 0 && !odd(fn)) {
          fn = half(fn);
          sn = half(sn);
        }
      }
    } else {
      sr = nodeHash(sr, c);
    }
    fn = half(fn);
    sn = half(sn);
  }
  if (sn !== 0) throw new TransparencyError('the consistency proof is shorter than the trees are deep');
  if (!fr.equals(first)) throw new TransparencyError(`the consistency proof does not lead to the root of the tree of ${fromSize} leaves`);
  if (!sr.equals(second)) throw new TransparencyError(`the consistency proof does not lead to the root of the tree of ${toSize} leaves`);
}

// -- signed notes -----------------------------------------------------------------------------

/** Strict RFC 4648 section 4 base64: the standard alphabet, padded, canonical. */
function base64(text: string, what: string): Buffer {
  if (text.length % 4 !== 0 || !BASE64.test(text)) throw new TransparencyError(`${what} is not base64`);
  const raw = Buffer.from(text, 'base64');
  if (raw.toString('base64') !== text) throw new TransparencyError(`${what} is not canonical base64`);
  return raw;
}

function validName(name: string): boolean {
  // signed-note: non-empty, no Unicode spaces, no '+'.
  return name !== '' && !name.includes('+') && !/\p{White_Space}/u.test(name);
}

// A lone surrogate has no UTF-8 form (in a `u` regex a pair is one code point, never matched);
// Buffer.from would write U+FFFD in its place instead.
function utf8(text: string, what: string): Buffer {
  if (/[\uD800-\uDFFF]/u.test(text)) throw new TransparencyError(`${what} is not valid UTF-8`);
  return Buffer.from(text, 'utf8');
}

/** The signed-note key ID: the first 4 bytes (big-endian) of SHA-256(name ‖ 0x0A ‖ type ‖ key). */
export function keyId(name: string, typedKey: Bytes): number {
  return sha256(utf8(name, 'the key name'), Uint8Array.of(0x0a), typedKey).readUInt32BE(0);
}

const hex8 = (id: number): string => id.toString(16).padStart(8, '0');

/** An Ed25519 note verifier key, written `<name>+<8 hex key id>+<base64(0x01 ‖ public key)>`. */
export class VerifierKey {
  readonly #key: KeyObject;

  private constructor(
    readonly name: string,
    readonly keyId: number,
    readonly publicKey: Buffer,
  ) {
    this.#key = createPublicKey({ key: Buffer.concat([ED25519_SPKI_PREFIX, publicKey]), format: 'der', type: 'spki' });
  }

  static parse(text: string): VerifierKey {
    if (typeof text !== 'string') throw new TransparencyError('a verifier key is a string');
    const trimmed = text.trim();
    const first = trimmed.indexOf('+');
    const second = first < 0 ? -1 : trimmed.indexOf('+', first + 1);
    if (first < 0 || second < 0) throw new TransparencyError('a verifier key is <name>+<key id>+<base64 key>');
    const name = trimmed.slice(0, first);
    const hexId = trimmed.slice(first + 1, second);
    const encoded = trimmed.slice(second + 1);
    if (!validName(name)) throw new TransparencyError("the verifier key's name is empty or holds a space or '+'");
    utf8(name, "the verifier key's name");
    if (!HEX8.test(hexId)) throw new TransparencyError("the verifier key's id is not 8 hex digits");
    const typed = base64(encoded, 'the verifier key');
    if (typed.length !== 33 || typed[0] !== ED25519) {
      throw new TransparencyError('the verifier key is not an Ed25519 key (type 0x01 and 32 bytes)');
    }
    const wanted = Number.parseInt(hexId, 16);
    if (keyId(name, typed) !== wanted) throw new TransparencyError("the verifier key's id does not match its name and key");
    try {
      return new VerifierKey(name, wanted, typed.subarray(1));
    } catch {
      throw new TransparencyError('the verifier key is not an Ed25519 public key');
    }
  }

  /** Whether `signature` is this key's Ed25519 signature of `message`. */
  verifies(message: Bytes, signature: Bytes): boolean {
    try {
      return signature.length === 64 && verifySignature(null, message, this.#key, signature);
    } catch {
      return false;
    }
  }

  toString(): string {
    return `${this.name}+${hex8(this.keyId)}+${Buffer.concat([Uint8Array.of(ED25519), this.publicKey]).toString('base64')}`;
  }
}

export interface NoteSignature {
  name: string;
  keyId: number;
  signature: Buffer;
}

/**
 * A parsed C2SP tlog-checkpoint. `text` is the signed note text (ending in a newline);
 * `signatures` every signature line, verified or not: only `openCheckpoint` checks them.
 */
export interface Checkpoint {
  origin: string;
  size: number;
  rootHash: Buffer;
  extensions: string[];
  text: string;
  signatures: NoteSignature[];
}

function noteText(note: string | Bytes): string {
  let raw: Buffer;
  if (typeof note === 'string') {
    raw = utf8(note, 'the note');
  } else {
    raw = Buffer.from(note);
  }
  if (raw.length > MAX_NOTE_BYTES) throw new TransparencyError(`the note is ${raw.length} bytes, over the ${MAX_NOTE_BYTES}-byte bound`);
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(raw);
  } catch {
    throw new TransparencyError('the note is not valid UTF-8');
  }
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u0009\u000b-\u001f]/.test(text)) {
    throw new TransparencyError('the note holds a control character other than newline');
  }
  return text;
}

/**
 * Splits a signed note (C2SP signed-note) into its text (ending in a newline) and its signature
 * lines, strictly, WITHOUT checking any signature.
 */
export function parseNote(note: string | Bytes): { text: string; signatures: NoteSignature[] } {
  const text = noteText(note);
  if (!text.endsWith('\n')) throw new TransparencyError('the note does not end with a newline');
  const split = text.lastIndexOf('\n\n');
  if (split < 0) throw new TransparencyError('the note has no blank line before its signatures');
  const body = text.slice(0, split + 1);
  const block = text.slice(split + 2);
  const signatures: NoteSignature[] = [];
  for (const line of block === '' ? [] : block.slice(0, -1).split('\n')) {
    const m = SIGNATURE_LINE.exec(line);
    if (m === null) throw new TransparencyError("a signature line is not '\u2014 <key name> <base64 signature>'");
    const name = m[1] as string;
    const blob = base64(m[2] as string, `the signature of ${name}`);
    if (blob.length < 5) throw new TransparencyError(`the signature of ${name} is too short`);
    signatures.push({ name, keyId: blob.readUInt32BE(0), signature: blob.subarray(4) });
  }
  if (signatures.length === 0) throw new TransparencyError('the note has no signature lines');
  return { text: body, signatures };
}

/**
 * The text of `note` once its signature by `key` verifies. As C2SP signed-note has it,
 * signatures of other keys (a witness's, a rotated key's) are ignored, and one of `key` that
 * does not verify rejects the note.
 */
export function openNote(note: string | Bytes, key: string | VerifierKey): string {
  const verifier = typeof key === 'string' ? VerifierKey.parse(key) : key;
  const { text, signatures } = parseNote(note);
  const message = Buffer.from(text, 'utf8');
  let verified = false;
  for (const sig of signatures) {
    if (sig.name !== verifier.name || sig.keyId !== verifier.keyId) continue;
    if (!verifier.verifies(message, sig.signature)) {
      throw new TransparencyError(`the signature of ${verifier.name}+${hex8(verifier.keyId)} does not verify`);
    }
    verified = true;
  }
  if (!verified) throw new TransparencyError(`the note carries no signature of ${verifier.name}+${hex8(verifier.keyId)}`);
  return text;
}

/**
 * Parses a signed checkpoint strictly (C2SP tlog-checkpoint), WITHOUT checking any signature:
 * the text of a note must not be trusted before `openCheckpoint` verified it.
 */
export function parseCheckpoint(note: string | Bytes): Checkpoint {
  const { text, signatures } = parseNote(note);
  const lines = text.slice(0, -1).split('\n');
  if (lines.length < 3 || lines.some((line) => line === '')) {
    throw new TransparencyError('a checkpoint is at least three non-empty lines: origin, tree size, root hash');
  }
  const [origin, sizeLine, rootLine] = lines as [string, string, string];
  if (!DECIMAL.test(sizeLine)) throw new TransparencyError("the checkpoint's tree size is not a decimal number without leading zeros");
  if (BigInt(sizeLine) > BigInt(MAX_TREE_SIZE)) throw new TransparencyError(`the checkpoint's tree size is over ${MAX_TREE_SIZE}`);
  const rootHash = base64(rootLine, "the checkpoint's root hash");
  if (rootHash.length !== HASH_SIZE) throw new TransparencyError("the checkpoint's root hash is not 32 bytes");
  return { origin, size: Number(sizeLine), rootHash, extensions: lines.slice(3), text, signatures };
}

/**
 * The checkpoint of `note` once its signature by `key` verifies (see `openNote`) and its origin
 * line is the key's name, as C2SP tlog-checkpoint names a log's key after its origin (and as
 * `coresdk audit check-proof` requires): the signature does not cover the key name, so without
 * this a signature line relabelled with another log's name would vouch for it. `origin`, when
 * given, must also be the checkpoint's origin line (so one other than the key's name refuses
 * every note).
 */
export function openCheckpoint(note: string | Bytes, key: string | VerifierKey, options: { origin?: string } = {}): Checkpoint {
  const verifier = typeof key === 'string' ? VerifierKey.parse(key) : key;
  const checkpoint = parseCheckpoint(note);
  openNote(note, verifier);
  if (checkpoint.origin !== verifier.name) {
    throw new TransparencyError(
      `the checkpoint's origin is '${checkpoint.origin}', not the key's name '${verifier.name}': a key of another name vouches for another log`,
    );
  }
  if (options.origin !== undefined && checkpoint.origin !== options.origin) {
    throw new TransparencyError(`the checkpoint's origin is '${checkpoint.origin}', not '${options.origin}'`);
  }
  return checkpoint;
}

/** What `verifyRecordInclusion` needs of a proof: an `InclusionProof` has it. */
export interface InclusionProofLike {
  leafIndex: number;
  treeSize: number;
  hashes: readonly Bytes[];
}

/**
 * An audit record as its inclusion proof covers it: the JSON object of its canonical bytes
 * (`v`, `seq`, `time`, `tenant`, `actor`, `event`, `outcome`, `metadata`).
 */
export interface ProvenRecord {
  seq: number;
  [field: string]: unknown;
}

/**
 * The JSON object of a record's canonical bytes, whose "seq" must be `seq`. JSON numbers are
 * compared by value (JSON.parse's), as the Python client compares them, so both agree.
 */
function recordFields(canonical: Bytes, seq: number): ProvenRecord {
  let fields: unknown;
  try {
    fields = JSON.parse(new TextDecoder('utf-8', { fatal: true, ignoreBOM: true }).decode(canonical));
  } catch {
    throw new TransparencyError("the record's canonical bytes are not JSON");
  }
  if (fields === null || typeof fields !== 'object' || Array.isArray(fields)) {
    throw new TransparencyError("the record's canonical bytes are not a JSON object");
  }
  const said = (fields as Record<string, unknown>).seq;
  if (said !== seq) {
    throw new TransparencyError(`the record's own seq is not the ${seq} its proof is of: it was sealed somewhere else`);
  }
  return fields as ProvenRecord;
}

/**
 * That the audit record with `seq` and these `canonical` bytes is in the tree a checkpoint (from
 * `openCheckpoint`) signs, and that the "seq" inside those bytes is `seq`; `proof` is its
 * inclusion proof for that checkpoint's tree size.
 *
 * Returns the record as the proof covers it (see `ProvenRecord`). Read the record from it: an
 * `AuditRecord`'s other fields (`event`, `actor`, `tenantId`, ...) are not covered by the proof.
 */
export function verifyRecordInclusion(canonical: Bytes, seq: number, proof: InclusionProofLike, checkpoint: Checkpoint): ProvenRecord {
  size(seq, 'seq');
  if (seq === 0) throw new TransparencyError('records are numbered from 1');
  if (proof.leafIndex !== seq - 1) {
    throw new TransparencyError(`the proof is of leaf ${proof.leafIndex}, not of record ${seq} (leaf ${seq - 1})`);
  }
  if (proof.treeSize !== checkpoint.size) {
    throw new TransparencyError(`the proof is for a tree of ${proof.treeSize} records, the checkpoint signs ${checkpoint.size}`);
  }
  verifyInclusion(leafHash(canonical), seq - 1, checkpoint.size, proof.hashes, checkpoint.rootHash);
  return recordFields(canonical, seq);
}

/** That checkpoint `newer` extends checkpoint `older` (both from `openCheckpoint`, same origin). */
export function verifyCheckpointConsistency(older: Checkpoint, newer: Checkpoint, proof: readonly Bytes[]): void {
  if (older.origin !== newer.origin) {
    throw new TransparencyError(`the checkpoints are of two logs ('${older.origin}', '${newer.origin}')`);
  }
  verifyConsistency(older.size, newer.size, proof, older.rootHash, newer.rootHash);
}
