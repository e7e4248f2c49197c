// The one way in: a client of the sidecar, or the in-process mock, chosen by the environment.

import { settingsFromEnv, type Settings } from './config.js';
import { SidecarClient } from './client.js';
import { MockSidecar } from './mock.js';
import type { CoreSDKClient } from './types.js';

type Env = Readonly<Record<string, string | undefined>>;

export const CoreSDK = {
  /**
   * Settings from `env` (CORESDK_SIDECAR_ADDR, CORESDK_FAIL_MODE, CORESDK_USE_MOCK,
   * CORESDK_TIMEOUT_MS, …; `overrides` win): the in-process mock when CORESDK_USE_MOCK is true,
   * else a client of the sidecar.
   */
  fromEnv(env: Env = process.env, overrides: Partial<Settings> = {}): CoreSDKClient {
    const settings = settingsFromEnv(env, overrides);
    return settings.useMock ? new MockSidecar(settings, env) : new SidecarClient(settings);
  },
};
