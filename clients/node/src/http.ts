// What the Express and Fastify helpers share: the webhook's 200 answer, the bearer token, the
// `resource` an access check names, and the problems the helpers answer themselves. The
// framework modules only adapt these to their request and reply objects.

import { ProblemError, problemTypeUri, unavailableProblem } from './errors.js';
import type { AuthorizeOptions, CoreSDKClient, Decision, FlagValue, Problem, WebhookResult } from './types.js';
import { MAX_RESOURCE_BYTES, trimWhiteSpace } from './validation.js';

export const PROBLEM_JSON = 'application/problem+json';

/** The sidecar's own webhook body limit (1 MiB): a larger body could never be accepted. */
export const DEFAULT_WEBHOOK_BODY_LIMIT = 1024 * 1024;
export const DEFAULT_WEBHOOK_PATH = '/webhooks/stripe';

/** What a gated route needs, for `requireAccess` of either framework. */
export interface AccessRequirement {
  /** Flags that must be on (403 `feature-locked` otherwise). */
  require?: AuthorizeOptions['require'];
  /** Flags that must be off (402 `payment-required` otherwise). */
  denyIf?: AuthorizeOptions['denyIf'];
  /**
   * `'closed'` answers this route 503 whenever the client's fail mode decided instead of the
   * sidecar (it was away), even when the client's own fail mode is `open`: under `open` a gated
   * request otherwise passes with its token unverified. Default: the client's fail mode.
   */
  failMode?: 'closed';
}

/** The status a problem is answered with: one a framework would refuse (RangeError) is a 500. */
export function problemStatus(problem: Problem): number {
  return Number.isInteger(problem.status) && problem.status >= 400 && problem.status <= 599 ? problem.status : 500;
}

export const RAW_BODY_FIX =
  'A body parser read the webhook request before the CoreSDK route and kept no copy of its bytes; ' +
  'a re-serialised body cannot be verified. Use installStripeWebhook(app, sdk) (it runs before every parser), ' +
  'or mount stripeWebhook(sdk) before your body parsers, ' +
  "or give your parser the hook: express.json({ verify: keepRawBody }) from '@coresdk/client/express'.";

/**
 * The bytes of a webhook body as given to `handleStripeWebhook`/`replayEvent`. Anything but a
 * string or bytes (a parsed object from a JSON parser, undefined) is the app's mistake, and must
 * not reach `Buffer.from`: that reads any object with a `length` as an array of that many bytes,
 * so a posted `{"length": 2000000000}` would allocate gigabytes.
 */
export function webhookPayload(rawBody: unknown, typeBase: string): Buffer {
  if (typeof rawBody === 'string') return Buffer.from(rawBody, 'utf8');
  if (rawBody instanceof Uint8Array) return Buffer.isBuffer(rawBody) ? rawBody : Buffer.from(rawBody);
  const given = rawBody === null ? 'null' : Array.isArray(rawBody) ? 'an array' : typeof rawBody;
  throw new ProblemError(
    rawBodyUnavailableProblem(typeBase, `The webhook body must be the raw bytes (a Buffer, Uint8Array or string), not ${given}. ${RAW_BODY_FIX}`),
  );
}

/** The 200 body of a committed delivery, the same as the Python FastAPI route's. */
export interface WebhookAnswer {
  received: true;
  event_id: string;
  tenant_id: string;
  outcome: WebhookResult['outcome'];
  flag_changes: { key: string; value: FlagValue }[];
}

export function webhookAnswer(result: WebhookResult): WebhookAnswer {
  return {
    received: true,
    event_id: result.eventId,
    tenant_id: result.tenantId,
    outcome: result.outcome,
    flag_changes: result.flagChanges.map((change) => ({ key: change.key, value: change.newValue })),
  };
}

/** A header Node gives as a list when it was repeated; joined as Node joins unknown ones. */
export function headerValue(value: string | string[] | undefined): string {
  return Array.isArray(value) ? value.join(', ') : (value ?? '');
}

/** The token of an `Authorization: Bearer …` header, or '' (any other scheme is no token). */
export function bearerToken(authorization: string | string[] | undefined): string {
  // Trimmed as the sidecar trims a token, so a token it would read as empty is no token here.
  const header = trimWhiteSpace(headerValue(authorization));
  return /^bearer\p{White_Space}/iu.test(header) ? trimWhiteSpace(header.slice(7)) : '';
}

/**
 * `METHOD /path` without the query (it may carry secrets and is not what is protected), cut to
 * what the sidecar accepts: a long URL must not turn an access check into a 400.
 */
export function resourceOf(method: string, url: string): string {
  const query = url.search(/[?#]/);
  // A character is at least one byte: cut to that many characters first, so a URL as long as
  // the header limit allows costs at most MAX_RESOURCE_BYTES short steps.
  let resource = `${method} ${query === -1 ? url : url.slice(0, query)}`.slice(0, MAX_RESOURCE_BYTES);
  while (Buffer.byteLength(resource) > MAX_RESOURCE_BYTES) resource = resource.slice(0, -1);
  return resource;
}

function problemType(sdk: CoreSDKClient, name: string): string {
  return problemTypeUri(sdk.settings.problemTypeBase, name);
}

export function unauthenticatedProblem(sdk: CoreSDKClient, resource: string): Problem {
  return {
    type: problemType(sdk, 'unauthenticated'),
    title: 'Unauthenticated',
    status: 401,
    detail: 'The request carries no bearer token.',
    instance: resource,
    reason: 'UNAUTHENTICATED',
  };
}

/** The same type, title and reason as the sidecar's own answer to a body over its limit. */
export function payloadTooLargeProblem(sdk: CoreSDKClient, limit: number, instance: string): Problem {
  return {
    type: problemType(sdk, 'payload-too-large'),
    title: 'Payload too large',
    status: 413,
    detail: `A Stripe event body is at most ${limit} bytes.`,
    instance,
    reason: 'PAYLOAD_TOO_LARGE',
  };
}

/** The body could not be read (the client went away, a Content-Length that lied, an encoding). */
export function unreadableBodyProblem(sdk: CoreSDKClient, status: number, detail: string, instance: string): Problem {
  return {
    type: problemType(sdk, 'invalid-request'),
    title: status === 415 ? 'Unsupported Media Type' : 'Invalid request',
    status,
    detail,
    instance,
    reason: status === 415 ? 'UNSUPPORTED_MEDIA_TYPE' : 'INVALID_BODY',
  };
}

/**
 * A compressed delivery is refused (415) by both helpers alike. Stripe never compresses one,
 * and its signature covers the bytes it sent: inflating first would verify other bytes than
 * those on the wire, and passing compressed bytes on can never verify.
 */
export function compressedBodyProblem(sdk: CoreSDKClient, contentEncoding: string | string[] | undefined, instance: string): Problem | undefined {
  const encoding = headerValue(contentEncoding).trim().toLowerCase();
  if (encoding === '' || encoding === 'identity') return undefined;
  return unreadableBodyProblem(sdk, 415, `A Stripe delivery is never compressed; Content-Encoding '${encoding}' is refused.`, instance);
}

/**
 * The app read the body before the webhook route and kept no copy of its bytes. A 500, not a
 * 400: the delivery is fine and the fix is in the app, and Stripe retries a 5xx, so no event
 * is lost while it is being fixed.
 */
export function rawBodyUnavailableProblem(typeBase: string, detail: string, instance?: string): Problem {
  const problem: Problem = {
    type: problemTypeUri(typeBase, 'raw-body-unavailable'),
    title: 'Raw body unavailable',
    status: 500,
    detail,
    reason: 'RAW_BODY_UNAVAILABLE',
  };
  return instance === undefined ? problem : { ...problem, instance };
}

/**
 * The problem a failed webhook or access call answers: a ProblemError's own (a
 * SidecarUnavailableError's is a 503, so Stripe retries); anything else is a bug for the
 * framework's error handling, not a problem to hand to the caller.
 */
export function problemOf(error: unknown): Problem | undefined {
  return error instanceof ProblemError ? error.problem : undefined;
}

export type AccessOutcome = { decision: Decision; problem?: undefined } | { decision?: undefined; problem: Problem };

/**
 * What gating `method url` needs before the handler runs: the sidecar's decision, or the
 * problem to answer (401 without a token, as the Python `require` does, without asking the
 * sidecar). Rejects only with an error that is not a ProblemError (a bug).
 */
export async function checkAccess(
  sdk: CoreSDKClient,
  authorization: string | string[] | undefined,
  method: string,
  url: string,
  requirement: AccessRequirement,
): Promise<AccessOutcome> {
  const resource = resourceOf(method, url);
  const token = bearerToken(authorization);
  if (token === '') return { problem: unauthenticatedProblem(sdk, resource) };
  let decision: Decision;
  try {
    decision = await sdk.authorize({ token, require: requirement.require, denyIf: requirement.denyIf, resource });
  } catch (error) {
    // Under fail mode `closed` (or a bad request) the client throws the sidecar's problem.
    const problem = problemOf(error);
    if (problem === undefined) throw error;
    return { problem: { ...problem, instance: problem.instance ?? resource } };
  }
  if (decision.allowed && decision.failModeApplied && requirement.failMode === 'closed') {
    const detail = 'the sidecar is away and this route does not let a request through unverified (failMode closed)';
    return { problem: { ...unavailableProblem(detail, sdk.settings.problemTypeBase), instance: resource } };
  }
  if (decision.allowed) return { decision };
  // A decision that denies always names its problem; a mock or an old sidecar that forgot one
  // must still deny, never let the request through.
  const problem = decision.problem ?? {
    type: problemType(sdk, 'forbidden'),
    title: 'Forbidden',
    status: 403,
    reason: 'PERMISSION_DENIED',
  };
  return { problem: { ...problem, instance: problem.instance ?? resource } };
}
