// The offline verifiers (src/transparency.ts) against published test vectors and a reference
// tree written here from RFC 6962's definitions (not the code under test), their tamper cases,
// and the proofs the mock and the real sidecar serve. The same cases as the Python client's
// tests/test_transparency.py: the two clients must agree.

import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash, generateKeyPairSync, sign as ed25519Sign } from 'node:crypto';
import { after, before, describe, test } from 'node:test';

import { ENV, Sidecar, binary, sign, stripeEvent } from '../../../tests/openfeature-node/sidecar.mjs';
import {
  EMPTY_ROOT,
  GrpcCode,
  MAX_NOTE_BYTES,
  MockSidecar,
  ProblemError,
  TransparencyError,
  VerifierKey,
  keyId,
  leafHash,
  makeSettings,
  openCheckpoint,
  openNote,
  parseCheckpoint,
  rootFromInclusionProof,
  verifyCheckpointConsistency,
  verifyConsistency,
  verifyInclusion,
  verifyRecordInclusion,
} from '../dist/index.js';
import { auditRecordFromProto, webhookResultFromProto } from '../dist/wire.js';
import { clientFor } from './helpers.mjs';
import { BACKENDS } from './web.mjs';

// -- a reference tree, written from RFC 6962 section 2.1 -----------------------------------------

const h = (...parts) => {
  const hash = createHash('sha256');
  for (const part of parts) hash.update(part);
  return hash.digest();
};
const split = (n) => {
  let k = 1;
  while (k * 2 < n) k *= 2;
  return k;
};

function refRoot(leaves) {
  if (leaves.length === 0) return h(Buffer.alloc(0));
  if (leaves.length === 1) return h(Buffer.of(0), leaves[0]);
  const k = split(leaves.length);
  return h(Buffer.of(1), refRoot(leaves.slice(0, k)), refRoot(leaves.slice(k)));
}

function refPath(m, leaves) {
  if (leaves.length <= 1) return [];
  const k = split(leaves.length);
  if (m < k) return [...refPath(m, leaves.slice(0, k)), refRoot(leaves.slice(k))];
  return [...refPath(m - k, leaves.slice(k)), refRoot(leaves.slice(0, k))];
}

function refSubproof(m, leaves, b) {
  const n = leaves.length;
  if (m === n) return b ? [] : [refRoot(leaves)];
  const k = split(n);
  if (m <= k) return [...refSubproof(m, leaves.slice(0, k), b), refRoot(leaves.slice(k))];
  return [...refSubproof(m - k, leaves.slice(k), false), refRoot(leaves.slice(0, k))];
}

const refConsistency = (m, leaves) => (m === 0 || m === leaves.length ? [] : refSubproof(m, leaves, true));

// -- RFC 6962 test vectors ------------------------------------------------------------------------
// transparency-dev/merkle testonly/constants.go (LeafInputs, RootHashes) and
// testonly/reference_test.go (TestRefInclusionProof, TestRefConsistencyProof), the vectors of
// certificate-transparency's merkle tests.

const hex = (s) => Buffer.from(s, 'hex');
const LEAVES = ['', '00', '10', '2021', '3031', '40414243', '5051525354555657', '606162636465666768696a6b6c6d6e6f'].map(hex);
const ROOTS = [
  'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855',
  '6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d',
  'fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125',
  'aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77',
  'd37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7',
  '4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4',
  '76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef',
  'ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c',
  '5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328',
].map(hex);
const INCLUSION = [
  [0, 1, []],
  [0, 2, ['96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7']],
  [1, 2, ['6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d']],
  [2, 3, ['fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125']],
  [
    1,
    5,
    [
      '6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d',
      '5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e',
      'bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b',
    ],
  ],
  [
    0,
    8,
    [
      '96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7',
      '5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e',
      '6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4',
    ],
  ],
  [
    5,
    8,
    [
      'bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b',
      'ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0',
      'd37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7',
    ],
  ],
];
const CONSISTENCY = [
  [1, 1, []],
  [
    1,
    8,
    [
      '96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7',
      '5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e',
      '6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4',
    ],
  ],
  [
    2,
    5,
    ['5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e', 'bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b'],
  ],
  [
    6,
    8,
    [
      '0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a',
      'ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0',
      'd37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7',
    ],
  ],
];

const flip = (b) => Buffer.concat([Buffer.of(b[0] ^ 1), b.subarray(1)]);
const refused = (name, call) => assert.throws(call, TransparencyError, name);

describe('RFC 9162 proofs', () => {
  test('the reference tree reproduces the published vectors', () => {
    ROOTS.forEach((root, size) => assert.deepEqual(refRoot(LEAVES.slice(0, size)), root));
    for (const [index, size, path] of INCLUSION) assert.deepEqual(refPath(index, LEAVES.slice(0, size)), path.map(hex));
    for (const [m, n, path] of CONSISTENCY) assert.deepEqual(refConsistency(m, LEAVES.slice(0, n)), path.map(hex));
    assert.deepEqual(EMPTY_ROOT, ROOTS[0]);
  });

  test('the inclusion vectors verify', () => {
    for (const [index, size, path] of INCLUSION) {
      verifyInclusion(leafHash(LEAVES[index]), index, size, path.map(hex), ROOTS[size]);
      assert.deepEqual(rootFromInclusionProof(leafHash(LEAVES[index]), index, size, path.map(hex)), ROOTS[size]);
    }
  });

  test('the consistency vectors verify', () => {
    for (const [m, n, path] of CONSISTENCY) verifyConsistency(m, n, path.map(hex), ROOTS[m], ROOTS[n]);
  });

  test('inclusion tampering is detected', () => {
    const proof = refPath(5, LEAVES);
    const leaf = leafHash(LEAVES[5]);
    verifyInclusion(leaf, 5, 8, proof, ROOTS[8]);
    const cases = {
      'altered record': [leafHash(Buffer.concat([LEAVES[5], Buffer.from('!')])), 5, 8, proof, ROOTS[8]],
      'altered hash': [leaf, 5, 8, [proof[0], flip(proof[1]), proof[2]], ROOTS[8]],
      'wrong index': [leaf, 4, 8, proof, ROOTS[8]],
      // The path of leaf 5 has the same shape in 7 leaves as in 8: the root tells them apart.
      'wrong size': [leaf, 5, 7, proof, ROOTS[7]],
      'wrong root': [leaf, 5, 8, proof, ROOTS[7]],
      truncated: [leaf, 5, 8, proof.slice(0, -1), ROOTS[8]],
      extended: [leaf, 5, 8, [...proof, ROOTS[1]], ROOTS[8]],
      reordered: [leaf, 5, 8, [proof[1], proof[0], proof[2]], ROOTS[8]],
      'index past the tree': [leaf, 8, 8, proof, ROOTS[8]],
      'a short hash': [leaf, 5, 8, [proof[0].subarray(0, 31), proof[1], proof[2]], ROOTS[8]],
    };
    for (const [name, args] of Object.entries(cases)) refused(name, () => verifyInclusion(...args));
  });

  test('consistency tampering is detected', () => {
    const proof = refConsistency(6, LEAVES);
    verifyConsistency(6, 8, proof, ROOTS[6], ROOTS[8]);
    const cases = {
      'altered hash': [6, 8, [proof[0], flip(proof[1]), proof[2]], ROOTS[6], ROOTS[8]],
      'old root of another tree': [6, 8, proof, ROOTS[5], ROOTS[8]],
      'new root of another tree': [6, 8, proof, ROOTS[6], ROOTS[7]],
      'wrong old size': [5, 8, proof, ROOTS[6], ROOTS[8]],
      'wrong new size': [6, 7, proof, ROOTS[6], ROOTS[7]],
      truncated: [6, 8, proof.slice(0, -1), ROOTS[6], ROOTS[8]],
      extended: [6, 8, [...proof, ROOTS[1]], ROOTS[6], ROOTS[8]],
      empty: [6, 8, [], ROOTS[6], ROOTS[8]],
      shrinking: [8, 6, proof, ROOTS[8], ROOTS[6]],
      'equal sizes, different roots': [8, 8, [], ROOTS[7], ROOTS[8]],
      'equal sizes, a proof': [8, 8, [ROOTS[1]], ROOTS[8], ROOTS[8]],
      'from the empty tree, a proof': [0, 8, [ROOTS[1]], ROOTS[0], ROOTS[8]],
      'from the empty tree, not its root': [0, 8, [], ROOTS[1], ROOTS[8]],
    };
    for (const [name, args] of Object.entries(cases)) refused(name, () => verifyConsistency(...args));
    verifyConsistency(0, 8, [], ROOTS[0], ROOTS[8]);
    verifyConsistency(8, 8, [], ROOTS[8], ROOTS[8]);
  });

  test('random trees up to 2000 leaves', () => {
    // A seeded generator (mulberry32), so a failure can be replayed.
    let seed = 14;
    const random = () => {
      seed = (seed + 0x6d2b79f5) | 0;
      let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
      t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
    const below = (n) => Math.floor(random() * n);
    const leaves = Array.from({ length: 2000 }, () => Buffer.from(Array.from({ length: below(40) }, () => below(256))));
    const roots = new Map();
    const rootOf = (n) => roots.get(n) ?? roots.set(n, refRoot(leaves.slice(0, n))).get(n);
    for (let round = 0; round < 60; round += 1) {
      const n = 1 + below(2000);
      for (const m of new Set([0, n - 1, below(n)])) {
        const proof = refPath(m, leaves.slice(0, n));
        verifyInclusion(leafHash(leaves[m]), m, n, proof, rootOf(n));
        refused('altered leaf', () => verifyInclusion(leafHash(Buffer.concat([leaves[m], Buffer.from('x')])), m, n, proof, rootOf(n)));
        if (n > 1) refused('other index', () => verifyInclusion(leafHash(leaves[m]), (m + 1) % n, n, proof, rootOf(n)));
      }
      const old = 1 + below(n);
      const proof = refConsistency(old, leaves.slice(0, n));
      verifyConsistency(old, n, proof, rootOf(old), rootOf(n));
      if (old < n) {
        refused('not the old root', () => verifyConsistency(old, n, proof, leafHash(Buffer.from('not the root')), rootOf(n)));
        refused('altered hash', () => verifyConsistency(old, n, [flip(proof[0]), ...proof.slice(1)], rootOf(old), rootOf(n)));
      }
    }
  });

  test('the power-of-two test is exact at large sizes', () => {
    // 2^50 + 1 is no power of two, though Math.log2 rounds it to 50.
    const m = 2 ** 50 + 1;
    const [a, x, y] = ['a', 'x', 'y'].map((c) => h(Buffer.from(c)));
    // MTH(D[0:2^50]) = a; leaves 2^50 and 2^50 + 1 hash to x and y.
    const oldRoot = h(Buffer.of(1), a, x);
    const newRoot = h(Buffer.of(1), a, h(Buffer.of(1), x, y));
    verifyConsistency(m, m + 1, [x, y, a], oldRoot, newRoot);
    refused('another root', () => verifyConsistency(m, m + 1, [x, y, a], oldRoot, flip(newRoot)));
  });

  test('proofs are bounded', () => {
    assert.throws(() => verifyInclusion(leafHash(Buffer.alloc(0)), 0, 2 ** 53 - 1, Array(65).fill(ROOTS[1]), ROOTS[1]), /more than the 64/);
    assert.throws(() => verifyConsistency(1, 2 ** 53 - 1, Array(65).fill(ROOTS[1]), ROOTS[1], ROOTS[1]), /more than the 64/);
    refused('a size past 2^53', () => verifyInclusion(leafHash(Buffer.alloc(0)), 0, 2 ** 64, [], ROOTS[1]));
  });
});

// -- signed notes: Go's sumdb/note test vectors (golang.org/x/mod, sumdb/note/note_test.go) ------

const PETER = 'PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW';
const ENOCH = 'EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop';
const TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n";
const PETER_SIG = '\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n';
const ENOCH_SIG = '\u2014 EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n';

describe('signed notes', () => {
  test("Go's note vectors open", () => {
    assert.equal(openNote(`${TEXT}\n${PETER_SIG}`, PETER), TEXT);
    // Another key's signature (a witness's) is ignored; each key finds its own.
    assert.equal(openNote(`${TEXT}\n${PETER_SIG}${ENOCH_SIG}`, PETER), TEXT);
    assert.equal(openNote(`${TEXT}\n${PETER_SIG}${ENOCH_SIG}`, ENOCH), TEXT);
    assert.equal(VerifierKey.parse(PETER).toString(), PETER);
  });

  test("Go's note vectors refused", () => {
    assert.throws(() => openNote(`${TEXT}\n${PETER_SIG}`, ENOCH), /no signature of EnochRoot/);
    assert.throws(() => openNote(`${TEXT.replace('cryptography', 'cryptographY')}\n${PETER_SIG}`, PETER), /does not verify/);
    assert.throws(() => openNote(`${TEXT}\n${PETER_SIG.slice(0, 60)}ABCD${PETER_SIG.slice(60)}`, PETER), /does not verify/);
    // Go's malformed notes (TestOpen's badMsgs).
    for (const bad of [
      TEXT,
      `${TEXT}\n`,
      `${TEXT}\n${PETER_SIG.slice(0, -1)}`,
      `\x01${TEXT}\n${PETER_SIG}`,
      `${TEXT}\n\u2014 Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=`,
      `${TEXT}\n${PETER_SIG}Unexpected line.\n`,
    ]) {
      refused(JSON.stringify(bad), () => openNote(bad, PETER));
    }
    assert.throws(() => openNote(Buffer.concat([Buffer.of(0xff), Buffer.from(`${TEXT}\n${PETER_SIG}`)]), PETER), /UTF-8/);
    assert.throws(() => openNote(`\ud800${TEXT}\n${PETER_SIG}`, PETER), /UTF-8/);
  });

  test("Go's verifier key manglings are refused", () => {
    // Go's TestNewVerifier: every proper substring and every byte changed by one is refused.
    const raw = Buffer.from(PETER);
    for (let i = 0; i <= raw.length; i += 1) {
      for (let j = i + 1; j <= raw.length; j += 1) {
        if (i !== 0 || j !== raw.length) refused(`substring ${i}..${j}`, () => VerifierKey.parse(raw.subarray(i, j).toString()));
      }
    }
    for (let i = 0; i < raw.length; i += 1) {
      const mangled = Buffer.from(raw);
      mangled[i] += 1;
      refused(`byte ${i}`, () => VerifierKey.parse(mangled.toString()));
    }
    refused('wrong length', () => VerifierKey.parse('PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY=='));
    refused('unknown algorithm', () => VerifierKey.parse('PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW'));
  });
});

// -- checkpoints ----------------------------------------------------------------------------------

/** A checkpoint signer written here from the C2SP specs, with node:crypto's Ed25519. */
class Log {
  constructor(name = 'example.com/log') {
    this.name = name;
    const { privateKey, publicKey } = generateKeyPairSync('ed25519');
    this.key = privateKey;
    const typed = Buffer.concat([Buffer.of(1), Buffer.from(publicKey.export({ format: 'jwk' }).x, 'base64url')]);
    this.keyId = h(Buffer.from(`${name}\n`), typed).subarray(0, 4);
    this.vkey = `${name}+${this.keyId.toString('hex')}+${typed.toString('base64')}`;
  }

  sign(text) {
    const signature = Buffer.concat([this.keyId, ed25519Sign(null, Buffer.from(text), this.key)]).toString('base64');
    return `${text}\n\u2014 ${this.name} ${signature}\n`;
  }

  checkpoint(size, root, extra = '') {
    return this.sign(`${this.name}\n${size}\n${root.toString('base64')}\n${extra}`);
  }
}

/** A record's canonical bytes (RFC 8785: sorted keys, no spaces), as the sidecar seals them. */
function canonical(seq, event) {
  const fields = { actor: 'u1', event, metadata: {}, outcome: 'ok', seq, tenant: 'acme', time: '2026-01-01T00:00:00.000Z', v: 1 };
  return Buffer.from(JSON.stringify(fields));
}
const RECORDS = Array.from({ length: 8 }, (_, i) => canonical(i + 1, `app.e${i + 1}`));

describe('checkpoints', () => {
  test('the c2sp.org/tlog-checkpoint example parses (its key is not published: parsed, not opened)', () => {
    const root = 'CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=';
    const text = `example.com/behind-the-sofa\n20852163\n${root}\n`;
    const checkpoint = parseCheckpoint(
      `${text}\n\u2014 example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URYN7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n`,
    );
    assert.deepEqual([checkpoint.origin, checkpoint.size, checkpoint.extensions, checkpoint.text], ['example.com/behind-the-sofa', 20852163, [], text]);
    assert.deepEqual(checkpoint.rootHash, Buffer.from(root, 'base64'));
    assert.deepEqual(
      checkpoint.signatures.map((s) => [s.name, s.keyId, s.signature.length]),
      [['example.com/behind-the-sofa', 0x033de0ae, 64]],
    );
  });

  test('checkpoints open and prove records', () => {
    const log = new Log();
    const checkpoint = openCheckpoint(log.checkpoint(8, refRoot(RECORDS)), log.vkey, { origin: log.name });
    assert.deepEqual([checkpoint.origin, checkpoint.size, checkpoint.rootHash], [log.name, 8, refRoot(RECORDS)]);
    const proof = { leafIndex: 5, treeSize: 8, hashes: refPath(5, RECORDS), checkpoint: '' };
    const proven = verifyRecordInclusion(RECORDS[5], 6, proof, checkpoint);
    // What the proof covers, read from the verified bytes.
    assert.deepEqual([proven.seq, proven.event, proven.tenant, proven.actor], [6, 'app.e6', 'acme', 'u1']);
    refused('altered record', () => verifyRecordInclusion(Buffer.concat([RECORDS[5], Buffer.from(' ')]), 6, proof, checkpoint));
    assert.throws(() => verifyRecordInclusion(RECORDS[4], 5, proof, checkpoint), /not of record 5/);
    const checkpoint8 = openCheckpoint(log.checkpoint(8, ROOTS[8]), log.vkey);
    const old = openCheckpoint(log.checkpoint(6, ROOTS[6]), log.vkey);
    verifyCheckpointConsistency(old, checkpoint8, refConsistency(6, LEAVES));
    refused('the proof from 5', () => verifyCheckpointConsistency(old, checkpoint8, refConsistency(5, LEAVES)));
    // Extension lines are allowed, and signed.
    assert.deepEqual(openCheckpoint(log.checkpoint(8, ROOTS[8], 'ext\n'), log.vkey).extensions, ['ext']);
  });

  test('a record proven must say the seq it is proven at', () => {
    // Leaf 5 of this tree is a record that says it is record 7: its bytes are in the signed
    // tree, but not as what they claim to be.
    const log = new Log();
    const seven = [...RECORDS.slice(0, 5), canonical(7, 'app.e7'), ...RECORDS.slice(6)];
    const checkpoint = openCheckpoint(log.checkpoint(8, refRoot(seven)), log.vkey);
    const proof = { leafIndex: 5, treeSize: 8, hashes: refPath(5, seven), checkpoint: '' };
    verifyInclusion(leafHash(seven[5]), 5, 8, proof.hashes, checkpoint.rootHash);
    assert.throws(() => verifyRecordInclusion(seven[5], 6, proof, checkpoint), /own seq is not the 6/);
    // Leaves that are not a JSON object with a seq are no audit records.
    for (const leaf of ['not json', '[6]', '{"v":1}', '{"seq":"6"}', '{"seq":true}', '{"seq":NaN}', '\ufeff{"seq":6}']) {
      const leaves = [...RECORDS.slice(0, 5), Buffer.from(leaf), ...RECORDS.slice(6)];
      const opened = openCheckpoint(log.checkpoint(8, refRoot(leaves)), log.vkey);
      const leafProof = { leafIndex: 5, treeSize: 8, hashes: refPath(5, leaves), checkpoint: '' };
      refused(leaf, () => verifyRecordInclusion(leaves[5], 6, leafProof, opened));
    }
  });

  test('a checkpoint must name the log of its key', () => {
    // The key signs the note text, not its own name: a note of another origin signed by this
    // key (or a signature line relabelled onto another log's note) must not open as that log's.
    const log = new Log();
    const other = log.sign(`example.com/other\n8\n${ROOTS[8].toString('base64')}\n`);
    assert.throws(() => openCheckpoint(other, log.vkey), /not the key's name/);
    assert.throws(() => openCheckpoint(other, log.vkey, { origin: 'example.com/other' }), /not the key's name/);
    // An origin asked for other than the key's name refuses even the key's own checkpoints.
    assert.throws(() => openCheckpoint(log.checkpoint(8, ROOTS[8]), log.vkey, { origin: 'example.com/other' }), /origin/);
  });

  test('lone surrogates are refused as not UTF-8', () => {
    const log = new Log();
    const note = log.checkpoint(8, ROOTS[8]);
    assert.throws(() => openCheckpoint(note.replace('example.com', 'example\ud800.com'), log.vkey), /not valid UTF-8/);
    assert.throws(() => VerifierKey.parse(`log\udc00${log.vkey.slice(log.name.length)}`), /not valid UTF-8/);
    assert.throws(() => keyId('log\ud800', Buffer.alloc(33, 1)), /not valid UTF-8/);
  });

  test('forged and malformed checkpoints are refused', () => {
    const log = new Log();
    const note = log.checkpoint(8, ROOTS[8]);
    const root = ROOTS[8].toString('base64');
    assert.throws(() => openCheckpoint(note, new Log().vkey), /no signature of/);
    // The same name with another key: a forgery, whose key id does not match.
    assert.throws(() => openCheckpoint(new Log(log.name).checkpoint(8, ROOTS[8]), log.vkey), /no signature of/);
    // A signature line of the right key id over another tree.
    assert.throws(() => openCheckpoint(note.replace('\n8\n', '\n9\n'), log.vkey), /does not verify/);
    assert.throws(() => openCheckpoint(note, log.vkey, { origin: 'example.com/other' }), /origin/);
    const badBodies = {
      'two lines': `${log.name}\n8\n`,
      'leading zero': `${log.name}\n08\n${root}\n`,
      negative: `${log.name}\n-8\n${root}\n`,
      'size too large': `${log.name}\n${2 ** 53}\n${root}\n`,
      'short root': `${log.name}\n8\n${ROOTS[8].subarray(0, 31).toString('base64')}\n`,
      'unpadded root': `${log.name}\n8\n${root.replace(/=+$/, '')}\n`,
      'empty extension line': `${log.name}\n8\n${root}\n\next\n`,
      'empty origin': `\n8\n${root}\n`,
      'carriage return': `${log.name}\r\n8\n${root}\n`,
      tab: `${log.name}\t\n8\n${root}\n`,
    };
    for (const [name, body] of Object.entries(badBodies)) refused(name, () => openCheckpoint(log.sign(body), log.vkey));
    assert.throws(() => parseCheckpoint(log.checkpoint(8, ROOTS[8], `${'x'.repeat(MAX_NOTE_BYTES)}\n`)), /bytes, over/);
  });
});

describe('the two clients agree', () => {
  /** Runs Python's coresdk.transparency on `cases`: 'ok' or 'refused' for each. */
  function pythonVerdicts(cases) {
    const python = process.env.CORESDK_TEST_PYTHON;
    assert.ok(python, "CORESDK_TEST_PYTHON is not set: this test runs the Python client's verifiers (./scripts/test sets it)");
    const script = [
      'import base64, json, sys, types',
      'from coresdk import transparency as t',
      'def run(case):',
      '    b = lambda xs: [base64.b64decode(x) for x in xs]',
      '    kind, a = case["kind"], case["args"]',
      '    if kind == "checkpoint": t.open_checkpoint(a[0], a[1])',
      '    elif kind == "note": t.open_note(a[0], a[1])',
      '    elif kind == "key": t.VerifierKey.parse(a[0])',
      '    elif kind == "record": t.verify_record_inclusion(base64.b64decode(a[0]), a[1], types.SimpleNamespace(leaf_index=a[2], tree_size=a[3], hashes=b(a[4])), t.open_checkpoint(a[5], a[6]))',
      '    elif kind == "inclusion": t.verify_inclusion(base64.b64decode(a[0]), a[1], a[2], b(a[3]), base64.b64decode(a[4]))',
      '    else: t.verify_consistency(a[0], a[1], b(a[2]), base64.b64decode(a[3]), base64.b64decode(a[4]))',
      'out = []',
      'for case in json.load(sys.stdin):',
      '    try:',
      '        run(case); out.append("ok")',
      '    except t.TransparencyError:',
      '        out.append("refused")',
      'print(json.dumps(out))',
    ].join('\n');
    const run = spawnSync(python, ['-c', script], { input: JSON.stringify(cases), encoding: 'utf8', timeout: 60_000 });
    assert.equal(run.status, 0, run.stderr);
    return JSON.parse(run.stdout);
  }

  function nodeVerdict({ kind, args: a }) {
    const b = (xs) => xs.map((x) => Buffer.from(x, 'base64'));
    try {
      if (kind === 'checkpoint') openCheckpoint(a[0], a[1]);
      else if (kind === 'note') openNote(a[0], a[1]);
      else if (kind === 'key') VerifierKey.parse(a[0]);
      else if (kind === 'record') {
        const proof = { leafIndex: a[2], treeSize: a[3], hashes: b(a[4]) };
        verifyRecordInclusion(Buffer.from(a[0], 'base64'), a[1], proof, openCheckpoint(a[5], a[6]));
      } else if (kind === 'inclusion') verifyInclusion(Buffer.from(a[0], 'base64'), a[1], a[2], b(a[3]), Buffer.from(a[4], 'base64'));
      else verifyConsistency(a[0], a[1], b(a[2]), Buffer.from(a[3], 'base64'), Buffer.from(a[4], 'base64'));
      return 'ok';
    } catch (error) {
      if (error instanceof TransparencyError) return 'refused';
      throw error;
    }
  }

  test("the Python client's verifiers decide every case as these do", () => {
    const log = new Log();
    const note = log.checkpoint(8, ROOTS[8]);
    const root = ROOTS[8].toString('base64');
    const b64 = (xs) => xs.map((x) => x.toString('base64'));
    const cases = [
      { kind: 'checkpoint', args: [note, log.vkey] },
      { kind: 'checkpoint', args: [log.checkpoint(8, ROOTS[8], 'ext\n'), log.vkey] },
      { kind: 'checkpoint', args: [note.replace('\n8\n', '\n9\n'), log.vkey] },
      { kind: 'checkpoint', args: [note, new Log().vkey] },
      { kind: 'checkpoint', args: [new Log(log.name).checkpoint(8, ROOTS[8]), log.vkey] },
      { kind: 'checkpoint', args: [log.checkpoint(8, ROOTS[8], `${'x'.repeat(MAX_NOTE_BYTES)}\n`), log.vkey] },
      { kind: 'checkpoint', args: [`${note}\u2014 witness.example/w ${Buffer.alloc(68, 7).toString('base64')}\n`, log.vkey] },
      { kind: 'checkpoint', args: [log.checkpoint(2 ** 53 - 1, ROOTS[8]), log.vkey] },
      // Signed by the key, but of another log's origin.
      { kind: 'checkpoint', args: [log.sign(`example.com/other\n8\n${root}\n`), log.vkey] },
      ...[
        `${log.name}\n8\n`,
        `${log.name}\n08\n${root}\n`,
        `${log.name}\n-8\n${root}\n`,
        `${log.name}\n${2 ** 53}\n${root}\n`,
        `${log.name}\n8\n${root.replace(/=+$/, '')}\n`,
        `${log.name}\n8\n${root}\n\next\n`,
        `\n8\n${root}\n`,
        `${log.name}\r\n8\n${root}\n`,
        `${log.name}\u00a0x\n8\n${root}\n`,
        `${log.name}\n8\n${root.replace('A', '-')}\n`,
      ].map((body) => ({ kind: 'checkpoint', args: [log.sign(body), log.vkey] })),
      { kind: 'note', args: [`${TEXT}\n${PETER_SIG}${ENOCH_SIG}`, PETER] },
      { kind: 'note', args: [`${TEXT}\n${PETER_SIG}${ENOCH_SIG}`, ENOCH] },
      { kind: 'note', args: [`${TEXT}\n${PETER_SIG}`, ENOCH] },
      { kind: 'note', args: [`${TEXT}\n${PETER_SIG}Unexpected line.\n`, PETER] },
      { kind: 'note', args: [`${TEXT}\n\u2014 PeterNeumann\u2003x ${PETER_SIG.split(' ')[2]}`, PETER] },
      { kind: 'key', args: [PETER] },
      { kind: 'key', args: [` ${PETER}\n`] },
      { kind: 'key', args: [PETER.replace('c74f20a3', 'C74F20A3')] },
      { kind: 'key', args: [PETER.replace('+c74f', '+0xc74f')] },
      { kind: 'key', args: [`Peter\u2003Neumann${PETER.slice('PeterNeumann'.length)}`] },
    ];
    // Records whose own seq is, or is not, the one proven.
    for (const leaf of ['{"seq":6}', '{"seq":6.0}', '{"seq":7}', '{"seq":"6"}', '{"seq":true}', '[6]', 'x', '{"seq":6,"seq":5}']) {
      const leaves = [...RECORDS.slice(0, 5), Buffer.from(leaf), ...RECORDS.slice(6)];
      const note = log.checkpoint(8, refRoot(leaves));
      cases.push({ kind: 'record', args: [Buffer.from(leaf).toString('base64'), 6, 5, 8, b64(refPath(5, leaves)), note, log.vkey] });
    }
    // Proofs of random trees, each also with one hash flipped.
    const leaves = Array.from({ length: 70 }, (_, i) => Buffer.from(`leaf ${i}`));
    for (let n = 1; n <= 70; n += 3) {
      const m = (n * 7) % n;
      const proof = refPath(m, leaves.slice(0, n));
      const args = [b64([leafHash(leaves[m])])[0], m, n, b64(proof), refRoot(leaves.slice(0, n)).toString('base64')];
      cases.push({ kind: 'inclusion', args });
      if (proof.length > 0) cases.push({ kind: 'inclusion', args: [...args.slice(0, 3), b64([flip(proof[0]), ...proof.slice(1)]), args[4]] });
      cases.push({ kind: 'inclusion', args: [args[0], m, n + 1, args[3], args[4]] });
      const old = 1 + ((n * 5) % n);
      const consistency = refConsistency(old, leaves.slice(0, n));
      const cargs = [old, n, b64(consistency), refRoot(leaves.slice(0, old)).toString('base64'), args[4]];
      cases.push({ kind: 'consistency', args: cargs });
      if (consistency.length > 0) cases.push({ kind: 'consistency', args: [old, n, b64([...consistency.slice(1), consistency[0]]), cargs[3], cargs[4]] });
    }
    const ours = cases.map(nodeVerdict);
    assert.ok(ours.includes('ok') && ours.includes('refused'));
    const theirs = pythonVerdicts(cases);
    cases.forEach((c, i) => assert.equal(theirs[i], ours[i], `case ${i} (${c.kind}): ${JSON.stringify(c.args).slice(0, 200)}`));
  });
});

// -- the mock and the real sidecar ----------------------------------------------------------------

function mock() {
  return new MockSidecar(makeSettings({ useMock: true, problemTypeBase: ENV.CORESDK_PROBLEM_TYPE_BASE }), ENV);
}

async function appendRecords(sdk, count) {
  const out = [];
  for (let i = 0; i < count; i += 1) out.push(await sdk.audit({ event: `app.proof.${i}`, outcome: 'ok', actor: 'prover', metadata: { i } }));
  return out;
}

async function refusedCall(call) {
  try {
    await call();
  } catch (error) {
    assert.ok(error instanceof ProblemError, String(error));
    return error;
  }
  assert.fail('the call succeeded');
}

/** What both the mock and the real sidecar must answer alike. */
function defineProofSuite(name, start) {
  describe(`proofs of explicit sizes (${name})`, () => {
    let sdk;
    let close;
    before(async () => ({ sdk, close } = await start()));
    after(async () => close());

    test('explicit size proofs verify offline', async () => {
      const head = (await appendRecords(sdk, 12)).at(-1).seq;
      const records = new Map((await sdk.auditQuery({ limit: 1000 })).map((r) => [r.seq, r]));
      const leaves = Array.from({ length: head }, (_, i) => records.get(i + 1).canonical);
      for (const size of [1, 2, 5, 8, head - 1, head]) {
        const root = refRoot(leaves.slice(0, size));
        for (const seq of new Set([1, size, Math.floor((size + 1) / 2)])) {
          const proof = await sdk.auditInclusionProof(seq, size);
          assert.deepEqual([proof.leafIndex, proof.treeSize, proof.checkpoint], [seq - 1, size, '']);
          assert.deepEqual(proof.hashes, refPath(seq - 1, leaves.slice(0, size)));
          verifyInclusion(leafHash(records.get(seq).canonical), seq - 1, size, proof.hashes, root);
        }
        for (const old of [0, 1, 3, size]) {
          if (old > size) continue;
          const c = await sdk.auditConsistencyProof(old, size);
          assert.deepEqual([c.fromSize, c.toSize], [old, size]);
          assert.deepEqual(c.hashes, refConsistency(old, leaves.slice(0, size)));
          verifyConsistency(old, size, c.hashes, refRoot(leaves.slice(0, old)), root);
        }
      }
      const verified = await sdk.auditVerify({ full: true });
      assert.ok(verified.ok);
      assert.equal(verified.headSeq, head);
    });

    test('proof requests are refused as the sidecar refuses them', async () => {
      const head = (await appendRecords(sdk, 3)).at(-1).seq;
      let e = await refusedCall(() => sdk.auditInclusionProof(0, head));
      assert.deepEqual([e.problem.status, e.problem.reason], [400, 'INVALID_ARGUMENT']);
      assert.match(e.problem.detail, /seq: is required/);
      e = await refusedCall(() => sdk.auditInclusionProof(3, 2));
      assert.deepEqual([e.problem.status, e.problem.reason], [400, 'INVALID_ARGUMENT']);
      assert.match(e.problem.detail, /tree_size: is 2, smaller than the seq 3/);
      e = await refusedCall(() => sdk.auditInclusionProof(1, head + 1));
      assert.deepEqual([e.problem.status, e.problem.reason, e.code], [400, 'OUT_OF_RANGE', GrpcCode.OUT_OF_RANGE]);
      assert.ok(e.problem.detail.includes(`holds ${head} records, fewer than the tree size ${head + 1}`), e.problem.detail);
      e = await refusedCall(() => sdk.auditConsistencyProof(3, 2));
      assert.deepEqual([e.problem.status, e.problem.reason], [400, 'INVALID_ARGUMENT']);
      assert.match(e.problem.detail, /from_size: is 3, larger than to_size 2/);
      e = await refusedCall(() => sdk.auditConsistencyProof(1, head + 5));
      assert.deepEqual([e.problem.status, e.problem.reason], [400, 'OUT_OF_RANGE']);
    });
  });
}

for (const [name, start] of Object.entries(BACKENDS)) defineProofSuite(name, start);

describe('answers without their proof', () => {
  test('an answer without its proof is a stored record', () => {
    // The sidecar answers includeProof without inclusionProof when no checkpoint covered the
    // record in time: the record is stored, and the answer is a success, not an error.
    const wire = {
      seq: 3,
      time: null,
      tenantId: '',
      actor: 'a',
      event: 'app.x',
      outcome: 'ok',
      metadata: null,
      prevHash: '',
      hash: '',
      canonical: Buffer.from('{}'),
      inclusionProof: null,
    };
    const record = auditRecordFromProto(wire);
    assert.deepEqual([record.seq, record.inclusionProof], [3, undefined]);
    const result = webhookResultFromProto({
      eventId: 'evt_1',
      eventType: 'invoice.paid',
      tenantId: '',
      outcome: 'WEBHOOK_OUTCOME_APPLIED',
      flagChanges: [],
      auditSeq: 3,
      staleFlags: [],
      inclusionProof: null,
    });
    assert.deepEqual([result.auditSeq, result.inclusionProof], [3, undefined]);
    const proven = auditRecordFromProto({ ...wire, inclusionProof: { leafIndex: 2, treeSize: 3, hashes: [], checkpoint: '' } });
    assert.equal(proven.inclusionProof.leafIndex, 2);
  });
});

describe("the mock's checkpoints", () => {
  test('the mock signs checkpoints a verifier accepts', async () => {
    const sdk = mock();
    const record = await sdk.audit({ event: 'app.signed', outcome: 'ok', actor: 'prover', includeProof: true });
    const checkpoint = openCheckpoint(record.inclusionProof.checkpoint, sdk.auditVerifierKey);
    assert.ok(checkpoint.origin.startsWith('coresdk.mock/'));
    assert.equal(checkpoint.size, record.seq);
    verifyRecordInclusion(record.canonical, record.seq, record.inclusionProof, checkpoint);
    // The checkpoint of a size is signed once: asking again answers the same note.
    assert.equal(await sdk.auditCheckpoint(), record.inclusionProof.checkpoint);
    const later = (await appendRecords(sdk, 5)).at(-1);
    const newest = openCheckpoint(await sdk.auditCheckpoint(), sdk.auditVerifierKey);
    assert.equal(newest.size, later.seq);
    const c = await sdk.auditConsistencyProof(checkpoint.size);
    assert.equal(c.toSize, newest.size);
    verifyCheckpointConsistency(checkpoint, newest, c.hashes);
    const proof = await sdk.auditInclusionProof(record.seq);
    assert.equal(proof.treeSize, newest.size);
    assert.equal(proof.checkpoint, await sdk.auditCheckpoint());
    verifyRecordInclusion(record.canonical, record.seq, proof, newest);
    // Another mock is another log: its key does not open this one's checkpoints.
    const note = await sdk.auditCheckpoint();
    refused('another mock', () => openCheckpoint(note, mock().auditVerifierKey));
  });

  test('the mock proves webhook records', async () => {
    const sdk = mock();
    const body = stripeEvent('invoice.paid', 'cus_acme_001', { id: 'in_proof' });
    const result = await sdk.handleStripeWebhook(body, sign(body), { includeProof: true });
    assert.equal(result.inclusionProof.leafIndex, result.auditSeq - 1);
    const checkpoint = openCheckpoint(result.inclusionProof.checkpoint, sdk.auditVerifierKey);
    const record = (await sdk.auditQuery({ limit: 1000 })).find((r) => r.seq === result.auditSeq);
    verifyRecordInclusion(record.canonical, record.seq, result.inclusionProof, checkpoint);
  });

  test('the mock proves kept records after dropping old ones', async () => {
    // The mock keeps the newest 100,000 records (dropping 10,000 at a time past 110,000).
    const sdk = mock();
    for (let i = 0; i < 110_001; i += 1) await sdk.audit({ event: 'app.fill', outcome: 'ok', actor: 'filler' });
    const kept = await sdk.auditQuery({ limit: 100_000 });
    assert.ok(kept[0].seq > 1, 'nothing was dropped');
    const checkpoint = openCheckpoint(await sdk.auditCheckpoint(), sdk.auditVerifierKey);
    for (const record of [kept[0], kept[1], kept[kept.length >> 1], kept.at(-1)]) {
      verifyRecordInclusion(record.canonical, record.seq, await sdk.auditInclusionProof(record.seq), checkpoint);
    }
    const e = await refusedCall(() => sdk.auditInclusionProof(1, checkpoint.size));
    assert.equal(e.problem.reason, 'MOCK_CAPACITY');
    assert.equal((await sdk.auditVerify()).treeRoot, checkpoint.rootHash.toString('hex'));
  });
});

// -- the real sidecar's checkpoints ---------------------------------------------------------------

describe("the sidecar's checkpoints", () => {
  let sidecar;
  let client;
  let vkey;
  before(async () => {
    // A checkpoint of a moved head every 50 ms.
    sidecar = await Sidecar.start({ env: { CORESDK_AUDIT_CHECKPOINT_INTERVAL_S: '0.05' } });
    client = await clientFor(sidecar, { timeoutMs: 5_000 });
    const printed = spawnSync(binary(), ['audit', 'public-key', '--store', sidecar.store], { encoding: 'utf8', timeout: 30_000 });
    assert.equal(printed.status, 0, printed.stderr);
    vkey = printed.stdout.trim();
  });
  after(async () => {
    await client?.close();
    await sidecar?.close();
  });

  test('the sidecar proves appended records against signed checkpoints', async () => {
    assert.ok(VerifierKey.parse(vkey).name.startsWith('coresdk.audit/'));
    const record = await client.audit({ event: 'app.proved', outcome: 'ok', actor: 'prover', metadata: { n: 1 }, includeProof: true });
    const checkpoint = openCheckpoint(record.inclusionProof.checkpoint, vkey);
    assert.equal(record.inclusionProof.leafIndex, record.seq - 1);
    assert.ok(checkpoint.size >= record.seq);
    verifyRecordInclusion(record.canonical, record.seq, record.inclusionProof, checkpoint);
    // The record as the log stores it is the one proved.
    const stored = (await client.auditQuery({ limit: 1000 })).find((r) => r.seq === record.seq);
    assert.deepEqual(stored.canonical, record.canonical);
    const altered = Buffer.from(record.canonical.toString().replace('"ok"', '"ko"'));
    refused('an altered record', () => verifyRecordInclusion(altered, record.seq, record.inclusionProof, checkpoint));

    await appendRecords(client, 5);
    const later = await client.audit({ event: 'app.proved', outcome: 'ok', actor: 'prover', includeProof: true });
    const newest = openCheckpoint(await client.auditCheckpoint(), vkey);
    assert.ok(newest.size >= later.seq);
    assert.equal(newest.origin, checkpoint.origin);
    const consistency = await client.auditConsistencyProof(checkpoint.size);
    assert.equal(consistency.toSize, newest.size);
    verifyCheckpointConsistency(checkpoint, newest, consistency.hashes);
    // Against the newest checkpoint (tree size 0): its note comes with the proof.
    const proof = await client.auditInclusionProof(record.seq);
    const itsCheckpoint = openCheckpoint(proof.checkpoint, vkey);
    assert.equal(proof.treeSize, itsCheckpoint.size);
    verifyRecordInclusion(record.canonical, record.seq, proof, itsCheckpoint);

    const verified = await client.auditVerify();
    assert.ok(verified.ok && verified.checkpointSize > 0 && verified.treeRoot.length === 64, JSON.stringify(verified));
    const full = await client.auditVerify({ full: true });
    assert.ok(full.ok && full.recordsChecked === full.headSeq && full.headSeq >= later.seq, JSON.stringify(full));
  });

  test('the sidecar proves webhook records', async () => {
    const body = stripeEvent('invoice.paid', 'cus_acme_001', { id: 'in_proof' });
    const result = await client.handleStripeWebhook(body, sign(body), { includeProof: true });
    assert.equal(result.inclusionProof.leafIndex, result.auditSeq - 1);
    const checkpoint = openCheckpoint(result.inclusionProof.checkpoint, vkey);
    const record = (await client.auditQuery({ limit: 1000 })).find((r) => r.seq === result.auditSeq);
    verifyRecordInclusion(record.canonical, record.seq, result.inclusionProof, checkpoint);
    // Another key (the mock's) does not open the sidecar's checkpoints.
    assert.throws(() => openCheckpoint(result.inclusionProof.checkpoint, mock().auditVerifierKey), /no signature of/);
  });
});
