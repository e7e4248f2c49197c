//! Domain errors and denials → gRPC statuses. The code, HTTP status and reason come from
//! `crate::problem`; this only encodes them: a `google.rpc.Status` whose details hold the
//! `coresdk.v1.Problem`, an `ErrorInfo` and, for field errors, a `BadRequest`.

use prost::Message as _;
use tonic::Code;
use tonic_types::pb;

use super::convert;
use crate::problem::{Denial, Error, FieldViolation, Mapping, Problem, ProblemLinks};

pub const ERROR_DOMAIN: &str = "coresdk.dev";

pub fn of_error(error: &Error, links: &ProblemLinks) -> tonic::Status {
    encode(&error.mapping(), error.problem(links), error.violations())
}

/// For `VerifyToken`, where a token that does not verify is an error, not an answer.
pub fn of_denial(denial: &Denial, links: &ProblemLinks) -> tonic::Status {
    encode(&denial.mapping(), denial.problem(links, "", ""), &[])
}

fn encode(mapping: &Mapping, problem: Problem, violations: &[FieldViolation]) -> tonic::Status {
    let code: Code = mapping.code;
    let detail = problem.detail.clone();
    let mut details = vec![
        prost_types::Any {
            type_url: "type.googleapis.com/coresdk.v1.Problem".to_owned(),
            value: convert::problem(problem).encode_to_vec(),
        },
        prost_types::Any {
            type_url: "type.googleapis.com/google.rpc.ErrorInfo".to_owned(),
            value: pb::ErrorInfo {
                reason: mapping.reason.to_owned(),
                domain: ERROR_DOMAIN.to_owned(),
                metadata: Default::default(),
            }
            .encode_to_vec(),
        },
    ];
    if !violations.is_empty() {
        details.push(prost_types::Any {
            type_url: "type.googleapis.com/google.rpc.BadRequest".to_owned(),
            value: pb::BadRequest {
                field_violations: violations
                    .iter()
                    .map(|v| pb::bad_request::FieldViolation {
                        field: v.field.to_owned(),
                        description: v.description.clone(),
                        ..Default::default()
                    })
                    .collect(),
            }
            .encode_to_vec(),
        });
    }
    let status = pb::Status {
        code: code as i32,
        message: detail.clone(),
        details,
    };
    tonic::Status::with_details(code, detail, status.encode_to_vec().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_failure_reaches_the_client_as_a_generic_retryable_problem() {
        let links = ProblemLinks {
            type_base: "https://coresdk.dev/problems".into(),
            billing_url: None,
            upgrade_url: None,
        };
        let status = of_error(
            &Error::StoreUnavailable("database disk image is malformed: /data/coresdk.db".into()),
            &links,
        );
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            !status.message().contains("malformed"),
            "{}",
            status.message()
        );
        let details = pb::Status::decode(status.details()).expect("google.rpc.Status");
        let problem = details
            .details
            .iter()
            .find(|d| d.type_url.ends_with("coresdk.v1.Problem"))
            .map(|d| crate::proto::Problem::decode(d.value.as_slice()).expect("a Problem"))
            .expect("a Problem in the details");
        assert!(!problem.detail.contains("coresdk.db"), "{}", problem.detail);
        assert!(
            problem.instance.starts_with("urn:coresdk:error:"),
            "{}",
            problem.instance
        );
    }
}
