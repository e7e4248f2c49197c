// The client of a real sidecar: gRPC calls with a deadline and retries, a local flag cache fed
// by WatchFlags, and the fail mode for when the sidecar is away. The semantics are the Python
// client's (clients/python/src/coresdk/client.py).

import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';

import * as grpc from '@grpc/grpc-js';

import { settingsFromEnv, usesTls, type Settings } from './config.js';
import { FlagNotFoundError, GrpcCode, ProblemError, SidecarUnavailableError, unavailableProblem } from './errors.js';
import type { HandleStripeWebhookResponse__Output } from './generated/coresdk/v1/HandleStripeWebhookResponse.js';
import type { GetFlagsResponse__Output } from './generated/coresdk/v1/GetFlagsResponse.js';
import type { ExplainFlagResponse__Output } from './generated/coresdk/v1/ExplainFlagResponse.js';
import type { Claims__Output } from './generated/coresdk/v1/Claims.js';
import type { AuthorizeResponse__Output } from './generated/coresdk/v1/AuthorizeResponse.js';
import type { AuditRecord__Output } from './generated/coresdk/v1/AuditRecord.js';
import type { QueryAuditResponse__Output } from './generated/coresdk/v1/QueryAuditResponse.js';
import type { VerifyAuditResponse__Output } from './generated/coresdk/v1/VerifyAuditResponse.js';
import type { GetCheckpointResponse__Output } from './generated/coresdk/v1/GetCheckpointResponse.js';
import type { GetConsistencyProofResponse__Output } from './generated/coresdk/v1/GetConsistencyProofResponse.js';
import type { InclusionProof__Output } from './generated/coresdk/v1/InclusionProof.js';
import type { CustomerMapping__Output } from './generated/coresdk/v1/CustomerMapping.js';
import type { AppendAuditRequest } from './generated/coresdk/v1/AppendAuditRequest.js';
import type { FlagSnapshot__Output } from './generated/coresdk/v1/FlagSnapshot.js';
import type { Flag__Output } from './generated/coresdk/v1/Flag.js';
import type { WatchFlagsResponse__Output } from './generated/coresdk/v1/WatchFlagsResponse.js';
import {
  api,
  type AuditServiceClient,
  type AuthServiceClient,
  type FlagServiceClient,
  type TenantServiceClient,
  type WebhookServiceClient,
} from './proto.js';
import type {
  AuditOptions,
  AuditQuery,
  AuditRecord,
  AuthorizeOptions,
  ChangeOptions,
  Claims,
  ConsistencyProof,
  CoreSDKClient,
  Decision,
  Flag,
  FlagExplanation,
  FlagValue,
  InclusionProof,
  VerifyResult,
  WebhookOptions,
  WebhookResult,
} from './types.js';
import { webhookPayload } from './http.js';
import { checkFlagList, checkIds, idDefect } from './validation.js';
import {
  auditRecordFromProto,
  claimsFromProto,
  consistencyProofFromProto,
  decisionFromProto,
  explanationFromProto,
  flagFromProto,
  flagValueToProto,
  inclusionProofFromProto,
  metadataToStruct,
  problemFromError,
  verifyResultFromProto,
  webhookResultFromProto,
} from './wire.js';

/** Where the client reports an outage (once when it starts, once when it ends) and a full spool. */
export interface Logger {
  warn(message: string): void;
  error(message: string): void;
}

export interface SidecarClientOptions {
  /** Keep a local flag cache fed by WatchFlags (default true). */
  watch?: boolean;
  /** Default `console`. */
  logger?: Logger;
}

/**
 * How much longer than its timeout a call with `includeProof` may take: the sidecar answers once
 * a checkpoint covering the record is signed, which it does early for it (about a second).
 */
const PROOF_WAIT_MS = 5_000;
/**
 * A full verification replays the whole log, which can take far longer than a call's timeout;
 * the sidecar stops it at its own request timeout (CORESDK_REQUEST_TIMEOUT_S, 30 s by default).
 */
const FULL_VERIFY_TIMEOUT_MS = 60_000;
const RETRY_FIRST_DELAY_MS = 20;
const RETRY_MAX_DELAY_MS = 500;
const WATCH_FIRST_BACKOFF_MS = 50;
const WATCH_MAX_BACKOFF_MS = 5_000;

function jittered(ms: number): number {
  return ms * (0.5 + Math.random());
}

/** A logger that throws must not fail a call, nor reject a background flush unhandled. */
function safeLogger(logger: Logger): Logger {
  const guarded = (log: (message: string) => void) => (message: string) => {
    try {
      log.call(logger, message);
    } catch {
      // Nowhere left to report it.
    }
  };
  return { warn: guarded(logger.warn), error: guarded(logger.error) };
}

/** An outage logged once when it starts and once when it ends, not once per call. */
class Outage {
  #down = false;
  failModeDecisions = 0;

  constructor(
    private readonly failMode: string,
    private readonly logger: Logger,
  ) {}

  get down(): boolean {
    return this.#down;
  }

  failed(why: string): void {
    if (this.#down) return;
    this.#down = true;
    this.logger.warn(`coresdk sidecar unavailable (${why}); fail mode ${this.failMode} applies until it is back`);
  }

  /** True when this ends an outage. */
  recovered(): boolean {
    if (!this.#down) return false;
    this.#down = false;
    this.logger.warn('coresdk sidecar is back');
    return true;
  }
}

/** Every tenant's flags plus the catalog defaults, kept exact by a WatchFlags stream. */
class FlagCache {
  /** tenant → key → flag: two lookups and no key to build on the hot path. */
  flags = new Map<string, Map<string, Flag>>();
  defaults = new Map<string, Flag>();
  /** A snapshot arrived at least once (the values may be old). */
  warm = false;
  /** The stream is up: the values are current. */
  connected = false;
  #waiters = new Set<(release?: boolean) => void>();

  replace(snapshot: FlagSnapshot__Output): void {
    const flags = new Map<string, Map<string, Flag>>();
    for (const proto of snapshot.flags) {
      let tenant = flags.get(proto.tenantId);
      if (tenant === undefined) flags.set(proto.tenantId, (tenant = new Map()));
      tenant.set(proto.key, flagFromProto(proto));
    }
    const defaults = new Map<string, Flag>();
    for (const proto of snapshot.defaults) defaults.set(proto.key, flagFromProto(proto));
    this.flags = flags;
    this.defaults = defaults;
    this.warm = true;
    this.#notify();
  }

  apply(change: Flag__Output): void {
    let tenant = this.flags.get(change.tenantId);
    if (tenant === undefined) this.flags.set(change.tenantId, (tenant = new Map()));
    const current = tenant.get(change.key);
    if (current === undefined || current.version < change.version) tenant.set(change.key, flagFromProto(change));
    this.#notify();
  }

  stored(tenantId: string, key: string): Flag | undefined {
    return this.flags.get(tenantId)?.get(key);
  }

  get(tenantId: string, key: string): Flag | undefined {
    const flag = this.stored(tenantId, key);
    if (flag !== undefined) return flag;
    const fallback = this.defaults.get(key);
    if (fallback === undefined) return undefined;
    return { tenantId, key, value: fallback.value, version: 0, isDefault: true, updatedBy: '' };
  }

  ofTenant(tenantId: string): Record<string, Flag> {
    const out: Record<string, Flag> = {};
    for (const [key, fallback] of this.defaults) {
      out[key] = { tenantId, key, value: fallback.value, version: 0, isDefault: true, updatedBy: '' };
    }
    for (const [key, flag] of this.flags.get(tenantId) ?? []) out[key] = flag;
    return out;
  }

  /** Resolves true once `predicate` holds, false after `timeoutMs` or on `release`. */
  waitFor(predicate: () => boolean, timeoutMs: number): Promise<boolean> {
    if (predicate()) return Promise.resolve(true);
    if (timeoutMs <= 0) return Promise.resolve(false);
    return new Promise((resolve) => {
      const check = (release = false): void => {
        if (release) finish(false);
        else if (predicate()) finish(true);
      };
      const finish = (result: boolean): void => {
        clearTimeout(timer);
        this.#waiters.delete(check);
        resolve(result);
      };
      const timer = setTimeout(() => finish(false), timeoutMs);
      // A caller waiting for its write to show is no reason to keep the process alive.
      timer.unref();
      this.#waiters.add(check);
    });
  }

  /** Ends every wait now (the client is closing). */
  release(): void {
    for (const check of [...this.#waiters]) check(true);
  }

  #notify(): void {
    for (const check of [...this.#waiters]) check();
  }
}

type Invoke<T> = (
  metadata: grpc.Metadata,
  options: grpc.CallOptions,
  callback: (error: grpc.ServiceError | null, value?: T) => void,
) => grpc.ClientUnaryCall;

interface CallOptions {
  admin?: boolean;
  /** Safe to send again after a transport failure (reads; webhooks, deduplicated by event id). */
  idempotent?: boolean;
  /** How much longer than `timeoutMs` the call may take (a proof's checkpoint, a full verification). */
  extraMs?: number;
}

function channelCredentials(settings: Settings): grpc.ChannelCredentials {
  if (!usesTls(settings)) return grpc.credentials.createInsecure();
  const read = (path: string | undefined): Buffer | null => (path === undefined ? null : readFileSync(path));
  const { caFile, clientCertFile, clientKeyFile } = settings.tls;
  return grpc.credentials.createSsl(read(caFile), read(clientKeyFile), read(clientCertFile));
}

function channelOptions(settings: Settings): grpc.ChannelOptions {
  // The client retries itself (and never a write that may have committed): grpc-js must not.
  const options: grpc.ChannelOptions = { 'grpc.enable_retries': 0, 'grpc.keepalive_time_ms': 30_000 };
  const serverName = settings.tls.serverName;
  if (serverName !== undefined) {
    options['grpc.ssl_target_name_override'] = serverName;
    options['grpc.default_authority'] = serverName;
  }
  return options;
}

export class SidecarClient implements CoreSDKClient {
  readonly settings: Settings;
  readonly #logger: Logger;
  readonly #outage: Outage;
  readonly #cache = new FlagCache();
  readonly #webhooks: WebhookServiceClient;
  readonly #flags: FlagServiceClient;
  readonly #audit: AuditServiceClient;
  readonly #auth: AuthServiceClient;
  readonly #tenants: TenantServiceClient;
  /** Audit records kept while the sidecar is away (fail mode open); oldest first. */
  readonly #spool: AppendAuditRequest[] = [];
  #flushing = false;
  #closed = false;
  #stream: grpc.ClientReadableStream<WatchFlagsResponse__Output> | null = null;
  #reconnect: NodeJS.Timeout | null = null;
  #watchBackoffMs = WATCH_FIRST_BACKOFF_MS;

  constructor(settings?: Settings, options: SidecarClientOptions = {}) {
    this.settings = settings ?? settingsFromEnv();
    this.#logger = safeLogger(options.logger ?? console);
    this.#outage = new Outage(this.settings.failMode, this.#logger);
    const { services } = api();
    const credentials = channelCredentials(this.settings);
    const addr = this.settings.sidecarAddr;
    this.#flags = new services.FlagService(addr, credentials, channelOptions(this.settings));
    // One channel (one connection) for every service.
    const shared = { channelOverride: this.#flags.getChannel() };
    this.#webhooks = new services.WebhookService(addr, credentials, shared);
    this.#audit = new services.AuditService(addr, credentials, shared);
    this.#auth = new services.AuthService(addr, credentials, shared);
    this.#tenants = new services.TenantService(addr, credentials, shared);
    if (options.watch ?? true) this.#watch();
  }

  // -- state a caller may look at -----------------------------------------------------------

  /** The local flag cache is fed by a live WatchFlags stream. */
  get cacheCurrent(): boolean {
    return this.#cache.connected;
  }

  /** How many answers the fail mode gave instead of the sidecar. */
  get failModeDecisions(): number {
    return this.#outage.failModeDecisions;
  }

  get spooled(): number {
    return this.#spool.length;
  }

  // -- plumbing -----------------------------------------------------------------------------

  #metadata(admin: boolean): grpc.Metadata {
    const metadata = new grpc.Metadata();
    const token = (admin ? this.settings.adminToken : undefined) ?? this.settings.apiToken;
    if (token !== undefined) metadata.set('authorization', `Bearer ${token}`);
    return metadata;
  }

  #closedError(): ProblemError {
    return new ProblemError({
      type: 'about:blank',
      title: 'Client closed',
      status: 500,
      detail: 'this SidecarClient was closed',
    });
  }

  #once<T>(invoke: Invoke<T>, deadline: number, admin: boolean, waitForReady: boolean): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      const metadata = this.#metadata(admin);
      metadata.setOptions({ waitForReady });
      invoke(metadata, { deadline }, (error, value) => {
        if (error) reject(error);
        else if (value === undefined) reject(new Error('the sidecar sent no answer'));
        else resolve(value);
      });
    });
  }

  /**
   * One call within the deadline, retrying what `ProblemError.retryable` says is worth it (the
   * sidecar away or slow, or the connection at its call limit) with jittered exponential backoff. Webhooks are deduplicated by event id, appends by their idempotency
   * key, and reads repeat safely. A write that is not idempotent (`SetFlag`) is retried only
   * after the sidecar said it committed nothing: a transport failure may have come after the
   * commit, and a retry would write it twice. Such a write waits for the connection instead
   * (within the deadline), so a sidecar that is restarting fails it before it was ever sent.
   */
  async #call<T>(invoke: Invoke<T>, { admin = false, idempotent = true, extraMs = 0 }: CallOptions = {}): Promise<T> {
    if (this.#closed) throw this.#closedError();
    const deadline = Date.now() + this.settings.timeoutMs + extraMs;
    let delay = RETRY_FIRST_DELAY_MS;
    for (;;) {
      try {
        const answer = await this.#once(invoke, Math.max(deadline, Date.now() + 1), admin, !idempotent);
        if (this.#outage.recovered()) this.#sidecarBack();
        return answer;
      } catch (caught) {
        if (this.#closed) throw this.#closedError();
        const error = problemFromError(caught, this.settings.problemTypeBase);
        const transport = error instanceof SidecarUnavailableError;
        if (transport) this.#outage.failed(error.problem.detail ?? 'no answer');
        if (!error.retryable || (transport && !idempotent) || Date.now() + delay >= deadline) throw error;
        await sleep(jittered(delay));
        delay = Math.min(delay * 2, RETRY_MAX_DELAY_MS);
      }
    }
  }

  #watch(): void {
    if (this.#closed) return;
    const stream = this.#flags.WatchFlags({}, this.#metadata(false));
    this.#stream = stream;
    stream.on('data', (message: WatchFlagsResponse__Output) => {
      try {
        if (message.event === 'snapshot' && message.snapshot) {
          this.#cache.replace(message.snapshot);
          this.#cache.connected = true;
          this.#watchBackoffMs = WATCH_FIRST_BACKOFF_MS;
          if (this.#outage.recovered()) this.#sidecarBack();
        } else if (message.event === 'change' && message.change) {
          this.#cache.apply(message.change);
        }
      } catch (error) {
        // A failure handling a message must not leave the cache marked current: it would
        // serve stale flags as fresh from then on.
        this.#logger.error(`coresdk: handling the flag stream failed (${String(error)}); reconnecting`);
        this.#streamEnded(stream, null);
        stream.cancel();
      }
    });
    stream.on('error', (error: grpc.ServiceError) => this.#streamEnded(stream, `flag stream: ${error.details || error.message}`));
    stream.on('end', () => this.#streamEnded(stream, 'flag stream ended'));
  }

  #streamEnded(stream: grpc.ClientReadableStream<WatchFlagsResponse__Output>, why: string | null): void {
    if (this.#stream !== stream) return;
    this.#stream = null;
    this.#cache.connected = false;
    if (this.#closed) return;
    if (why !== null) this.#outage.failed(why);
    this.#reconnect = setTimeout(() => {
      this.#reconnect = null;
      this.#watch();
    }, jittered(this.#watchBackoffMs));
    // Reconnecting is no reason to keep the process alive.
    this.#reconnect.unref();
    this.#watchBackoffMs = Math.min(this.#watchBackoffMs * 2, WATCH_MAX_BACKOFF_MS);
  }

  /**
   * The sidecar answered again: send the spool, and reconnect the flag stream now rather than
   * after its backoff (up to 7.5 s), which meanwhile keeps the cache stale.
   */
  #sidecarBack(): void {
    this.#flushSpoolInBackground();
    if (this.#reconnect !== null && !this.#closed) {
      clearTimeout(this.#reconnect);
      this.#reconnect = null;
      this.#watchBackoffMs = WATCH_FIRST_BACKOFF_MS;
      this.#watch();
    }
  }

  /** A caller must not wait while up to `spoolLimit` records are sent. */
  #flushSpoolInBackground(): void {
    if (this.#spool.length > 0 && !this.#flushing) void this.#flushSpool();
  }

  async #flushSpool(): Promise<void> {
    if (this.#flushing) return;
    this.#flushing = true;
    let busyDelay = RETRY_FIRST_DELAY_MS;
    try {
      while (this.#spool.length > 0 && !this.#closed) {
        const request = this.#spool[0] as AppendAuditRequest;
        try {
          await this.#once<unknown>(
            (metadata, options, callback) => this.#audit.Append(request, metadata, options, callback),
            Date.now() + this.settings.timeoutMs,
            false,
            false,
          );
        } catch (caught) {
          if (this.#closed) return;
          const error = problemFromError(caught, this.settings.problemTypeBase);
          if (error.connectionBusy) {
            // Up but busy (not an outage): the same record again shortly.
            await sleep(jittered(busyDelay));
            busyDelay = Math.min(busyDelay * 2, 1000);
            continue;
          }
          if (error instanceof SidecarUnavailableError || error.retryable) {
            // Down again: the next recovery sends the rest.
            this.#outage.failed(`audit spool: ${error.problem.detail ?? error.message}`);
            return;
          }
          // The sidecar refuses this record for good: keeping it would block every later one.
          this.#logger.error(`coresdk: the sidecar refused a spooled audit record, dropped: ${error.message}`);
        }
        // A full spool may have dropped this record to make room while it was in flight.
        if (this.#spool[0] === request) this.#spool.shift();
      }
    } finally {
      this.#flushing = false;
    }
    // A record spooled while this flush was ending is sent now rather than after the next outage.
    if (this.#spool.length > 0 && !this.#outage.down && !this.#closed) this.#flushSpoolInBackground();
  }

  /**
   * Read-your-writes: once a change is acknowledged, wait (until `deadline`) for the local cache
   * to show it, so the caller's next `isEnabled` sees what it just did.
   */
  async #awaitCache(tenantId: string, versions: ReadonlyArray<readonly [string, number]>, deadline: number): Promise<void> {
    if (versions.length === 0 || !this.#cache.connected) return;
    await this.#cache.waitFor(
      () => versions.every(([key, version]) => (this.#cache.stored(tenantId, key)?.version ?? -1) >= version),
      deadline - Date.now(),
    );
  }

  /**
   * Read-your-writes for changes an answer does not list (the parked events a mapping applied):
   * the cache waits for the versions the sidecar holds now. Best effort, like every wait after a
   * commit: a failure here must not report a committed write as failed.
   */
  async #awaitTenant(tenantId: string, deadline: number): Promise<void> {
    if (!this.#cache.connected || Date.now() >= deadline) return;
    let answer: GetFlagsResponse__Output;
    try {
      answer = await this.#once<GetFlagsResponse__Output>(
        (m, o, cb) => this.#flags.GetFlags({ tenantId }, m, o, cb),
        deadline,
        false,
        false,
      );
    } catch {
      return;
    }
    await this.#awaitCache(
      tenantId,
      answer.flags.filter((flag) => !flag.isDefault).map((flag) => [flag.key, flag.version] as const),
      deadline,
    );
  }

  /** The waits after a committed write together take at most one `timeoutMs`. */
  #readYourWritesDeadline(): number {
    return Date.now() + this.settings.timeoutMs;
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#cache.connected = false;
    this.#cache.release();
    if (this.#reconnect !== null) clearTimeout(this.#reconnect);
    this.#reconnect = null;
    const stream = this.#stream;
    this.#stream = null;
    stream?.cancel();
    // Every service shares the channel: closing it once ends every connection.
    this.#flags.close();
  }

  // -- webhooks -----------------------------------------------------------------------------

  async handleStripeWebhook(rawBody: Buffer | Uint8Array | string, signatureHeader: string, options: WebhookOptions = {}): Promise<WebhookResult> {
    // Never decided by the fail mode: an effect that was not committed must make Stripe retry.
    const includeProof = options.includeProof === true;
    const request = { payload: webhookPayload(rawBody, this.settings.problemTypeBase), signatureHeader: signatureHeader ?? '', includeProof };
    const answer = await this.#call<HandleStripeWebhookResponse__Output>((m, o, cb) => this.#webhooks.HandleStripeWebhook(request, m, o, cb), {
      extraMs: includeProof ? PROOF_WAIT_MS : 0,
    });
    return this.#webhookCommitted(answer);
  }

  async replayEvent(payload: Buffer | Uint8Array | string, options: { reason: string }): Promise<WebhookResult> {
    const request = { payload: webhookPayload(payload, this.settings.problemTypeBase), reason: options.reason };
    const answer = await this.#call<HandleStripeWebhookResponse__Output>((m, o, cb) => this.#webhooks.ReplayStripeEvent(request, m, o, cb), { admin: true });
    return this.#webhookCommitted(answer);
  }

  async #webhookCommitted(answer: HandleStripeWebhookResponse__Output): Promise<WebhookResult> {
    const result = webhookResultFromProto(answer);
    const deadline = this.#readYourWritesDeadline();
    await this.#awaitCache(result.tenantId, result.flagChanges.map((c) => [c.key, c.version] as const), deadline);
    // A checkout that maps its customer applies the customer's parked events, whose changes the
    // answer does not list.
    if (result.eventType === 'checkout.session.completed' && result.outcome === 'applied') await this.#awaitTenant(result.tenantId, deadline);
    return result;
  }

  // -- flags --------------------------------------------------------------------------------

  async isEnabled(tenantId: string, key: string): Promise<boolean> {
    // The hot path: two Map lookups once the cache is current.
    if (this.#cache.connected) {
      const flag = this.#cache.flags.get(tenantId)?.get(key);
      if (flag !== undefined) return flag.value === true;
      const fallback = this.#cache.defaults.get(key);
      // A tenant with no flag of its own is answered by the default only if the sidecar would
      // accept its id.
      if (fallback !== undefined && idDefect(tenantId) === null) return fallback.value === true;
    }
    try {
      return (await this.getFlag(tenantId, key)).value === true;
    } catch (error) {
      if (error instanceof FlagNotFoundError) return false;
      throw error;
    }
  }

  async getFlag(tenantId: string, key: string): Promise<Flag> {
    checkIds(tenantId, key, this.settings.problemTypeBase);
    if (this.#cache.warm) {
      const flag = this.#cache.get(tenantId, key);
      // Under fail mode closed a stale cache answers nothing: the sidecar is asked, and only
      // its failure to answer is a 503 (the stream may still be waiting to reconnect while the
      // sidecar already answers calls).
      if (flag !== undefined && (this.#cache.connected || this.settings.failMode === 'open')) return flag;
    }
    try {
      const answer = await this.#call<Flag__Output>((m, o, cb) => this.#flags.GetFlag({ tenantId, key }, m, o, cb));
      return flagFromProto(answer);
    } catch (error) {
      if (!(error instanceof SidecarUnavailableError)) throw error;
      this.#outage.failModeDecisions += 1;
      if (this.settings.failMode === 'closed') throw error;
      throw new FlagNotFoundError(
        unavailableProblem(`flag '${key}' is not known locally and the sidecar is away`, this.settings.problemTypeBase),
        error.code,
      );
    }
  }

  async getFlags(tenantId: string): Promise<Record<string, Flag>> {
    checkIds(tenantId, null, this.settings.problemTypeBase);
    if (this.#cache.warm && (this.#cache.connected || this.settings.failMode === 'open')) {
      return this.#cache.ofTenant(tenantId);
    }
    const answer = await this.#call<GetFlagsResponse__Output>((m, o, cb) => this.#flags.GetFlags({ tenantId }, m, o, cb));
    const out: Record<string, Flag> = {};
    for (const flag of answer.flags) out[flag.key] = flagFromProto(flag);
    return out;
  }

  async explainFlag(tenantId: string, key: string): Promise<FlagExplanation> {
    checkIds(tenantId, key, this.settings.problemTypeBase);
    const answer = await this.#call<ExplainFlagResponse__Output>((m, o, cb) => this.#flags.ExplainFlag({ tenantId, key }, m, o, cb));
    return explanationFromProto(answer, tenantId, key);
  }

  async setFlag(tenantId: string, key: string, value: FlagValue, options: ChangeOptions): Promise<Flag> {
    const request = {
      tenantId,
      key,
      value: flagValueToProto(value, this.settings.problemTypeBase),
      actor: options.actor,
      reason: options.reason ?? '',
    };
    const answer = await this.#call<Flag__Output>((m, o, cb) => this.#flags.SetFlag(request, m, o, cb), {
      admin: true,
      idempotent: false,
    });
    const flag = flagFromProto(answer);
    await this.#awaitCache(tenantId, [[key, flag.version]], this.#readYourWritesDeadline());
    return flag;
  }

  // -- auth ---------------------------------------------------------------------------------

  async verifyToken(token: string): Promise<Claims> {
    const answer = await this.#call<Claims__Output>((m, o, cb) => this.#auth.VerifyToken({ token }, m, o, cb));
    return claimsFromProto(answer);
  }

  async authorize(options: AuthorizeOptions): Promise<Decision> {
    const request = {
      token: options.token ?? '',
      tenantId: options.tenantId ?? '',
      requiredFeatures: [...checkFlagList('required_features', options.require, this.settings.problemTypeBase)],
      denyIf: [...checkFlagList('deny_if', options.denyIf, this.settings.problemTypeBase)],
      resource: options.resource ?? '',
      includeClaims: true,
    };
    try {
      return decisionFromProto(await this.#call<AuthorizeResponse__Output>((m, o, cb) => this.#auth.Authorize(request, m, o, cb)));
    } catch (error) {
      if (!(error instanceof SidecarUnavailableError)) throw error;
      this.#outage.failModeDecisions += 1;
      const closed = this.settings.failMode === 'closed';
      return {
        allowed: !closed,
        problem: closed ? error.problem : null,
        tenantId: options.tenantId ?? '',
        subject: '',
        failModeApplied: true,
        claims: null,
      };
    }
  }

  // -- audit --------------------------------------------------------------------------------

  async audit(options: AuditOptions): Promise<AuditRecord | null> {
    const request: AppendAuditRequest = {
      tenantId: options.tenantId ?? '',
      actor: options.actor,
      event: options.event,
      outcome: options.outcome,
      metadata: metadataToStruct(options.metadata, this.settings.problemTypeBase),
      // Every resend of this record, a retry or the spool's after an outage, answers the one
      // record the sidecar stored, even when an answer was lost after the commit.
      idempotencyKey: randomUUID(),
      includeProof: options.includeProof === true,
    };
    try {
      const answer = await this.#call<AuditRecord__Output>((m, o, cb) => this.#audit.Append(request, m, o, cb), {
        extraMs: request.includeProof ? PROOF_WAIT_MS : 0,
      });
      return auditRecordFromProto(answer);
    } catch (error) {
      if (!(error instanceof SidecarUnavailableError) || this.settings.failMode === 'closed') throw error;
      this.#outage.failModeDecisions += 1;
      if (this.settings.spoolLimit === 0) {
        this.#logger.error('coresdk audit spool is disabled (spoolLimit 0); the record was dropped');
        return null;
      }
      if (this.#spool.length >= this.settings.spoolLimit) {
        this.#logger.error('coresdk audit spool is full; the oldest spooled record was dropped');
        this.#spool.shift();
      }
      // Nobody waits for the spooled record's answer: its proof would only slow the flush.
      this.#spool.push({ ...request, includeProof: false });
      return null;
    }
  }

  async auditQuery(query: AuditQuery = {}): Promise<AuditRecord[]> {
    const limit = query.limit ?? 1000;
    const records: AuditRecord[] = [];
    let pageToken = '';
    while (records.length < limit) {
      const request = {
        tenantId: query.tenantId ?? '',
        eventPrefix: query.eventPrefix ?? '',
        outcome: query.outcome ?? '',
        pageSize: Math.min(1000, limit - records.length),
        pageToken,
      };
      const page = await this.#call<QueryAuditResponse__Output>((m, o, cb) => this.#audit.Query(request, m, o, cb));
      for (const record of page.records) records.push(auditRecordFromProto(record));
      pageToken = page.nextPageToken;
      if (!pageToken) break;
    }
    return records;
  }

  async auditVerify(options: { full?: boolean } = {}): Promise<VerifyResult> {
    const full = options.full === true;
    const r = await this.#call<VerifyAuditResponse__Output>((m, o, cb) => this.#audit.Verify({ full }, m, o, cb), {
      extraMs: full ? Math.max(FULL_VERIFY_TIMEOUT_MS - this.settings.timeoutMs, 0) : 0,
    });
    return verifyResultFromProto(r);
  }

  async auditCheckpoint(): Promise<string> {
    const r = await this.#call<GetCheckpointResponse__Output>((m, o, cb) => this.#audit.GetCheckpoint({}, m, o, cb));
    return r.note;
  }

  async auditInclusionProof(seq: number, treeSize = 0): Promise<InclusionProof> {
    const request = { seq, treeSize };
    const r = await this.#call<InclusionProof__Output>((m, o, cb) => this.#audit.GetInclusionProof(request, m, o, cb));
    return inclusionProofFromProto(r);
  }

  async auditConsistencyProof(fromSize: number, toSize = 0): Promise<ConsistencyProof> {
    const request = { fromSize, toSize };
    const r = await this.#call<GetConsistencyProofResponse__Output>((m, o, cb) => this.#audit.GetConsistencyProof(request, m, o, cb));
    return consistencyProofFromProto(r);
  }

  // -- tenants ------------------------------------------------------------------------------

  async mapCustomer(customerId: string, tenantId: string, options: ChangeOptions): Promise<number> {
    const request = { customerId, tenantId, actor: options.actor, reason: options.reason ?? '' };
    const answer = await this.#call<CustomerMapping__Output>((m, o, cb) => this.#tenants.MapCustomer(request, m, o, cb), { admin: true });
    // Even when it reports no parked events applied: a retry whose first attempt committed (and
    // applied them) reports 0.
    await this.#awaitTenant(tenantId, this.#readYourWritesDeadline());
    return answer.parkedEventsApplied;
  }

  async resolveCustomer(customerId: string): Promise<string | null> {
    try {
      const answer = await this.#call<CustomerMapping__Output>((m, o, cb) => this.#tenants.ResolveCustomer({ customerId }, m, o, cb), {
        admin: true,
      });
      return answer.tenantId;
    } catch (error) {
      if (error instanceof ProblemError && error.code === GrpcCode.NOT_FOUND) return null;
      throw error;
    }
  }
}
