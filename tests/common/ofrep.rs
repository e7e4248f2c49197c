//! A sidecar with its OFREP listener on an ephemeral port, and an HTTP client for it that
//! speaks HTTP/1.1 or h2c with prior knowledge.

use std::time::Duration;

use coresdk::settings::SideListener;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::{Options, Sidecar};

/// A started sidecar and the address of its OFREP listener (`--ofrep-listen 127.0.0.1:0`).
pub async fn start(options: Options) -> (Sidecar, String) {
    super::flagd::start_side(SideListener::Ofrep, options).await
}

#[derive(Debug, Clone, Copy)]
pub enum Http {
    One,
    /// HTTP/2 over cleartext, with prior knowledge (no upgrade).
    TwoCleartext,
}

pub struct Ofrep {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// An answer: status, headers, and the body as JSON (`Null` when empty).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: serde_json::Value,
}

impl Answer {
    pub fn etag(&self) -> String {
        self.headers
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .expect("an ETag")
            .to_owned()
    }
}

impl Ofrep {
    pub fn new(addr: &str, http: Http) -> Self {
        let mut builder = Client::builder(TokioExecutor::new());
        if matches!(http, Http::TwoCleartext) {
            builder.http2_only(true);
        }
        Self {
            base: format!("http://{addr}"),
            client: builder.build_http(),
        }
    }

    /// POSTs `body` to `path` with `headers`; a 10 s hang guard.
    pub async fn post(
        &self,
        path: &str,
        body: impl Into<Bytes>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(body.into()))
            .expect("a valid request");
        let response = tokio::time::timeout(Duration::from_secs(10), self.client.request(request))
            .await
            .expect("an answer within 10 s")
            .expect("an HTTP answer");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .into_body()
            .collect()
            .await
            .expect("the whole body")
            .to_bytes();
        let body = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("a JSON body")
        };
        Answer {
            status,
            headers,
            body,
        }
    }

    /// POSTs `body` to `path`; the status, or why there was none.
    pub async fn try_post(
        &self,
        path: &str,
        body: &'static str,
    ) -> Result<StatusCode, hyper_util::client::legacy::Error> {
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("{}{path}", self.base))
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .expect("a valid request");
        Ok(self.client.request(request).await?.status())
    }

    /// Evaluates one flag with `context` (a JSON value).
    pub async fn flag(&self, key: &str, context: serde_json::Value) -> Answer {
        self.post(
            &format!("/ofrep/v1/evaluate/flags/{key}"),
            serde_json::json!({ "context": context }).to_string(),
            &[],
        )
        .await
    }

    /// Evaluates every flag with `context`, sending `If-None-Match` when given.
    pub async fn flags(&self, context: serde_json::Value, if_none_match: Option<&str>) -> Answer {
        let headers: Vec<(&str, &str)> = if_none_match
            .map(|etag| ("if-none-match", etag))
            .into_iter()
            .collect();
        self.post(
            "/ofrep/v1/evaluate/flags",
            serde_json::json!({ "context": context }).to_string(),
            &headers,
        )
        .await
    }
}
