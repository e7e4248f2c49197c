// @coresdk/client: the Node.js client of the CoreSDK sidecar.
//
//   import { CoreSDK } from '@coresdk/client';
//   const sdk = CoreSDK.fromEnv();          // CORESDK_USE_MOCK=true gives the in-process mock
//   await sdk.isEnabled('acme-corp', 'pro_features');

export * from './types.js';
export * from './errors.js';
export * from './config.js';
export * from './client.js';
export * from './validation.js';
export * from './mock.js';
export * from './sdk.js';
