// Fastify glue: the Stripe webhook route, a preHandler gate on flags, and problems as
// `application/problem+json`.
//
//   import { coresdk, requireAccess } from '@coresdk/client/fastify';
//   await app.register(coresdk, { sdk });           // POST /webhooks/stripe
//   app.get('/api/analytics', { preHandler: requireAccess(sdk, { require: ['advanced_analytics'] }) },
//     async (request) => ({ tenant: request.coresdk?.tenantId }));
//
// Stripe signs the exact bytes it sent (stripe-node issues #1254, #1294: a parsed and
// re-serialised body is other bytes). Fastify picks a body's parser by Content-Type from the
// parsers of the route's own encapsulation context, so the webhook route lives in a child
// context that has only one parser: every Content-Type read as a Buffer, up to the sidecar's
// 1 MiB limit. Whatever JSON parser the app adds (before or after registering this plugin),
// and Fastify's built-in one, never see the delivery.

import fp from 'fastify-plugin';
import type { FastifyError, FastifyInstance, FastifyReply, preHandlerAsyncHookHandler } from 'fastify';

import {
  DEFAULT_WEBHOOK_BODY_LIMIT,
  DEFAULT_WEBHOOK_PATH,
  PROBLEM_JSON,
  checkAccess,
  compressedBodyProblem,
  headerValue,
  payloadTooLargeProblem,
  problemOf,
  problemStatus,
  rawBodyUnavailableProblem,
  resourceOf,
  unreadableBodyProblem,
  webhookAnswer,
} from './http.js';
import type { AccessRequirement } from './http.js';
import type { CoreSDKClient, Decision, Problem } from './types.js';

declare module 'fastify' {
  interface FastifyRequest {
    /** The sidecar's decision, set by `requireAccess` for the handler after it (null before). */
    coresdk: Decision | null;
  }
}

export { PROBLEM_JSON };
export type { AccessRequirement, WebhookAnswer } from './http.js';

export interface CoreSDKPluginOptions {
  sdk: CoreSDKClient;
  /** The webhook route's path (default `/webhooks/stripe`); `false` registers no route. */
  webhookPath?: string | false;
  /** Largest webhook body, in bytes; default 1 MiB, the sidecar's own limit. */
  webhookBodyLimit?: number;
}

/** Answers `problem` as `application/problem+json` with its status; returns the reply (for async hooks). */
export function sendProblem(reply: FastifyReply, problem: Problem): FastifyReply {
  return reply.code(problemStatus(problem)).type(PROBLEM_JSON).send(JSON.stringify(problem));
}

/**
 * The status of one of Fastify's own errors reading the body (FST_ERR_CTP_*: over the limit,
 * a Content-Length that lied), else undefined: a 401 of the app's auth hook or a 429 of a rate
 * limiter that the webhook scope inherits is not a body error and keeps its own answer.
 */
function bodyErrorStatus(error: FastifyError): number | undefined {
  if (typeof error.code !== 'string' || !error.code.startsWith('FST_ERR_CTP_')) return undefined;
  if (error.code === 'FST_ERR_CTP_BODY_TOO_LARGE') return 413;
  return error.statusCode === 415 ? 415 : 400;
}

async function webhookRoute(
  scope: FastifyInstance,
  { sdk, path, limit }: { sdk: CoreSDKClient; path: string; limit: number },
): Promise<void> {
  // Only this context's parsers change: Fastify copies the parent's when it creates a child.
  scope.removeAllContentTypeParsers();
  scope.addContentTypeParser('*', { parseAs: 'buffer', bodyLimit: limit }, (_request, body, done) => {
    done(null, body);
  });

  scope.setErrorHandler((error: FastifyError, request, reply) => {
    const status = bodyErrorStatus(error);
    // Anything else (a hook of the app's, a bug) is the app's error handler's to answer.
    if (status === undefined) throw error;
    const instance = resourceOf(request.method, request.url);
    if (status === 413) return sendProblem(reply, payloadTooLargeProblem(sdk, limit, instance));
    return sendProblem(reply, unreadableBodyProblem(sdk, status === 415 ? 415 : 400, error.message, instance));
  });

  scope.post(path, { bodyLimit: limit }, async (request, reply) => {
    const instance = resourceOf(request.method, request.url);
    const compressed = compressedBodyProblem(sdk, request.headers['content-encoding'], instance);
    if (compressed !== undefined) return sendProblem(reply, compressed);
    const body: unknown = request.body;
    // Undefined: the request announced no body (Fastify calls no parser then).
    const rawBody = Buffer.isBuffer(body) ? body : body === undefined ? Buffer.alloc(0) : undefined;
    if (rawBody === undefined) {
      return sendProblem(
        reply,
        rawBodyUnavailableProblem(sdk.settings.problemTypeBase, 'Something replaced the webhook body before the CoreSDK route; it cannot be verified.', instance),
      );
    }
    try {
      const result = await sdk.handleStripeWebhook(rawBody, headerValue(request.headers['stripe-signature']));
      return reply.code(200).send(webhookAnswer(result));
    } catch (error) {
      // A sidecar problem (a SidecarUnavailableError is a 503) goes back as is, so Stripe
      // retries what can succeed later; anything else is a bug for the app's error handler.
      const problem = problemOf(error);
      if (problem === undefined) throw error;
      return sendProblem(reply, { ...problem, instance: problem.instance ?? instance });
    }
  });
}

/**
 * Registers `POST /webhooks/stripe` (in an encapsulated context with its own raw-body parser)
 * and the `request.coresdk` decoration that `requireAccess` fills. Wrapped with fastify-plugin
 * so the decoration is visible to the app's own routes.
 */
export const coresdk = fp(
  async (fastify: FastifyInstance, options: CoreSDKPluginOptions) => {
    const { sdk, webhookPath = DEFAULT_WEBHOOK_PATH, webhookBodyLimit = DEFAULT_WEBHOOK_BODY_LIMIT } = options;
    if (!fastify.hasRequestDecorator('coresdk')) fastify.decorateRequest('coresdk', null);
    if (webhookPath !== false) {
      await fastify.register(webhookRoute, { sdk, path: webhookPath, limit: webhookBodyLimit });
    }
  },
  { name: '@coresdk/client', fastify: '>=5' },
);

/**
 * A preHandler that gates a route on the tenant's flags: verifies the bearer token and checks
 * `require`/`denyIf` in one sidecar call (resource `METHOD /path`), puts the decision on
 * `request.coresdk`, and answers the problem otherwise: 401 without a token, 402
 * `payment-required`, 403 `feature-locked`, 503 under fail mode `closed` with the sidecar away.
 */
export function requireAccess(sdk: CoreSDKClient, requirement: AccessRequirement = {}): preHandlerAsyncHookHandler {
  return async function coresdkAccess(request, reply) {
    const outcome = await checkAccess(sdk, request.headers.authorization, request.method, request.url, requirement);
    // Returning the reply tells Fastify the hook answered and the handler must not run.
    if (outcome.problem !== undefined) return sendProblem(reply, outcome.problem);
    request.coresdk = outcome.decision;
    return undefined;
  };
}
