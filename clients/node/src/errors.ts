// Typed errors that carry the sidecar's RFC 9457 problem, for both the client and the mock.

import type { Problem } from './types.js';

/** gRPC status codes the client tells apart (the numbers of `@grpc/grpc-js`'s `status`). */
export const GrpcCode = {
  OK: 0,
  INVALID_ARGUMENT: 3,
  DEADLINE_EXCEEDED: 4,
  NOT_FOUND: 5,
  PERMISSION_DENIED: 7,
  RESOURCE_EXHAUSTED: 8,
  FAILED_PRECONDITION: 9,
  OUT_OF_RANGE: 11,
  UNAVAILABLE: 14,
  UNAUTHENTICATED: 16,
} as const;

/** The sidecar refused a call unstarted: its connection had all the calls it may run at once. */
export const CONNECTION_BUSY = 'TOO_MANY_CALLS_ON_CONNECTION';

/** A call failed; `problem` is what to return to your own HTTP caller, as is. */
export class ProblemError extends Error {
  override name = 'ProblemError';

  constructor(
    readonly problem: Problem,
    /** The gRPC status code, when the answer came over gRPC. */
    readonly code?: number,
  ) {
    super(`${problem.status} ${problem.title}${problem.detail ? `: ${problem.detail}` : ''}`);
  }

  get status(): number {
    return this.problem.status;
  }

  get reason(): string {
    return typeof this.problem.reason === 'string' ? this.problem.reason : '';
  }

  /**
   * Worth trying again shortly: the sidecar was away or slow, or it refused the call before
   * starting it because this connection already had as many calls running as it allows
   * (`CORESDK_MAX_CONCURRENT_PER_CONNECTION`), which a moment's wait frees.
   */
  get retryable(): boolean {
    return this.connectionBusy || this.code === GrpcCode.UNAVAILABLE || this.code === GrpcCode.DEADLINE_EXCEEDED;
  }

  /** Refused unstarted for the connection's call limit: the sidecar is up, only busy. */
  get connectionBusy(): boolean {
    return this.code === GrpcCode.RESOURCE_EXHAUSTED && this.reason === CONNECTION_BUSY;
  }
}

/** No flag of that key is defined. */
export class FlagNotFoundError extends ProblemError {
  override name = 'FlagNotFoundError';
}

/** The sidecar could not be reached (or did not answer in time). */
export class SidecarUnavailableError extends ProblemError {
  override name = 'SidecarUnavailableError';
}

/** The URI of problem type `name` under `typeBase`, whether or not the base ends with a slash. */
export function problemTypeUri(typeBase: string, name: string): string {
  return `${typeBase.replace(/\/+$/, '')}/${name}`;
}

export function unavailableProblem(detail: string, typeBase = 'https://coresdk.dev/problems'): Problem {
  return {
    type: problemTypeUri(typeBase, 'sidecar-unavailable'),
    title: 'Service Unavailable',
    status: 503,
    detail,
    reason: 'SIDECAR_UNAVAILABLE',
  };
}
