//! Reading the whole audit trail back, past the 1,000-record page.

use coresdk::proto::{AuditRecord, QueryAuditRequest};

use super::Sidecar;

/// Every record under `event_prefix` (all of them for ""), all pages.
pub async fn audit_records(sidecar: &Sidecar, event_prefix: &str) -> Vec<AuditRecord> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = sidecar
            .audit()
            .query(QueryAuditRequest {
                event_prefix: event_prefix.into(),
                page_size: 1000,
                page_token,
                ..Default::default()
            })
            .await
            .expect("Query")
            .into_inner();
        all.extend(page.records);
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}
