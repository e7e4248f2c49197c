// The sidecar's input rules for tenant ids and flag keys (src/ops/mod.rs, src/rules.rs), for
// answers served from a local cache (or by the mock) without a round trip: both must refuse
// exactly what the sidecar refuses, with the same problem.

import { GrpcCode, ProblemError, problemTypeUri } from './errors.js';
import type { Problem } from './types.js';

export const MAX_ID_BYTES = 128;
export const MAX_FLAG_KEY_LENGTH = 128;
/** ASCII only, so the length in characters is the length in bytes, as the sidecar counts it. */
export const FLAG_KEY = /^[A-Za-z0-9_.:-]{1,128}$/;
// Unicode separators (whitespace, U+2028/2029) and "other" (controls, format characters such as
// bidi overrides and zero-width spaces, private use, unassigned, lone surrogates).
const UNPRINTABLE = /[\p{Z}\p{C}]/u;
/** A refused key is quoted in the problem cut to this many characters, as the sidecar does. */
export const MAX_QUOTED_CHARS = 64;
/** The sidecar caps an access check's `resource` at 256 bytes (src/auth/access.rs, MAX_RESOURCE_LEN). */
export const MAX_RESOURCE_BYTES = 256;

// Rust's `str::trim` drops exactly the Unicode White_Space characters; JS's `trim` differs
// (it keeps U+0085 NEL and drops U+FEFF), so a check the sidecar makes on trimmed input uses this.
const EDGE_WHITE_SPACE = /^\p{White_Space}+|\p{White_Space}+$/gu;
const LEADING_WHITE_SPACE = /^\p{White_Space}+/u;

/** `text` trimmed as the sidecar trims it (Rust `str::trim`). */
export function trimWhiteSpace(text: string): string {
  return text.replace(EDGE_WHITE_SPACE, '');
}

/** `text` without leading white space, as Rust's `str::trim_start` drops it. */
export function trimStartWhiteSpace(text: string): string {
  return text.replace(LEADING_WHITE_SPACE, '');
}

/** `text` lowercased as Rust's `to_ascii_lowercase` does: only A-Z change (not e.g. U+212A). */
export function asciiLowercase(text: string): string {
  return text.replace(/[A-Z]/g, (c) => c.toLowerCase());
}

export function invalidProblem(field: string, description: string, typeBase: string): Problem {
  return {
    type: problemTypeUri(typeBase, 'invalid-request'),
    title: 'Invalid request',
    status: 400,
    detail: `invalid request: ${field}: ${description}`,
    reason: 'INVALID_ARGUMENT',
  };
}

/** Why `value` is no valid tenant or customer id, or null. */
export function idDefect(value: string): string | null {
  if (value === '') return 'is required';
  if (Buffer.byteLength(value, 'utf8') > MAX_ID_BYTES) return `is longer than ${MAX_ID_BYTES} bytes`;
  if (!UNPRINTABLE.test(value)) return null;
  let position = 0;
  for (const char of value) {
    position += 1;
    if (UNPRINTABLE.test(char)) {
      const codePoint = (char.codePointAt(0) ?? 0).toString(16).toUpperCase().padStart(4, '0');
      return `must be printable: U+${codePoint} (character ${position}) is whitespace, a control, a format character such as a bidi override or zero-width space, or unassigned`;
    }
  }
  return null;
}

export function isValidFlagKey(key: string): boolean {
  return FLAG_KEY.test(key);
}

/** Input as a problem may quote it: at most 64 characters, `…` marking a cut. */
export function quoted(input: string): string {
  const chars = Array.from(input);
  return chars.length > MAX_QUOTED_CHARS ? `${chars.slice(0, MAX_QUOTED_CHARS).join('')}…` : input;
}

/** Throws the sidecar's 400 `invalid-request` problem for a bad id (field `field`). */
export function checkId(field: string, value: string, typeBase: string): void {
  const defect = typeof value === 'string' ? idDefect(value) : 'must be a string';
  if (defect !== null) throw new ProblemError(invalidProblem(field, defect, typeBase), GrpcCode.INVALID_ARGUMENT);
}

/** Throws the sidecar's 400 `invalid-request` problem for a bad flag key. */
export function checkFlagKey(key: string, typeBase: string, field = 'key'): void {
  if (typeof key === 'string' && isValidFlagKey(key)) return;
  const description =
    typeof key === 'string'
      ? `'${quoted(key)}' is not a valid flag key: use 1-${MAX_FLAG_KEY_LENGTH} characters of letters, digits, _ - . :`
      : 'must be a string';
  throw new ProblemError(invalidProblem(field, description, typeBase), GrpcCode.INVALID_ARGUMENT);
}

/** The checks the sidecar makes on GetFlag / GetFlags (tenant first, then the key). */
export function checkIds(tenantId: string, key: string | null, typeBase: string): void {
  checkId('tenant_id', tenantId, typeBase);
  if (key !== null) checkFlagKey(key, typeBase);
}

/**
 * `require`/`denyIf` of an access check: a list of strings. From JS a bare string would
 * otherwise be read as its characters (`'pro'` → `p`, `r`, `o`).
 */
export function checkFlagList(field: string, flags: unknown, typeBase: string): readonly string[] {
  if (flags === undefined || flags === null) return [];
  if (Array.isArray(flags) && flags.every((flag) => typeof flag === 'string')) return flags as readonly string[];
  throw new ProblemError(invalidProblem(field, 'must be a list of flag keys (strings)', typeBase), GrpcCode.INVALID_ARGUMENT);
}
