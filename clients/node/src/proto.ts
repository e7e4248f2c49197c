// The sidecar's gRPC API, loaded at run time from the protos shipped in the package (copied
// from the repo's proto/ by `npm run build`), with the types generated from the same files.

import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';

import type { ProtoGrpcType as AuditProto } from './generated/audit.js';
import type { ProtoGrpcType as AuthProto } from './generated/auth.js';
import type { ProtoGrpcType as FlagsProto } from './generated/flags.js';
import type { ProtoGrpcType as TenantsProto } from './generated/tenants.js';
import type { ProtoGrpcType as WebhookProto } from './generated/webhook.js';
import type { Problem__Output } from './generated/coresdk/v1/Problem.js';
import type { Status__Output } from './generated/google/rpc/Status.js';

export type { AuditServiceClient } from './generated/coresdk/v1/AuditService.js';
export type { AuthServiceClient } from './generated/coresdk/v1/AuthService.js';
export type { FlagServiceClient } from './generated/coresdk/v1/FlagService.js';
export type { TenantServiceClient } from './generated/coresdk/v1/TenantService.js';
export type { WebhookServiceClient } from './generated/coresdk/v1/WebhookService.js';
export type { Problem__Output as ProtoProblem } from './generated/coresdk/v1/Problem.js';

/** The package's proto/ directory (dist/ and src/ are its siblings). */
export const PROTO_DIR = join(dirname(fileURLToPath(import.meta.url)), '..', 'proto');

const FILES = [
  'coresdk/v1/audit.proto',
  'coresdk/v1/auth.proto',
  'coresdk/v1/flags.proto',
  'coresdk/v1/problem.proto',
  'coresdk/v1/tenants.proto',
  'coresdk/v1/webhook.proto',
  'google/rpc/status.proto',
];

/**
 * Must match the generator's flags in scripts/build-proto.mjs: camelCase field names, 64-bit
 * integers as Number (versions and audit sequence numbers stay far below 2^53), enums as their
 * names, defaults filled in, and each oneof's set member named by a virtual field.
 */
const LOADER_OPTIONS: protoLoader.Options = {
  keepCase: false,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_DIR],
};

export const PROBLEM_TYPE_URL = 'type.googleapis.com/coresdk.v1.Problem';

export type CoreSDKProto = AuditProto & AuthProto & FlagsProto & TenantsProto & WebhookProto;

export interface LoadedApi {
  services: CoreSDKProto['coresdk']['v1'];
  decodeStatus(bytes: Buffer): Status__Output;
  decodeProblem(bytes: Buffer): Problem__Output;
}

let loaded: LoadedApi | undefined;

function messageType(definition: protoLoader.PackageDefinition, name: string): protoLoader.MessageTypeDefinition<object, object> {
  const type = definition[name];
  if (type === undefined || !('deserialize' in type) || !('format' in type)) {
    throw new Error(`${name} is missing from the protos in ${PROTO_DIR}: rebuild @coresdk/client`);
  }
  return type as protoLoader.MessageTypeDefinition<object, object>;
}

/** Loaded once per process, on first use. */
export function api(): LoadedApi {
  if (loaded !== undefined) return loaded;
  const definition = protoLoader.loadSync(FILES, LOADER_OPTIONS);
  const root = grpc.loadPackageDefinition(definition) as unknown as CoreSDKProto;
  const status = messageType(definition, 'google.rpc.Status');
  const problem = messageType(definition, 'coresdk.v1.Problem');
  loaded = {
    services: root.coresdk.v1,
    decodeStatus: (bytes) => status.deserialize(bytes) as Status__Output,
    decodeProblem: (bytes) => problem.deserialize(bytes) as Problem__Output,
  };
  return loaded;
}
