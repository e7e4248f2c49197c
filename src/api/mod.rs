//! gRPC adapters: decode a request into domain values, call one `App` use case, encode the
//! answer or the error. No decisions of their own.

pub mod audit;
pub mod auth;
pub mod convert;
pub mod flags;
pub mod status;
pub mod tenants;
pub mod webhook;

use std::sync::Arc;

use crate::app::App;
use crate::auth::tokens_match;
use crate::problem::{Error, ProblemLinks};

pub type SharedApp = Arc<App>;

/// The token of `authorization: Bearer <token>`, if the call carries one.
pub fn bearer(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
}

/// Every RPC but health needs the API token when one is configured; an operator's token,
/// which can do more, is accepted too.
pub fn api_token_check(
    api_token: Option<crate::reload::Secret<String>>,
    operators: crate::config::Operators,
    links: ProblemLinks,
) -> impl Fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |request: tonic::Request<()>| {
        let Some(api_token) = &api_token else {
            return Ok(request);
        };
        let metadata = request.metadata();
        // `x-api-key` is OFREP's API-key header; accepted everywhere so one rule decides.
        let by_header = ["x-coresdk-api-token", "x-api-key"]
            .into_iter()
            .any(|name| {
                metadata
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|h| api_token.with(|expected| tokens_match(h, expected)))
            });
        let accepted = by_header
            || bearer(metadata).is_some_and(|b| {
                api_token.with(|expected| tokens_match(b, expected))
                    || operators.identify(b).is_some()
            });
        if accepted {
            Ok(request)
        } else {
            Err(status::of_error(
                &Error::Unauthenticated(
                    "this sidecar needs its API token: 'authorization: Bearer <token>', 'x-coresdk-api-token' or 'x-api-key'",
                ),
                &links,
            ))
        }
    }
}

/// A stream that a handler feeds from a task; ends when the task drops its sender.
pub type ResponseStream<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send>>;
