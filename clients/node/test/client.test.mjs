// The client contract (test/suite.mjs) against the real sidecar binary.

import { Sidecar } from '../../../tests/openfeature-node/sidecar.mjs';
import { clientFor } from './helpers.mjs';
import { defineClientSuite } from './suite.mjs';

defineClientSuite('sidecar', async () => {
  const sidecar = await Sidecar.start();
  try {
    const sdk = await clientFor(sidecar);
    return {
      sdk,
      another: () => clientFor(sidecar),
      close: async () => {
        await sdk.close();
        await sidecar.close();
      },
    };
  } catch (error) {
    await sidecar.close();
    throw error;
  }
});
