//! Stripe webhooks: signature verification and the typed view of a verified event.
pub mod event;
pub mod export;
pub mod signature;

pub use event::{EventOrder, SUBSCRIPTION_STATE_EVENTS, SUBSCRIPTION_STATUSES, StripeEvent};
pub use signature::{SignatureVerifier, sign_header};
