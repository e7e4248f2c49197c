// A build step (`npm run build`): copies the sidecar's built-in rules (the repo's
// rules/default.toml) into the package, where the in-process mock reads them (src/mock.ts), so
// the mock and the sidecar decide from one file. The copy is gitignored.

import { cpSync, existsSync, mkdirSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const PACKAGE = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const SOURCE = resolve(PACKAGE, '..', '..', 'rules', 'default.toml');

if (!existsSync(SOURCE)) {
  throw new Error(`${SOURCE} is missing: build @coresdk/client from the CoreSDK repository`);
}
mkdirSync(join(PACKAGE, 'rules'), { recursive: true });
cpSync(SOURCE, join(PACKAGE, 'rules', 'default.toml'));
