// @coresdk/client: the Node.js client of the CoreSDK sidecar.
//
//   import { CoreSDK } from '@coresdk/client';
//   const sdk = CoreSDK.fromEnv();          // CORESDK_USE_MOCK=true gives the in-process mock
//   await sdk.isEnabled('acme-corp', 'pro_features');
//
// The public API only: the wire conversion, the rules parser and the problem builders stay
// internal, so they can change without a major version.

export * from './types.js';
export { FlagNotFoundError, GrpcCode, ProblemError, SidecarUnavailableError } from './errors.js';
export { DEFAULTS, makeSettings, settingsFromEnv, usesTls, type FailMode, type Settings, type TlsSettings } from './config.js';
export { SidecarClient, type Logger, type SidecarClientOptions } from './client.js';
export { checkFlagKey, checkId } from './validation.js';
export { MOCK_TENANTS, MOCK_WEBHOOK_SECRET, MockSidecar, RulesError, defaultRulesPath } from './mock.js';
export { CoreSDK } from './sdk.js';
export {
  EMPTY_ROOT,
  MAX_NOTE_BYTES,
  MAX_PROOF_HASHES,
  TransparencyError,
  VerifierKey,
  keyId,
  leafHash,
  nodeHash,
  openCheckpoint,
  openNote,
  parseCheckpoint,
  parseNote,
  rootFromInclusionProof,
  verifyCheckpointConsistency,
  verifyConsistency,
  verifyInclusion,
  verifyRecordInclusion,
  type Checkpoint,
  type InclusionProofLike,
  type NoteSignature,
  type ProvenRecord,
} from './transparency.js';
