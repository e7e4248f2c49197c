//! OFREP single evaluations as its providers make them: one keep-alive HTTP/1.1 connection per
//! caller, one POST at a time on it.

use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::Mutex;

type Connection = SendRequest<Full<Bytes>>;

/// One connection slot per caller; a broken connection is opened again on the next call.
pub struct Callers {
    addr: String,
    connections: Vec<Mutex<Option<Connection>>>,
}

impl Callers {
    pub fn new(addr: String, callers: usize) -> Self {
        Self {
            addr,
            connections: (0..callers.max(1)).map(|_| Mutex::new(None)).collect(),
        }
    }

    async fn connect(&self) -> Result<Connection, Box<dyn std::error::Error + Send + Sync>> {
        let tcp = tokio::net::TcpStream::connect(&self.addr).await?;
        tcp.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// Evaluates `key` for `tenant` on caller `worker`'s connection; whether it answered 200.
    pub async fn evaluate(&self, worker: usize, tenant: &str, key: &str) -> bool {
        let mut slot = self.connections[worker % self.connections.len()]
            .lock()
            .await;
        let mut sender = match slot.take() {
            Some(sender) if !sender.is_closed() => sender,
            _ => match self.connect().await {
                Ok(sender) => sender,
                Err(_) => return false,
            },
        };
        let body = serde_json::json!({"context": {"tenant_id": tenant}}).to_string();
        let Ok(request) = hyper::Request::post(format!("/ofrep/v1/evaluate/flags/{key}"))
            .header(hyper::header::HOST, self.addr.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
        else {
            return false;
        };
        if sender.ready().await.is_err() {
            return false;
        }
        let Ok(response) = sender.send_request(request).await else {
            return false;
        };
        let ok = response.status() == hyper::StatusCode::OK;
        // The whole body is read, so the connection can carry the next request.
        let read = response.into_body().collect().await.is_ok();
        *slot = Some(sender);
        ok && read
    }
}
