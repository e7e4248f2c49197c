// Express glue: the Stripe webhook route, a gate on flags, and problems as
// `application/problem+json`.
//
//   import { installStripeWebhook, requireAccess } from '@coresdk/client/express';
//   const app = express();
//   app.use(express.json());                       // before or after: it does not matter
//   installStripeWebhook(app, sdk);                // POST /webhooks/stripe
//   app.get('/api/analytics', requireAccess(sdk, { require: ['advanced_analytics'] }), (req, res) =>
//     res.json({ tenant: res.locals.coresdk?.tenantId }));
//
// Why the webhook route needs care (stripe-node issues #1254, #1294): Stripe signs the exact
// bytes it sent, and an app-wide `express.json()` that runs first reads the request stream to
// its end and keeps only the parsed object. Re-serialising that object gives other bytes
// (whitespace, key order, number and unicode escapes), so verifying it is wrong even when it
// happens to pass. body-parser 2 (Express 5's) decides per request: it skips a body that is
// already read (`on-finished`'s isFinished: complete and no longer readable), a request without
// one, and one whose Content-Type it was not told to parse; otherwise it consumes the stream.
// So the only dependable places to get the bytes are (1) before any parser runs, which is what
// `installStripeWebhook` arranges whatever the registration order, (2) a copy the app's parser
// kept through its `verify` hook (`keepRawBody`), or (3) a parser that left a Buffer (an app-wide
// `express.raw()`). When none of these holds the route answers a 500 problem naming the fix and
// never verifies anything else; Stripe retries 5xx deliveries, so nothing is lost meanwhile.

import type { IncomingMessage, ServerResponse } from 'node:http';

import express from 'express';
import type { Application, ErrorRequestHandler, NextFunction, Request, RequestHandler, Response, Router } from 'express';

import {
  DEFAULT_WEBHOOK_BODY_LIMIT,
  DEFAULT_WEBHOOK_PATH,
  PROBLEM_JSON,
  RAW_BODY_FIX,
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

declare global {
  // Express's own way to type `res.locals` (@types/express-serve-static-core).
  namespace Express {
    interface Locals {
      /** The sidecar's decision, set by `requireAccess` for the handlers after it. */
      coresdk?: Decision;
    }
  }
}

export { PROBLEM_JSON };
export type { AccessRequirement, WebhookAnswer } from './http.js';

export interface StripeWebhookOptions {
  /** Default `/webhooks/stripe`. */
  path?: string;
  /** Largest body read, in bytes; default 1 MiB, the sidecar's own limit. */
  limit?: number;
}

/** Answers `problem` as `application/problem+json` with its status. */
export function sendProblem(res: Response, problem: Problem): void {
  res.status(problemStatus(problem)).set('Content-Type', PROBLEM_JSON).send(JSON.stringify(problem));
}

/** Error middleware: a ProblemError thrown by a route is answered with its problem, as is. */
export function problemErrorHandler(): ErrorRequestHandler {
  return (error: unknown, _req: Request, res: Response, next: NextFunction) => {
    const problem = problemOf(error);
    if (problem === undefined || res.headersSent) {
      next(error);
      return;
    }
    sendProblem(res, problem);
  };
}

// Raw bodies kept by `keepRawBody`, per request: they go when the request does.
const keptRawBodies = new WeakMap<IncomingMessage, Buffer>();

/**
 * A body-parser `verify` hook that keeps the bytes a parser read, for an app whose
 * `express.json()` runs before a `stripeWebhook()` router it mounts itself:
 * `app.use(express.json({ verify: keepRawBody }))`. Not needed with `installStripeWebhook`.
 * It keeps a second copy of EVERY body that parser reads (every JSON request, not only
 * webhooks) for as long as the request lives: memory the other two ways do not cost.
 */
export function keepRawBody(req: IncomingMessage, _res: ServerResponse, body: Buffer): void {
  keptRawBodies.set(req, body);
}

/** A request that announced no body at all (neither a length nor chunked encoding). */
function sentNoBody(req: IncomingMessage): boolean {
  const length = req.headers['content-length'];
  return req.headers['transfer-encoding'] === undefined && (length === undefined || Number(length) === 0);
}

/** The exact bytes Stripe sent, or undefined when a parser before this route consumed them. */
function rawBodyOf(req: Request): Buffer | undefined {
  const kept = keptRawBodies.get(req);
  if (kept !== undefined) return kept;
  // Our own express.raw() below, or an app-wide one: both leave the bytes as read (a
  // compressed delivery was refused before this).
  const body: unknown = req.body;
  if (Buffer.isBuffer(body)) return body;
  if (sentNoBody(req)) return Buffer.alloc(0);
  // A parsed object or a decoded string: not the bytes (body-parser's text decoding drops a
  // BOM and replaces invalid UTF-8), so it must not be verified.
  return undefined;
}

/**
 * A router for `POST /webhooks/stripe` (or `options.path`): forwards the raw body and the
 * `Stripe-Signature` header to `sdk.handleStripeWebhook`, answers 200 with
 * `{received, event_id, tenant_id, outcome, flag_changes}` once the effect is committed, and the
 * problem with its status otherwise (400 for a bad signature; 503 when the sidecar is away, so
 * Stripe retries). Mount it before any body parser, or use `installStripeWebhook`.
 */
export function stripeWebhook(sdk: CoreSDKClient, options: StripeWebhookOptions = {}): Router {
  const path = options.path ?? DEFAULT_WEBHOOK_PATH;
  const limit = options.limit ?? DEFAULT_WEBHOOK_BODY_LIMIT;
  const router = express.Router();

  // Every Content-Type: Stripe sends `application/json; charset=utf-8`, and the signature is
  // over bytes whatever the type claims. body-parser skips this when an earlier parser already
  // consumed the stream, leaving that parser's `req.body`.
  // Not inflated: a compressed delivery is refused, as the Fastify route refuses it.
  const readRaw = express.raw({ type: () => true, limit, inflate: false });

  const forward: RequestHandler = async (req, res, next) => {
    const instance = resourceOf(req.method, req.originalUrl);
    // An app-wide parser before this route may have inflated it.
    const compressed = compressedBodyProblem(sdk, req.headers['content-encoding'], instance);
    if (compressed !== undefined) {
      sendProblem(res, compressed);
      return;
    }
    const rawBody = rawBodyOf(req);
    if (rawBody === undefined) {
      sendProblem(res, rawBodyUnavailableProblem(sdk.settings.problemTypeBase, RAW_BODY_FIX, instance));
      return;
    }
    try {
      const result = await sdk.handleStripeWebhook(rawBody, headerValue(req.headers['stripe-signature']));
      res.status(200).json(webhookAnswer(result));
    } catch (error) {
      // A sidecar problem (a SidecarUnavailableError is a 503) goes back as is, so Stripe
      // retries what can succeed later; anything else is a bug for the app's error handler.
      const problem = problemOf(error);
      if (problem === undefined) next(error);
      else sendProblem(res, { ...problem, instance: problem.instance ?? instance });
    }
  };

  // Answers the errors express.raw() itself passes on (413 over the limit, 400 for an aborted
  // body or a Content-Length that lied, 415 for any Content-Encoding); an error
  // `forward` passes on is not a body error and goes to the app's error handler as is.
  const readBody: RequestHandler = (req, res, next) => {
    readRaw(req, res, (error?: unknown) => {
      if (error === undefined || error === null) next();
      else answerBodyError(error, req, res, next);
    });
  };
  const answerBodyError = (error: unknown, req: Request, res: Response, next: NextFunction): void => {
    const status = httpStatusOf(error);
    if (status === undefined || res.headersSent) {
      next(error);
      return;
    }
    const instance = resourceOf(req.method, req.originalUrl);
    if (status === 413) {
      // body-parser drained what was sent; a client that sends this much gets no kept-alive connection.
      res.set('Connection', 'close');
      sendProblem(res, payloadTooLargeProblem(sdk, limit, instance));
    } else {
      const detail = error instanceof Error ? error.message : 'The request body could not be read.';
      sendProblem(res, unreadableBodyProblem(sdk, status === 415 ? 415 : 400, detail, instance));
    }
  };

  router.post(path, readBody, forward);
  return router;
}

/** The 4xx status of a body-parser (http-errors) error, else undefined. */
function httpStatusOf(error: unknown): number | undefined {
  if (typeof error !== 'object' || error === null) return undefined;
  const status: unknown = (error as { status?: unknown }).status;
  return typeof status === 'number' && status >= 400 && status < 500 ? status : undefined;
}

function routerStackOf(app: Application): unknown[] {
  let router: unknown;
  try {
    router = (app as { router?: unknown }).router;
  } catch {
    // Express 4's `app.router` is a getter that throws.
    router = undefined;
  }
  const stack: unknown = typeof router === 'function' || typeof router === 'object' ? (router as { stack?: unknown } | null)?.stack : undefined;
  if (!Array.isArray(stack)) {
    throw new TypeError(
      'installStripeWebhook needs Express 5 (app.router); with Express 4, mount stripeWebhook(sdk) before your body parsers, ' +
        'or pass { verify: keepRawBody } to them',
    );
  }
  return stack;
}

/**
 * Puts the webhook route AHEAD of the app's earlier middleware, IP allowlists and rate limiters
 * included: they do not see webhook deliveries (mount `stripeWebhook(sdk)` yourself, before
 * your body parsers, to keep them in front).
 *
 * Mounts `stripeWebhook(sdk, options)` before everything already registered on `app`, so it
 * reads the body before any parser whatever the registration order (parsers added later run
 * after it anyway). Only `POST <path>` stops there; every other request goes on unchanged.
 * Call it on the top-level app: the parsers of an app that mounts this one run before it.
 */
export function installStripeWebhook(app: Application, sdk: CoreSDKClient, options: StripeWebhookOptions = {}): void {
  // Express 5 runs middleware in the order of its router's stack; app.use() appends, so the
  // new layer is moved to the front. There is no public "prepend".
  const stack = routerStackOf(app);
  const before = stack.length;
  app.use(stripeWebhook(sdk, options));
  stack.unshift(...stack.splice(before));
}

/**
 * Middleware that gates a route on the tenant's flags: verifies the bearer token and checks
 * `require`/`denyIf` in one sidecar call (resource `METHOD /path`), puts the decision on
 * `res.locals.coresdk`, and answers the problem otherwise: 401 without a token, 402
 * `payment-required`, 403 `feature-locked`, 503 under fail mode `closed` with the sidecar away.
 */
export function requireAccess(sdk: CoreSDKClient, requirement: AccessRequirement = {}): RequestHandler {
  return async (req, res, next) => {
    let outcome;
    try {
      outcome = await checkAccess(sdk, req.headers.authorization, req.method, req.originalUrl, requirement);
    } catch (error) {
      next(error);
      return;
    }
    if (outcome.problem !== undefined) {
      sendProblem(res, outcome.problem);
      return;
    }
    res.locals.coresdk = outcome.decision;
    next();
  };
}
