//! One PostgreSQL connection driven from a plain thread, with every round trip under a
//! deadline. A stopped or wedged server still accepts TCP and acknowledges what is sent (its
//! kernel runs), so neither keepalives nor `tcp_user_timeout` notice it, and a server-side
//! `statement_timeout` never fires: only a deadline kept by the client ends the wait. The
//! blocking `postgres` client has no per-call deadline, so this drives `tokio_postgres` on a
//! small runtime of its own and wraps each call in `tokio::time::timeout`.

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, Notification};

use crate::store::StoreError;

/// How long one round trip may take before the connection is given up. Above the server's
/// `statement_timeout` (see `connect`), so a slow statement normally ends with the server's own
/// error and the connection stays usable; only a server that does not answer at all hits this.
pub(super) const ANSWER_DEADLINE: Duration = Duration::from_secs(5);

pub(super) struct Link {
    client: Client,
    io: Io,
    notifications: mpsc::UnboundedReceiver<Notification>,
    deadline: Duration,
    /// Set when a call ran out of time: the protocol state is unknown from then on (a reply
    /// may still arrive, a transaction may still be open), so the link is never used again.
    abandoned: bool,
}

impl Link {
    /// Wraps a fresh connection; `connection` is driven on `runtime` whenever a call waits, and
    /// forwards the notifications it receives.
    pub(super) fn new<S, T>(
        runtime: tokio::runtime::Runtime,
        client: Client,
        mut connection: tokio_postgres::Connection<S, T>,
    ) -> Self
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (forward, notifications) = mpsc::unbounded_channel();
        runtime.spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(notification))) => {
                        let _ = forward.send(notification);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "PostgreSQL connection ended");
                        return;
                    }
                    None => return,
                }
            }
        });
        Self {
            client,
            io: Io(Some(runtime)),
            notifications,
            deadline: ANSWER_DEADLINE,
            abandoned: false,
        }
    }

    /// Allows longer round trips on this connection (the migration waits for other replicas).
    pub(super) fn set_deadline(&mut self, deadline: Duration) {
        self.deadline = deadline;
    }

    /// Closed by the server or the network, or given up after a deadline.
    pub(super) fn is_closed(&self) -> bool {
        self.abandoned || self.client.is_closed()
    }

    /// Whether the last failure was a deadline (the server did not answer).
    pub(super) fn timed_out(&self) -> bool {
        self.abandoned
    }

    pub(super) fn batch_execute(&mut self, sql: &str) -> Result<(), StoreError> {
        let call = self.client.batch_execute(sql);
        run(&mut self.io, &mut self.abandoned, self.deadline, call)
    }

    pub(super) fn prepare(&mut self, sql: &str) -> Result<tokio_postgres::Statement, StoreError> {
        let call = self.client.prepare(sql);
        run(&mut self.io, &mut self.abandoned, self.deadline, call)
    }

    pub(super) fn query(
        &mut self,
        statement: &tokio_postgres::Statement,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let call = self.client.query(statement, params);
        run(&mut self.io, &mut self.abandoned, self.deadline, call)
    }

    pub(super) fn execute(
        &mut self,
        statement: &tokio_postgres::Statement,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let call = self.client.execute(statement, params);
        run(&mut self.io, &mut self.abandoned, self.deadline, call)
    }

    /// Waits up to `wait` for notifications and returns every one that arrived; an error when
    /// the connection ended.
    pub(super) fn notifications(
        &mut self,
        wait: Duration,
    ) -> Result<Vec<Notification>, StoreError> {
        if self.is_closed() {
            return Err(lost());
        }
        let receiver = &mut self.notifications;
        let first = self
            .io
            .block_on(async { tokio::time::timeout(wait, receiver.recv()).await })?;
        let mut arrived = match first {
            Ok(Some(notification)) => vec![notification],
            Ok(None) => return Err(lost()),
            Err(_) => Vec::new(),
        };
        while let Ok(notification) = self.notifications.try_recv() {
            arrived.push(notification);
        }
        Ok(arrived)
    }
}

/// The connection's runtime, shut down without waiting for its blocking threads (a name
/// lookup stuck in the resolver must not hold up whoever drops the connection).
struct Io(Option<tokio::runtime::Runtime>);

impl Io {
    fn block_on<T>(&self, future: impl Future<Output = T>) -> Result<T, StoreError> {
        match &self.0 {
            Some(runtime) => Ok(runtime.block_on(future)),
            None => Err(lost()),
        }
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

fn run<T>(
    io: &mut Io,
    abandoned: &mut bool,
    deadline: Duration,
    call: impl Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, StoreError> {
    if *abandoned {
        return Err(lost());
    }
    match io.block_on(async { tokio::time::timeout(deadline, call).await })? {
        Ok(answer) => Ok(answer?),
        Err(_) => {
            *abandoned = true;
            Err(no_answer(deadline))
        }
    }
}

pub(super) fn no_answer(deadline: Duration) -> StoreError {
    StoreError::Postgres(format!(
        "no answer from the server within {deadline:?}; the connection was given up (is the server hung or overloaded?)"
    ))
}

fn lost() -> StoreError {
    StoreError::Postgres("the connection closed".into())
}
