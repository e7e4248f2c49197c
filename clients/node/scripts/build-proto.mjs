// The build's first step (`npm run build`): copies the repo's protos into the package (shipped
// with it: the client loads them at run time) and generates their TypeScript types into
// src/generated with @grpc/proto-loader's generator, so no protoc is needed anywhere. Both
// outputs are gitignored; the protos in the repo's proto/ are the one source.

import { execFileSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, readdirSync, rmSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const PACKAGE = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const REPO_PROTOS = resolve(PACKAGE, '..', '..', 'proto', 'coresdk', 'v1');
const PROTO = join(PACKAGE, 'proto');
const OWN = join(PROTO, 'coresdk', 'v1');
const GENERATED = join(PACKAGE, 'src', 'generated');
// The vendored google.rpc.Status, committed in the package: the status the problems travel in.
const STATUS = 'google/rpc/status.proto';

if (!existsSync(REPO_PROTOS)) {
  throw new Error(`${REPO_PROTOS} is missing: build @coresdk/client from the CoreSDK repository`);
}
rmSync(OWN, { recursive: true, force: true });
mkdirSync(OWN, { recursive: true });
const files = readdirSync(REPO_PROTOS).filter((name) => name.endsWith('.proto')).sort();
for (const name of files) cpSync(join(REPO_PROTOS, name), join(OWN, name));

const require = createRequire(import.meta.url);
const generator = join(dirname(require.resolve('@grpc/proto-loader/package.json')), 'build', 'bin', 'proto-loader-gen-types.js');
rmSync(GENERATED, { recursive: true, force: true });
// The same options as the loader's at run time (src/proto.ts): camelCase fields, 64-bit
// integers as Number (versions and sequence numbers stay far below 2^53), enums as strings.
execFileSync(
  process.execPath,
  [
    generator,
    '--grpcLib=@grpc/grpc-js',
    '--longs=Number',
    '--enums=String',
    '--defaults',
    '--oneofs',
    '--importFileExtension=.js',
    '-I',
    PROTO,
    '-O',
    GENERATED,
    ...files.map((name) => `coresdk/v1/${name}`),
    STATUS,
  ],
  { stdio: ['ignore', 'ignore', 'inherit'] },
);
