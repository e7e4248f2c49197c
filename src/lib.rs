//! CoreSDK sidecar: verified Stripe webhooks, per-tenant feature flags and a tamper-evident
//! audit trail, served over localhost gRPC.
#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod audit;
pub mod auth;
pub mod call_end;
pub mod checkpoint;
pub mod cli;
pub mod coalesce;
pub mod config;
pub mod drain;
pub mod feeds;
pub mod flags;
pub mod health;
pub mod limits;
pub mod methods;
pub mod metrics;
pub mod openfeature;
pub mod ops;
pub mod ops_listener;
pub mod problem;
pub mod reload;
pub mod rules;
pub mod server;
pub mod settings;
pub mod shared_run;
pub mod store;
pub mod stripe;
pub mod telemetry;
pub mod time;
pub mod tlog;
pub mod tlog_proof;

pub mod proto {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("coresdk.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("coresdk_descriptor");
}

/// flagd's evaluation and sync protocols as published (proto/flagd), for OpenFeature's flagd
/// providers.
pub mod flagd_proto {
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("flagd_descriptor");
    pub mod evaluation {
        pub mod v1 {
            #![allow(clippy::all, clippy::pedantic)]
            tonic::include_proto!("flagd.evaluation.v1");
        }
        pub mod v2 {
            #![allow(clippy::all, clippy::pedantic)]
            tonic::include_proto!("flagd.evaluation.v2");
        }
    }
    pub mod sync {
        pub const FILE_DESCRIPTOR_SET: &[u8] =
            tonic::include_file_descriptor_set!("flagd_sync_descriptor");
        pub mod v1 {
            #![allow(clippy::all, clippy::pedantic)]
            tonic::include_proto!("flagd.sync.v1");
        }
    }
}
