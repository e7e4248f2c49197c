//! The serving status of each gRPC service, in one place: the gRPC health service reports it
//! and the ops listener's `/readyz` reads it, so the two never disagree.

use std::collections::BTreeMap;
use std::sync::Mutex;

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

/// The services the main listener serves, as the health service names them.
pub const SERVICE_NAMES: [&str; 5] = [
    "coresdk.v1.WebhookService",
    "coresdk.v1.FlagService",
    "coresdk.v1.AuditService",
    "coresdk.v1.TenantService",
    "coresdk.v1.AuthService",
];

/// Services that need the database: NOT_SERVING while it is unreachable. The server as a
/// whole (`""`), FlagService and AuthService stay SERVING, since they answer from memory.
pub const NEEDS_STORE: [&str; 3] = [
    "coresdk.v1.WebhookService",
    "coresdk.v1.AuditService",
    "coresdk.v1.TenantService",
];

pub struct Health {
    reporter: HealthReporter,
    /// What the reporter was last told, by service (`""`: the server as a whole).
    statuses: Mutex<BTreeMap<&'static str, ServingStatus>>,
}

impl Health {
    /// Every service (and the server as a whole) NOT_SERVING until [`Health::set_all`] says
    /// otherwise, and the gRPC health service that reports it.
    pub fn new() -> (
        Self,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    ) {
        let (reporter, service) = tonic_health::server::health_reporter();
        let statuses = SERVICE_NAMES
            .into_iter()
            .chain([""])
            .map(|name| (name, ServingStatus::NotServing))
            .collect();
        (
            Self {
                reporter,
                statuses: Mutex::new(statuses),
            },
            service,
        )
    }

    pub async fn set(&self, service: &'static str, status: ServingStatus) {
        self.reporter.set_service_status(service, status).await;
        self.statuses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(service, status);
    }

    /// Every service and the server as a whole.
    pub async fn set_all(&self, status: ServingStatus) {
        for name in SERVICE_NAMES.into_iter().chain([""]) {
            self.set(name, status).await;
        }
    }

    /// The services that are not SERVING (`""` is the server as a whole); none when ready.
    pub fn not_serving(&self) -> Vec<&'static str> {
        self.statuses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|(_, status)| **status != ServingStatus::Serving)
            .map(|(name, _)| *name)
            .collect()
    }
}
