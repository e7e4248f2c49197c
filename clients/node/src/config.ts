// Client settings, from the environment like the sidecar's and the Python client's.

export type FailMode = 'open' | 'closed';

export interface TlsSettings {
  /** The CA that signed the sidecar's certificate (else the system's roots). */
  caFile?: string;
  /** The name to expect in the sidecar's certificate (else the address's host). */
  serverName?: string;
  /** A client certificate and key for mutual TLS: both, or neither. */
  clientCertFile?: string;
  clientKeyFile?: string;
}

export interface Settings {
  sidecarAddr: string;
  failMode: FailMode;
  useMock: boolean;
  timeoutMs: number;
  problemTypeBase: string;
  /** Audit records kept while the sidecar is away under fail mode `open`. */
  spoolLimit: number;
  /** TLS to the sidecar: on when any field is set. */
  tls: TlsSettings;
  // Not enumerable (see `settingsFromEnv`): settings end up in logs and error reports.
  readonly apiToken?: string;
  readonly adminToken?: string;
}

export const DEFAULTS = {
  sidecarAddr: 'localhost:50051',
  failMode: 'open',
  useMock: false,
  timeoutMs: 1000,
  problemTypeBase: 'https://coresdk.dev/problems',
  spoolLimit: 10_000,
} as const satisfies Partial<Settings>;

const TRUE = new Set(['1', 'true', 'yes', 'on']);

type Env = Readonly<Record<string, string | undefined>>;

function nonEmpty(value: string | undefined): string | undefined {
  return value === undefined || value.trim() === '' ? undefined : value;
}

/** `given` without its undefined fields: `{timeoutMs: undefined}` means "not given", not "none". */
function definedOnly<T extends object>(given: T): Partial<T> {
  return Object.fromEntries(Object.entries(given).filter(([, value]) => value !== undefined)) as Partial<T>;
}

/** Settings with every field given, the tokens kept out of `JSON.stringify`, `util.inspect` and spreads. */
export function makeSettings(given: Partial<Settings> = {}): Settings {
  const { apiToken, adminToken, tls, ...rest } = given;
  const settings = { ...DEFAULTS, ...definedOnly(rest), tls: { ...tls } } as Settings;
  if (settings.failMode !== 'open' && settings.failMode !== 'closed') {
    throw new Error(`failMode must be 'open' or 'closed', not ${JSON.stringify(settings.failMode)}`);
  }
  if (!Number.isInteger(settings.timeoutMs) || settings.timeoutMs <= 0) {
    throw new Error(`timeoutMs must be a positive integer, not ${JSON.stringify(settings.timeoutMs)}`);
  }
  if (!Number.isInteger(settings.spoolLimit) || settings.spoolLimit < 0) {
    throw new Error(`spoolLimit must be a non-negative integer, not ${JSON.stringify(settings.spoolLimit)}`);
  }
  if ((settings.tls.clientCertFile === undefined) !== (settings.tls.clientKeyFile === undefined)) {
    throw new Error('tls.clientCertFile and tls.clientKeyFile go together: set both, or neither');
  }
  Object.defineProperty(settings, 'apiToken', { value: apiToken, enumerable: false });
  Object.defineProperty(settings, 'adminToken', { value: adminToken, enumerable: false });
  return settings;
}

/**
 * Reads CORESDK_SIDECAR_ADDR, CORESDK_FAIL_MODE, CORESDK_USE_MOCK, CORESDK_TIMEOUT_MS,
 * CORESDK_API_TOKEN, CORESDK_ADMIN_TOKEN, CORESDK_PROBLEM_TYPE_BASE and CORESDK_SIDECAR_TLS_*;
 * `overrides` win over the environment.
 */
export function settingsFromEnv(env: Env = process.env, overrides: Partial<Settings> = {}): Settings {
  const failMode = (env.CORESDK_FAIL_MODE ?? 'open').trim().toLowerCase();
  if (failMode !== 'open' && failMode !== 'closed') {
    throw new Error(`CORESDK_FAIL_MODE must be 'open' or 'closed', not ${JSON.stringify(failMode)}`);
  }
  const timeout = (env.CORESDK_TIMEOUT_MS ?? '1000').trim();
  if (!/^[0-9]+$/.test(timeout) || Number(timeout) <= 0 || !Number.isSafeInteger(Number(timeout))) {
    throw new Error(`CORESDK_TIMEOUT_MS must be a positive integer, not ${JSON.stringify(timeout)}`);
  }
  const clientCertFile = nonEmpty(env.CORESDK_SIDECAR_TLS_CLIENT_CERT_FILE);
  const clientKeyFile = nonEmpty(env.CORESDK_SIDECAR_TLS_CLIENT_KEY_FILE);
  if ((clientCertFile === undefined) !== (clientKeyFile === undefined)) {
    throw new Error(
      'CORESDK_SIDECAR_TLS_CLIENT_CERT_FILE and CORESDK_SIDECAR_TLS_CLIENT_KEY_FILE go together: set both, or neither',
    );
  }
  return makeSettings({
    sidecarAddr: nonEmpty(env.CORESDK_SIDECAR_ADDR) ?? DEFAULTS.sidecarAddr,
    failMode,
    useMock: TRUE.has((env.CORESDK_USE_MOCK ?? 'false').trim().toLowerCase()),
    timeoutMs: Number(timeout),
    apiToken: nonEmpty(env.CORESDK_API_TOKEN),
    adminToken: nonEmpty(env.CORESDK_ADMIN_TOKEN),
    problemTypeBase: nonEmpty(env.CORESDK_PROBLEM_TYPE_BASE) ?? DEFAULTS.problemTypeBase,
    tls: {
      caFile: nonEmpty(env.CORESDK_SIDECAR_TLS_CA_FILE),
      serverName: nonEmpty(env.CORESDK_SIDECAR_TLS_SERVER_NAME),
      clientCertFile,
      clientKeyFile,
    },
    ...definedOnly(overrides),
  });
}

export function usesTls(settings: Settings): boolean {
  const { caFile, serverName, clientCertFile, clientKeyFile } = settings.tls;
  return [caFile, serverName, clientCertFile, clientKeyFile].some((v) => v !== undefined);
}
