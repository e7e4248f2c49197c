//! Stripe webhooks: signature verification and the typed view of a verified event.
pub mod event;
pub mod export;
pub mod signature;

pub use event::StripeEvent;
pub use signature::{SignatureVerifier, sign_header};
