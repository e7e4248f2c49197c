//! Named operators (`CORESDK_ADMIN_TOKENS_FILE`) against the real binary: each admin change is
//! audited under the name of the operator whose token made it, the caller's claimed actor
//! kept beside it; the file is re-read without a restart; `CORESDK_ADMIN_TOKEN` is `admin`.
mod common;

use std::path::Path;

use common::reload::{SETTLE, eventually, replace};
use common::*;
use coresdk::proto::{self, QueryAuditRequest, SetFlagRequest};
use serde_json::Value;
use tonic::Code;

const ALICE: &str = "token-of-alice-0123456789";
const BOB: &str = "token-of-bob-0123456789";
const CAROL: &str = "token-of-carol-0123456789";

fn set_pro(tenant: &str, actor: &str) -> SetFlagRequest {
    SetFlagRequest {
        tenant_id: tenant.into(),
        key: "pro_features".into(),
        value: Some(proto::FlagValue {
            kind: Some(proto::flag_value::Kind::BoolValue(true)),
        }),
        actor: actor.into(),
        reason: "ticket 7".into(),
    }
}

/// `SetFlag` with `token`: the flag's `updated_by`, or the refusal.
async fn set_flag(
    sidecar: &Sidecar,
    token: &str,
    tenant: &str,
    actor: &str,
) -> Result<String, tonic::Status> {
    sidecar
        .flags()
        .set_flag(with_bearer(set_pro(tenant, actor), token))
        .await
        .map(|flag| flag.into_inner().updated_by)
}

/// Whether `token` is an operator's now (a refusal must be UNAUTHENTICATED with a problem).
async fn accepted(sidecar: &Sidecar, token: &str) -> bool {
    match set_flag(sidecar, token, "probe-co", "probe").await {
        Ok(_) => true,
        Err(status) => {
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
            assert_eq!(error_reason(&status), "UNAUTHENTICATED", "{status:?}");
            false
        }
    }
}

/// The `flag.set` records of `tenant`, as their canonical JSON (what a client verifies).
async fn flag_sets(sidecar: &Sidecar, tenant: &str) -> Vec<Value> {
    audit_records(sidecar, tenant, "flag.set").await
}

/// The audit records of `tenant` (`""`: tenant-less ones) whose event starts with `prefix`,
/// as canonical JSON.
async fn audit_records(sidecar: &Sidecar, tenant: &str, prefix: &str) -> Vec<Value> {
    sidecar
        .audit()
        .query(admin(QueryAuditRequest {
            tenant_id: tenant.into(),
            event_prefix: prefix.into(),
            ..Default::default()
        }))
        .await
        .expect("Query")
        .into_inner()
        .records
        .iter()
        .map(|r| serde_json::from_slice(&r.canonical).expect("canonical JSON"))
        .collect()
}

fn tokens_file(dir: &Path, text: &str) -> String {
    let path = dir.join("operators");
    std::fs::write(&path, text).expect("write");
    path.display().to_string()
}

fn options(envs: &[(&str, &str)]) -> Options {
    let mut envs: Vec<(String, String)> = envs
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect();
    envs.push(("STRIPE_WEBHOOK_SECRET".into(), SECRET.into()));
    Options {
        args: vec!["--store".into(), "memory".into()],
        envs,
    }
}

#[tokio::test]
async fn an_operators_change_is_audited_under_its_name_and_the_admin_token_is_admin() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = tokens_file(
        dir.path(),
        &format!("# on-call\nalice: {ALICE}\n\nbob: {BOB}\n"),
    );
    let sidecar = Sidecar::start(options(&[
        ("CORESDK_ADMIN_TOKENS_FILE", &file),
        ("CORESDK_ADMIN_TOKEN", ADMIN_TOKEN),
    ]))
    .await;

    // Alice claims to be someone else: the audit says alice, and keeps the claim.
    let updated_by = set_flag(&sidecar, ALICE, "acme", "ceo@example.com")
        .await
        .expect("alice's SetFlag");
    assert_eq!(updated_by, "alice");
    assert_eq!(
        flag(&sidecar, "acme", "pro_features").await.updated_by,
        "alice"
    );
    let records = flag_sets(&sidecar, "acme").await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["actor"], "alice");
    assert_eq!(records[0]["metadata"]["claimed_actor"], "ceo@example.com");
    assert_eq!(records[0]["metadata"]["reason"], "ticket 7");

    // The single token keeps working, as the operator `admin`.
    let updated_by = set_flag(&sidecar, ADMIN_TOKEN, "globex", "ops@example.com")
        .await
        .expect("admin's SetFlag");
    assert_eq!(updated_by, "admin");
    let records = flag_sets(&sidecar, "globex").await;
    assert_eq!(records[0]["actor"], "admin");
    assert_eq!(records[0]["metadata"]["claimed_actor"], "ops@example.com");

    // Another admin use case: a mapping is audited under the operator too.
    sidecar
        .tenants()
        .map_customer(with_bearer(
            proto::MapCustomerRequest {
                customer_id: "cus_new_001".into(),
                tenant_id: "newco".into(),
                actor: "bob@example.com".into(),
                reason: String::new(),
            },
            BOB,
        ))
        .await
        .expect("bob's MapCustomer");
    let mapped = sidecar
        .audit()
        .query(admin(QueryAuditRequest {
            tenant_id: "newco".into(),
            event_prefix: "tenant.customer_mapped".into(),
            ..Default::default()
        }))
        .await
        .expect("Query")
        .into_inner()
        .records;
    assert_eq!(mapped.len(), 1);
    assert_eq!(mapped[0].actor, "bob");

    // An unknown token: UNAUTHENTICATED with a problem, nothing written.
    let refused = set_flag(&sidecar, CAROL, "acme", "carol")
        .await
        .expect_err("not an operator");
    assert_eq!(refused.code(), Code::Unauthenticated);
    let problem = problem(&refused);
    assert_eq!(problem.status, 401, "{problem:?}");
    assert!(!problem.detail.contains(CAROL), "{problem:?}");
    assert_eq!(flag_sets(&sidecar, "acme").await.len(), 1);

    // An operator's token passes the API token check too, as the admin token does.
    let api = Sidecar::start(options(&[
        ("CORESDK_ADMIN_TOKENS_FILE", &file),
        ("CORESDK_API_TOKEN", "the-api-token-0123456789"),
    ]))
    .await;
    assert_eq!(
        set_flag(&api, BOB, "acme", "bob")
            .await
            .expect("bob passes"),
        "bob"
    );
    assert!(!accepted(&api, CAROL).await);
}

#[tokio::test]
async fn editing_the_file_adds_and_removes_operators_and_a_bad_edit_keeps_the_last_good_set() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = tokens_file(dir.path(), &format!("alice: {ALICE}\nbob: {BOB}\n"));
    let sidecar = Sidecar::start(options(&[("CORESDK_ADMIN_TOKENS_FILE", &file)])).await;
    assert!(accepted(&sidecar, ALICE).await);
    assert!(accepted(&sidecar, BOB).await);
    assert!(!accepted(&sidecar, CAROL).await);
    // Without CORESDK_ADMIN_TOKEN there is no operator `admin`.
    assert!(!accepted(&sidecar, ADMIN_TOKEN).await);

    // Alice calls all along: no call of hers fails while the file is re-read.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let alice = tokio::spawn({
        let (mut flags, stop) = (sidecar.flags(), stop.clone());
        async move {
            let mut calls = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                flags
                    .set_flag(with_bearer(set_pro("alice-co", "alice"), ALICE))
                    .await
                    .expect("alice's call during a reload");
                calls += 1;
            }
            calls
        }
    });

    // Carol joins, bob leaves: no restart.
    replace(
        Path::new(&file),
        &format!("alice: {ALICE}\ncarol: {CAROL}\n"),
    );
    eventually("carol is an operator", || accepted(&sidecar, CAROL)).await;
    assert!(!accepted(&sidecar, BOB).await, "bob lost access");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(alice.await.expect("alice's calls") > 0);
    assert_eq!(
        set_flag(&sidecar, CAROL, "acme", "c").await.expect("carol"),
        "carol"
    );

    // A broken edit (a duplicate name, a line without its colon, nothing) is refused as a whole: the
    // last good set stays, bob does not come back through the half that parses.
    for broken in [
        format!("alice: {ALICE}\nbob: {BOB}\nbob: {CAROL}\n"),
        format!("alice: {ALICE}\nbob short\n"),
        // Empty: what a file written in place is for a moment; it would revoke everyone.
        String::new(),
    ] {
        replace(Path::new(&file), &broken);
        tokio::time::sleep(SETTLE).await;
        assert!(accepted(&sidecar, ALICE).await);
        assert!(accepted(&sidecar, CAROL).await);
        assert!(!accepted(&sidecar, BOB).await);
    }

    // Fixed: taken.
    replace(Path::new(&file), &format!("bob: {BOB}\n"));
    eventually("bob is back", || accepted(&sidecar, BOB)).await;
    assert!(!accepted(&sidecar, ALICE).await);
    assert!(!accepted(&sidecar, CAROL).await);
}

/// `coresdk serve` with `envs` only: it must refuse to start.
fn refused_start(envs: &[(&str, &str)]) -> String {
    let mut all = vec![("STRIPE_WEBHOOK_SECRET", SECRET)];
    all.extend_from_slice(envs);
    let output = run_coresdk(
        None,
        &["serve", "--listen", "127.0.0.1:0", "--store", "memory"],
        &all,
    );
    assert!(!output.status.success(), "started: {output:?}");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_malformed_file_or_a_second_admin_is_a_config_error_naming_the_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = tokens_file(dir.path(), &format!("# team\nalice: {ALICE}\nBob: {BOB}\n"));
    let stderr = refused_start(&[("CORESDK_ADMIN_TOKENS_FILE", &file)]);
    assert!(
        stderr.contains("CORESDK_ADMIN_TOKENS_FILE") && stderr.contains(&format!("{file}:3:")),
        "{stderr}"
    );
    for token in [ALICE, BOB] {
        assert!(!stderr.contains(token), "a token is echoed: {stderr}");
    }

    let file = tokens_file(dir.path(), &format!("alice: {ALICE}\nadmin: {BOB}\n"));
    let stderr = refused_start(&[
        ("CORESDK_ADMIN_TOKENS_FILE", &file),
        ("CORESDK_ADMIN_TOKEN", ADMIN_TOKEN),
    ]);
    assert!(
        stderr.contains(&format!("{file}:2:")) && stderr.contains("CORESDK_ADMIN_TOKEN"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(BOB) && !stderr.contains(ADMIN_TOKEN),
        "{stderr}"
    );
}

#[test]
fn the_sidecars_own_actors_and_other_settings_tokens_are_refused_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut outputs = Vec::new();
    for actor in ["stripe-webhook", "replay", "config", "parking", "coresdk"] {
        let file = tokens_file(dir.path(), &format!("alice: {ALICE}\n{actor}: {BOB}\n"));
        let stderr = refused_start(&[("CORESDK_ADMIN_TOKENS_FILE", &file)]);
        assert!(
            stderr.contains(&format!("{file}:2:")) && stderr.contains(&format!("'{actor}'")),
            "{stderr}"
        );
        outputs.push(stderr);
    }

    let api_token = "the-api-token-0123456789";
    let file = tokens_file(dir.path(), "# none yet\n");
    // The two settings themselves, one given by a file.
    let api_file = dir.path().join("api-token");
    std::fs::write(&api_file, format!("{ADMIN_TOKEN}\n")).expect("write");
    let api_file = api_file.display().to_string();
    // The tokens file's text, the settings, what the refusal must say.
    type Case<'a> = (String, &'a [(&'a str, &'a str)], [String; 2]);
    let cases: [Case; 3] = [
        (
            format!("alice: {ALICE}\nbob: {ADMIN_TOKEN}\n"),
            &[
                ("CORESDK_ADMIN_TOKENS_FILE", &file),
                ("CORESDK_ADMIN_TOKEN", ADMIN_TOKEN),
            ],
            [format!("{file}:2:"), "CORESDK_ADMIN_TOKEN's token".into()],
        ),
        (
            format!("alice: {api_token}\n"),
            &[
                ("CORESDK_ADMIN_TOKENS_FILE", &file),
                ("CORESDK_API_TOKEN", api_token),
            ],
            [format!("{file}:1:"), "CORESDK_API_TOKEN's token".into()],
        ),
        (
            String::new(),
            &[
                ("CORESDK_ADMIN_TOKEN", ADMIN_TOKEN),
                ("CORESDK_API_TOKEN_FILE", &api_file),
            ],
            [
                "CORESDK_ADMIN_TOKEN".into(),
                "CORESDK_API_TOKEN's token".into(),
            ],
        ),
    ];
    for (text, settings, wanted) in cases {
        tokens_file(dir.path(), &text);
        let stderr = refused_start(settings);
        assert!(
            wanted.iter().all(|w| stderr.contains(w.as_str())),
            "{stderr}"
        );
        outputs.push(stderr);
    }
    for stderr in &outputs {
        assert!(
            !stderr.contains(ADMIN_TOKEN) && !stderr.contains(api_token) && !stderr.contains(BOB),
            "a token is echoed: {stderr}"
        );
    }
}

/// `coresdk_secret_file_stale` for `setting` on one scrape.
async fn stale(ops: &str, setting: &str) -> f64 {
    common::ops::Scrape::of(ops)
        .await
        .value("coresdk_secret_file_stale", &[("setting", setting)])
}

#[tokio::test]
async fn a_reload_cannot_make_an_operator_of_the_api_token_and_a_refused_file_shows_on_metrics() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = tokens_file(dir.path(), &format!("alice: {ALICE}\nbob: {BOB}\n"));
    let api_file = dir.path().join("api-token");
    std::fs::write(&api_file, "the-api-token-0123456789\n").expect("write");
    let (sidecar, ops) = common::ops::start(options(&[
        ("CORESDK_ADMIN_TOKENS_FILE", &file),
        ("CORESDK_API_TOKEN_FILE", &api_file.display().to_string()),
    ]))
    .await;
    const TOKENS: &str = "CORESDK_ADMIN_TOKENS_FILE";
    assert_eq!(stale(&ops, TOKENS).await, 0.0);
    assert_eq!(stale(&ops, "CORESDK_API_TOKEN_FILE").await, 0.0);

    // Bob is removed, but the edit gives alice the API token: refused as a whole, bob keeps
    // his access, and the gauge says the file on disk is not what is served.
    replace(Path::new(&file), "alice: the-api-token-0123456789\n");
    eventually("the refused edit shows", || async {
        stale(&ops, TOKENS).await == 1.0
    })
    .await;
    assert!(accepted(&sidecar, BOB).await);
    assert!(!accepted(&sidecar, "the-api-token-0123456789").await);
    // The API token rotates away: the refused tokens file, untouched, is good now and taken.
    replace(&api_file, "another-api-token-0123456789\n");
    eventually(
        "the tokens file refused for the old API token is taken",
        || async { stale(&ops, TOKENS).await == 0.0 },
    )
    .await;
    assert!(!accepted(&sidecar, BOB).await);
    assert!(accepted(&sidecar, "the-api-token-0123456789").await);
    // A deleted file is stale too: the last good set is still served.
    std::fs::remove_file(&file).expect("remove");
    tokio::time::sleep(SETTLE).await;
    assert_eq!(stale(&ops, TOKENS).await, 1.0);
    assert!(accepted(&sidecar, "the-api-token-0123456789").await);

    // Written again: taken, the gauge goes back to 0.
    replace(Path::new(&file), &format!("alice: {ALICE}\n"));
    eventually("the fixed file is taken", || async {
        stale(&ops, TOKENS).await == 0.0
    })
    .await;
    assert!(!accepted(&sidecar, BOB).await);
    assert!(accepted(&sidecar, ALICE).await);

    // The API token's own file turns into alice's token: the tokens file is not re-read, yet
    // alice's token (now every app's) is no operator's while they are one.
    replace(&api_file, &format!("{ALICE}\n"));
    eventually("the API token's file is taken", || async {
        !accepted(&sidecar, ALICE).await
    })
    .await;
    assert_eq!(stale(&ops, "CORESDK_API_TOKEN_FILE").await, 0.0);
    replace(&api_file, "short\n");
    eventually("a refused API token file shows", || async {
        stale(&ops, "CORESDK_API_TOKEN_FILE").await == 1.0
    })
    .await;
}

/// The manifest must start on a Secret made before named operators existed (no `admin-tokens`
/// key): the sidecar refuses a missing tokens file, so the manifest leaves it opt-in.
#[test]
fn the_kubernetes_manifest_leaves_the_tokens_file_opt_in() {
    let manifest = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes.yaml"),
    )
    .expect("the manifest");
    let active: Vec<&str> = manifest
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter(|line| line.contains("CORESDK_ADMIN_TOKENS_FILE") || line.contains("admin-tokens"))
        .collect();
    assert!(active.is_empty(), "set by default: {active:?}");
    assert!(
        manifest.contains("# - { name: CORESDK_ADMIN_TOKENS_FILE"),
        "shown as the alternative"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("admin-tokens").display().to_string();
    let stderr = refused_start(&[
        ("CORESDK_ADMIN_TOKENS_FILE", &missing),
        ("CORESDK_ADMIN_TOKEN", ADMIN_TOKEN),
    ]);
    assert!(stderr.contains("CORESDK_ADMIN_TOKENS_FILE"), "{stderr}");
}

/// `ReplayStripeEvent` of `payload` with `token`: the outcome.
async fn replay_as(sidecar: &Sidecar, token: &str, payload: Vec<u8>) -> String {
    sidecar
        .webhooks()
        .replay_stripe_event(with_bearer(
            proto::ReplayStripeEventRequest {
                payload,
                reason: "outage 42".into(),
            },
            token,
        ))
        .await
        .map(|answer| answer.into_inner().outcome().as_str_name().to_owned())
        .unwrap_or_else(|status| format!("refused: {}", error_reason(&status)))
}

#[tokio::test]
async fn a_replay_is_audited_under_actor_replay_naming_the_operator_who_asked() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = tokens_file(dir.path(), &format!("alice: {ALICE}\nbob: {BOB}\n"));
    let sidecar = Sidecar::start(options(&[
        ("CORESDK_ADMIN_TOKENS_FILE", &file),
        ("CORESDK_ADMIN_TOKEN", ADMIN_TOKEN),
    ]))
    .await;
    let created = now() - 3600;
    let paid = |id: &str, tenant: &str| {
        event(
            id,
            "invoice.paid",
            created,
            serde_json::json!({"id": format!("in_{id}"), "customer": "cus_acme", "metadata": {"tenant_id": tenant}}),
        )
    };
    assert_eq!(
        replay_as(&sidecar, ALICE, paid("evt_1", "acme")).await,
        "WEBHOOK_OUTCOME_APPLIED"
    );
    assert_eq!(
        replay_as(&sidecar, BOB, paid("evt_1", "acme")).await,
        "WEBHOOK_OUTCOME_DUPLICATE"
    );
    let acme = audit_records(&sidecar, "acme", "").await;
    let webhook: Vec<(&str, &str, &str)> = acme
        .iter()
        .filter(|r| {
            r["event"]
                .as_str()
                .is_some_and(|e| e.starts_with("billing."))
        })
        .map(|r| {
            (
                r["actor"].as_str().unwrap_or_default(),
                r["outcome"].as_str().unwrap_or_default(),
                r["metadata"]["operator"].as_str().unwrap_or("(none)"),
            )
        })
        .collect();
    assert_eq!(
        webhook,
        [
            ("replay", "applied", "alice"),
            ("replay", "duplicate", "bob")
        ],
        "{acme:?}"
    );

    // A customer with no tenant: parked at replay time (that record names alice), applied
    // when bob maps the customer: still actor `replay`, and no operator (alice did not ask
    // for that, and bob's mapping is audited under bob).
    let unmapped = event(
        "evt_2",
        "invoice.paid",
        created,
        serde_json::json!({"id": "in_2", "customer": "cus_later"}),
    );
    assert_eq!(
        replay_as(&sidecar, ALICE, unmapped).await,
        "refused: UNKNOWN_CUSTOMER"
    );
    let parked = audit_records(&sidecar, "", "").await;
    let parked = parked.last().expect("the parked record");
    assert_eq!(parked["actor"], "replay", "{parked}");
    assert_eq!(parked["metadata"]["operator"], "alice", "{parked}");
    sidecar
        .tenants()
        .map_customer(with_bearer(
            proto::MapCustomerRequest {
                customer_id: "cus_later".into(),
                tenant_id: "later-co".into(),
                actor: "bob".into(),
                reason: String::new(),
            },
            BOB,
        ))
        .await
        .expect("bob's MapCustomer");
    let later = audit_records(&sidecar, "later-co", "").await;
    let applied = later
        .iter()
        .find(|r| r["event"] == "billing.invoice.paid")
        .expect("the parked event applied");
    assert_eq!(applied["actor"], "replay", "{later:?}");
    assert_eq!(applied["metadata"].get("operator"), None, "{later:?}");
}

/// A sidecar started with `envs` (and `args`), its log (text, `CORESDK_LOG=info`) going to a
/// file: the child, its gRPC channel and the log's path.
async fn logging_sidecar(
    dir: &Path,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (
    std::process::Child,
    tonic::transport::Channel,
    std::path::PathBuf,
) {
    let log = dir.join("sidecar.log");
    let stderr = std::fs::File::create(&log).expect("log file");
    let mut all: Vec<(String, String)> = vec![("CORESDK_LOG".into(), "info".into())];
    all.extend(envs.iter().map(|(k, v)| ((*k).into(), (*v).into())));
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let (child, addr) = spawn_with_stderr(&args, &all, stderr.into());
    let channel = connect(&addr).await;
    (child, channel, log)
}

#[tokio::test]
async fn the_start_warning_names_every_admin_rpc_and_a_replay_reason_cannot_forge_a_log_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut child, _, log) = logging_sidecar(
        dir.path(),
        &["--store", "memory"],
        &[("STRIPE_WEBHOOK_SECRET", SECRET)],
    )
    .await;
    child.kill().expect("kill");
    child.wait().expect("reaped");
    let text = std::fs::read_to_string(&log).expect("the log");
    let warning = text
        .lines()
        .find(|line| line.contains("admin RPCs"))
        .unwrap_or_else(|| panic!("no warning: {text}"));
    for rpc in [
        "SetFlag",
        "MapCustomer",
        "UnmapCustomer",
        "ResolveCustomer",
        "ReplayStripeEvent",
    ] {
        assert!(warning.contains(rpc), "{rpc} missing: {warning}");
    }

    let (mut child, channel, log) = logging_sidecar(dir.path(), &["--mock"], &[]).await;
    let forged = "outage\n2026-01-01T00:00:00Z  INFO coresdk: forged";
    let answer = coresdk::proto::webhook_service_client::WebhookServiceClient::new(channel)
        .replay_stripe_event(proto::ReplayStripeEventRequest {
            payload: event(
                "evt_log",
                "invoice.paid",
                now() - 60,
                serde_json::json!({"id": "in_log", "customer": "cus_acme_001"}),
            ),
            reason: forged.into(),
        })
        .await;
    assert!(answer.is_ok(), "{answer:?}");
    child.kill().expect("kill");
    child.wait().expect("reaped");
    let text = std::fs::read_to_string(&log).expect("the log");
    assert!(
        text.lines()
            .any(|line| line.contains("replay of an exported event")
                && line.contains(r#"outage\n2026"#)),
        "{text}"
    );
    assert!(
        !text
            .lines()
            .any(|line| line.starts_with("2026-01-01T00:00:00Z")),
        "a forged line: {text}"
    );
}
