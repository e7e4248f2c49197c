//! A sidecar with its operations listener on an ephemeral port, plain HTTP GETs to it, and
//! a small reader of the Prometheus text format for exact counter deltas.

use std::collections::HashMap;
use std::time::Duration;

use coresdk::settings::SideListener;
use http_body_util::{BodyExt as _, Empty};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::{Options, Sidecar};

/// A started sidecar and the address of its ops listener (`--ops-listen 127.0.0.1:0`).
pub async fn start(options: Options) -> (Sidecar, String) {
    super::flagd::start_side(SideListener::Ops, options).await
}

/// GET `path` on `addr`: the status, the content type and the body; a 10 s hang guard.
pub async fn get(addr: &str, path: &str) -> (u16, String, String) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
    let request = Request::get(format!("http://{addr}{path}"))
        .body(Empty::new())
        .expect("a valid request");
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .expect("the ops listener answers within the hang guard")
        .expect("an HTTP answer");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("the body")
        .to_bytes();
    (
        status,
        content_type,
        String::from_utf8(body.to_vec()).expect("utf-8"),
    )
}

/// One scrape of `/metrics`: every sample by name, with its labels.
pub struct Scrape {
    samples: Vec<(String, HashMap<String, String>, f64)>,
}

impl Scrape {
    pub async fn of(addr: &str) -> Self {
        let (status, content_type, text) = get(addr, "/metrics").await;
        assert_eq!(status, 200, "{text}");
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        Self::parse(&text)
    }

    /// The Prometheus text format as this sidecar writes it: label values never hold `"`,
    /// `,` or `}` (they come from closed sets), so splitting is enough here.
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .map(|line| {
                let (series, value) = line.rsplit_once(' ').expect("a sample line");
                let value: f64 = value.parse().expect("a number");
                let (name, labels) = match series.split_once('{') {
                    Some((name, labels)) => (
                        name,
                        labels
                            .trim_end_matches('}')
                            .split(',')
                            .filter(|pair| !pair.is_empty())
                            .map(|pair| {
                                let (k, v) = pair.split_once('=').expect("label=value");
                                (k.to_owned(), v.trim_matches('"').to_owned())
                            })
                            .collect(),
                    ),
                    None => (series, HashMap::new()),
                };
                (name.to_owned(), labels, value)
            })
            .collect();
        Self { samples }
    }

    /// The sum of the samples named `name` whose labels include all of `labels` (0 when none).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, have, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| have.get(*k).is_some_and(|have| have == v))
            })
            .map(|(_, _, value)| value)
            .sum()
    }

    /// Whether any sample is named `name`.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|(n, _, _)| n == name)
    }

    /// Every value a label takes on the samples named `name`.
    pub fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        let mut values: Vec<String> = self
            .samples
            .iter()
            .filter(|(n, _, _)| n == name)
            .filter_map(|(_, labels, _)| labels.get(label).cloned())
            .collect();
        values.sort();
        values.dedup();
        values
    }
}
