// What the Express and Fastify helpers share: the webhook's 200 answer, the bearer token, the
// `resource` an access check names, and the problems the helpers answer themselves. The
// framework modules only adapt these to their request and reply objects.

import { ProblemError } from './errors.js';
import type { AuthorizeOptions, CoreSDKClient, Decision, FlagValue, Problem, WebhookResult } from './types.js';

export const PROBLEM_JSON = 'application/problem+json';

/** The sidecar's own webhook body limit (1 MiB): a larger body could never be accepted. */
export const DEFAULT_WEBHOOK_BODY_LIMIT = 1024 * 1024;
export const DEFAULT_WEBHOOK_PATH = '/webhooks/stripe';

/** The sidecar caps `resource` at 256 bytes (src/auth/access.rs, MAX_RESOURCE_LEN). */
const MAX_RESOURCE_BYTES = 256;

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
  const header = headerValue(authorization).trim();
  return /^bearer\s/i.test(header) ? header.slice(7).trim() : '';
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
  return `${sdk.settings.problemTypeBase.replace(/\/+$/, '')}/${name}`;
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
 * The app read the body before the webhook route and kept no copy of its bytes. A 500, not a
 * 400: the delivery is fine and the fix is in the app, and Stripe retries a 5xx, so no event
 * is lost while it is being fixed.
 */
export function rawBodyUnavailableProblem(sdk: CoreSDKClient, detail: string, instance: string): Problem {
  return {
    type: problemType(sdk, 'raw-body-unavailable'),
    title: 'Raw body unavailable',
    status: 500,
    detail,
    instance,
    reason: 'RAW_BODY_UNAVAILABLE',
  };
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
  flags: Pick<AuthorizeOptions, 'require' | 'denyIf'>,
): Promise<AccessOutcome> {
  const resource = resourceOf(method, url);
  const token = bearerToken(authorization);
  if (token === '') return { problem: unauthenticatedProblem(sdk, resource) };
  let decision: Decision;
  try {
    decision = await sdk.authorize({ token, require: flags.require, denyIf: flags.denyIf, resource });
  } catch (error) {
    // Under fail mode `closed` (or a bad request) the client throws the sidecar's problem.
    const problem = problemOf(error);
    if (problem === undefined) throw error;
    return { problem: { ...problem, instance: problem.instance ?? resource } };
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
