//! Reaching the database: the URL's settings, TLS, and connection errors that say where the
//! sidecar tried to connect, why it failed and what to check.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::config::Host;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{NoTls, Socket};

use super::link::{ANSWER_DEADLINE, Link, no_answer};
use crate::problem::with_causes;
use crate::store::StoreError;

/// How long opening a connection may take in all: TCP, TLS, login and the session settings.
const CONNECT_DEADLINE: Duration = Duration::from_secs(5);

/// Set on every session, so the server itself ends what runs too long. The advisory write lock
/// is normally held for milliseconds (one batch); waiting seconds for it means the replica
/// holding it is stuck, and the caller is better told UNAVAILABLE. A session left idle inside a
/// transaction (its replica vanished mid-batch) would hold that lock for every replica: the
/// server ends it.
const SESSION_SETTINGS: &str = "SET statement_timeout = '4s'; SET lock_timeout = '3s'; SET idle_in_transaction_session_timeout = '10s'";

/// How to reach the database: the parsed URL, and TLS when the URL asks for it.
#[derive(Clone)]
pub struct Connector {
    config: tokio_postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// Connections serving reads, from the URL's `pool_size` (default 2); writes always go
    /// through one connection per replica, which is what group commit needs.
    pub read_connections: usize,
}

impl Connector {
    /// `sslmode=require`, `verify-ca` or `verify-full` turn TLS on, always verifying the server
    /// against the CA in `ca_file` (stricter than libpq's `require`, which does not verify).
    pub fn new(url: &str, ca_file: Option<&std::path::Path>) -> Result<Self, StoreError> {
        let mut tls_wanted = false;
        let mut unknown_sslmode = None;
        let mut read_connections = 2;
        let mut named = Vec::new();
        let cleaned = match url.split_once('?') {
            None => url.to_owned(),
            Some((base, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|pair| {
                        named.push(pair.split_once('=').map_or(*pair, |(key, _)| key));
                        if let Some(size) = pair.strip_prefix("pool_size=") {
                            read_connections = size.parse().unwrap_or(0);
                            return false;
                        }
                        match pair.strip_prefix("sslmode=") {
                            Some("require" | "verify-ca" | "verify-full") => {
                                tls_wanted = true;
                                false
                            }
                            Some("disable") => false,
                            // A typo must not quietly mean "no TLS".
                            Some(other) => {
                                unknown_sslmode = Some(other.to_owned());
                                false
                            }
                            None => true,
                        }
                    })
                    .collect();
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        };
        if let Some(mode) = unknown_sslmode {
            return Err(StoreError::Postgres(format!(
                "sslmode={mode} is not supported: use disable, require, verify-ca or verify-full (the last three verify the server against CORESDK_POSTGRES_CA_FILE)"
            )));
        }
        let mut config: tokio_postgres::Config = cleaned
            .parse()
            .map_err(|e: tokio_postgres::Error| StoreError::Postgres(format!("bad URL: {e}")))?;
        // TCP settings unless the URL names them: keepalive probes find a vanished peer of an
        // idle connection within seconds (not the system's two hours), and `tcp_user_timeout`
        // bounds how long sent data may stay unacknowledged (Linux).
        let unnamed = |key: &str| !named.contains(&key);
        if unnamed("connect_timeout") {
            config.connect_timeout(CONNECT_DEADLINE);
        }
        if unnamed("keepalives") {
            config.keepalives(true);
        }
        if unnamed("keepalives_idle") {
            config.keepalives_idle(Duration::from_secs(5));
        }
        if unnamed("keepalives_interval") {
            config.keepalives_interval(Duration::from_secs(2));
        }
        if unnamed("keepalives_retries") {
            config.keepalives_retries(3);
        }
        if unnamed("tcp_user_timeout") {
            config.tcp_user_timeout(Duration::from_secs(10));
        }
        // Verify's chain scan holds one reader for as long as it runs; the others serve every
        // other read meanwhile.
        if !(2..=64).contains(&read_connections) {
            return Err(StoreError::Unsupported(
                "pool_size must be between 2 and 64 (one read connection is kept busy by Verify's chain scan)",
            ));
        }
        if !tls_wanted {
            return Ok(Self {
                config,
                tls: None,
                read_connections,
            });
        }
        let ca_file = ca_file.ok_or(StoreError::Unsupported(
            "sslmode=require/verify-full needs CORESDK_POSTGRES_CA_FILE (the CA that signed the server certificate)",
        ))?;
        use rustls_pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_file_iter(ca_file)
            .map_err(|e| StoreError::Postgres(format!("{}: {e}", ca_file.display())))?
        {
            let cert =
                cert.map_err(|e| StoreError::Postgres(format!("{}: {e}", ca_file.display())))?;
            roots
                .add(cert)
                .map_err(|e| StoreError::Postgres(format!("{}: {e}", ca_file.display())))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::Postgres(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.ssl_mode(tokio_postgres::config::SslMode::Require);
        Ok(Self {
            config,
            tls: Some(tokio_postgres_rustls::MakeRustlsConnect::new(tls)),
            read_connections,
        })
    }

    /// Opens one connection with the session settings applied, within [`CONNECT_DEADLINE`]. It
    /// drives its own runtime, so this must not run on an async thread.
    pub(super) fn connect(&self) -> Result<Link, StoreError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Postgres(format!("cannot start a connection runtime: {e}")))?;
        let started = Instant::now();
        let mut link = match &self.tls {
            Some(tls) => self.open(runtime, tls.clone()),
            None => self.open(runtime, NoTls),
        }?;
        // What is left of the connect deadline, but at least a moment for one round trip.
        link.set_deadline(
            CONNECT_DEADLINE
                .saturating_sub(started.elapsed())
                .max(Duration::from_secs(1)),
        );
        link.batch_execute(SESSION_SETTINGS)
            .map_err(|e| self.unanswered(&e))?;
        link.set_deadline(ANSWER_DEADLINE);
        Ok(link)
    }

    fn open<T>(&self, runtime: tokio::runtime::Runtime, tls: T) -> Result<Link, StoreError>
    where
        T: MakeTlsConnect<Socket>,
        T::Stream: Send + 'static,
    {
        let opened = runtime.block_on(async {
            tokio::time::timeout(CONNECT_DEADLINE, self.config.connect(tls)).await
        });
        match opened {
            Ok(Ok((client, connection))) => Ok(Link::new(runtime, client, connection)),
            Ok(Err(e)) => Err(self.unreachable(&e)),
            Err(_) => Err(self.unanswered(&no_answer(CONNECT_DEADLINE))),
        }
    }

    /// Connects, retrying with backoff until `stop`; None when stopping.
    pub(super) fn connect_with_backoff(&self, stop: &AtomicBool, what: &str) -> Option<Link> {
        let mut delay = Duration::from_millis(100);
        loop {
            if stop.load(Ordering::Acquire) {
                return None;
            }
            match self.connect() {
                Ok(client) => return Some(client),
                Err(e) => {
                    tracing::warn!(error = %e, what, retry_in = ?delay, "PostgreSQL unreachable");
                    sleep_unless_stopped(delay, stop);
                    delay = (delay * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Where the sidecar connects, as `host:port/database` (never the password).
    pub(super) fn target(&self) -> String {
        let ports = self.config.get_ports();
        let hosts: Vec<String> = self
            .config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, host)| {
                // libpq's rule: one port for every host, or one port per host.
                let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
                match host {
                    Host::Tcp(name) if name.contains(':') => format!("[{name}]:{port}"),
                    Host::Tcp(name) => format!("{name}:{port}"),
                    Host::Unix(dir) => format!("{}/.s.PGSQL.{port}", dir.display()),
                }
            })
            .collect();
        // Without a database name the server uses the user's name.
        let database = self
            .config
            .get_dbname()
            .or(self.config.get_user())
            .unwrap_or("?");
        let hosts = if hosts.is_empty() {
            "(no host)".to_owned()
        } else {
            hosts.join(",")
        };
        format!("{hosts}/{database}")
    }

    /// A connection that opened but did not answer in time, said like [`Self::unreachable`].
    fn unanswered(&self, error: &StoreError) -> StoreError {
        StoreError::PostgresUnreachable {
            target: self.target(),
            cause: error.to_string(),
            check: "is the server hung, overloaded or cut off? check the server and the network to it",
        }
    }

    fn unreachable(&self, error: &tokio_postgres::Error) -> StoreError {
        // The server answered and refused the login (class 28) or the database (3D000);
        // anything else (refused, timed out, shutting down, starting up) is about reaching it.
        let login_refused = error
            .code()
            .is_some_and(|state| state.code().starts_with("28") || state.code() == "3D000");
        let check = if login_refused {
            "check the user, password and database in CORESDK_STORE (--store) and the server's pg_hba.conf"
        } else if self.tls.is_some() {
            "is the server running and reachable, and is its certificate signed by the CA in CORESDK_POSTGRES_CA_FILE? check CORESDK_STORE (--store)"
        } else {
            "is the server running and reachable? check the host, port and database in CORESDK_STORE (--store)"
        };
        StoreError::PostgresUnreachable {
            target: self.target(),
            cause: with_causes(error),
            check,
        }
    }
}

/// URL settings whose values are shown in logs and errors; any other's value is hidden, since
/// a password may come as `password=`, percent-encoded (`pass%77ord=`) or in a setting added
/// later.
const SHOWN_SETTINGS: [&str; 14] = [
    "sslmode",
    "pool_size",
    "user",
    "dbname",
    "host",
    "hostaddr",
    "port",
    "connect_timeout",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_retries",
    "tcp_user_timeout",
    "application_name",
];

/// A PostgreSQL URL as logs and errors may show it: no password, wherever it was given.
///
/// Read the way the client reads the URL, never more leniently: the credentials run to the
/// *first* `@` (a `?` or `/` before it is part of the password), and a password containing
/// `@` is hidden up to the *last* `@`, so neither reading shows any of it.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let rest = match (rest.split_once('@'), rest.rsplit_once('@')) {
        (Some((credentials, _)), Some((_, after_last))) => match credentials.split_once(':') {
            Some((user, _)) => format!("{user}:***@{after_last}"),
            None => rest.to_owned(),
        },
        _ => rest.to_owned(),
    };
    let Some((base, query)) = rest.split_once('?') else {
        return format!("{scheme}://{rest}");
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if !SHOWN_SETTINGS.contains(&key) => format!("{key}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{scheme}://{base}?{}", query.join("&"))
}

/// The longest pause between attempts to reach a server that is away: short, so that a
/// recovered server is in use again within a second or two.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Sleeps `delay`, waking early when `stop` is set, so closing never waits out a backoff.
pub(super) fn sleep_unless_stopped(delay: Duration, stop: &AtomicBool) {
    let until = Instant::now() + delay;
    while !stop.load(Ordering::Acquire) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        StoreError::Postgres(with_causes(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_settings_are_read_and_refused_when_out_of_range() {
        let plain =
            Connector::new("postgres://u:p@127.0.0.1:5432/db?pool_size=4", None).expect("valid");
        assert_eq!((plain.read_connections, plain.tls.is_some()), (4, false));
        assert!(Connector::new("postgres://u@h/db?pool_size=0", None).is_err());
        assert!(Connector::new("postgres://u@h/db?pool_size=1", None).is_err());
        assert!(
            matches!(Connector::new("postgres://u@h/db?sslmode=requir", None), Err(StoreError::Postgres(m)) if m.contains("sslmode=requir"))
        );
        assert!(Connector::new("postgres://u@h/db?sslmode=disable", None).is_ok());
        let no_ca = Connector::new("postgres://u@h/db?sslmode=require", None);
        assert!(
            matches!(no_ca, Err(StoreError::Unsupported(m)) if m.contains("CORESDK_POSTGRES_CA_FILE"))
        );
        assert_eq!(
            Connector::new("postgres://u@h/db", None)
                .map(|c| c.read_connections)
                .ok(),
            Some(2)
        );
    }

    #[test]
    fn passwords_never_reach_the_log() {
        let url =
            crate::store::StoreUrl::parse("postgres://app:s3cret@db:5432/coresdk").expect("valid");
        let shown = format!("{url:?}");
        assert!(
            !shown.contains("s3cret") && shown.contains("app:***@db"),
            "{shown}"
        );
        for (url, shown) in [
            ("postgres://app:p@ss@db/x", "postgres://app:***@db/x"),
            (
                "postgres://app@db/x?sslmode=require&password=s3cret",
                "postgres://app@db/x?sslmode=require&password=***",
            ),
            ("postgres://db/x", "postgres://db/x"),
            // The client reads the password up to the first `@`, `?` and `/` included.
            ("postgres://app:s3?cret@db/x", "postgres://app:***@db/x"),
            ("postgres://app:s3/cr?et@db/x", "postgres://app:***@db/x"),
            // The client decodes setting names: only known settings show their values.
            (
                "postgres://app@db/x?pass%77ord=s3cret&sslmode=disable",
                "postgres://app@db/x?pass%77ord=***&sslmode=disable",
            ),
            (
                "postgres://app@db/x?PASSWORD=s3cret&pool_size=4",
                "postgres://app@db/x?PASSWORD=***&pool_size=4",
            ),
        ] {
            assert_eq!(crate::store::redact_password(url), shown);
        }
    }

    proptest::proptest! {
        /// Whatever password the client would send, the shown URL holds none of it.
        #[test]
        fn no_password_the_client_reads_is_shown(
            password in "[a-zA-Z0-9?/:&=#!]{0,6}S3CRET[a-zA-Z0-9?/:@&=#!]{0,6}",
            in_query in proptest::bool::ANY,
            extra in "(&sslmode=disable|&pool_size=2|)",
        ) {
            let url = if in_query {
                format!("postgres://app@db:5432/x?password={}{extra}", password.replace('&', "%26"))
            } else {
                format!("postgres://app:{password}@db:5432/x{}", extra.replacen('&', "?", 1))
            };
            let shown = redact_url(&url);
            if let Ok(config) = url.parse::<tokio_postgres::Config>()
                && let Some(read) = config.get_password()
            {
                let read = String::from_utf8_lossy(read);
                proptest::prop_assert!(read.len() < 4 || !shown.contains(read.as_ref()), "{url} shown as {shown}");
            }
            proptest::prop_assert!(!shown.contains("S3CRET"), "{url} shown as {shown}");
        }
    }

    #[test]
    fn an_unreachable_server_is_named_with_the_cause_and_what_to_check() {
        // A port nothing listens on: bound, then released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port")
            .port();
        let connector = Connector::new(
            &format!("postgres://app:s3cret@127.0.0.1:{port}/coresdk"),
            None,
        )
        .expect("valid");
        let error = match connector.connect() {
            Ok(_) => panic!("nothing listens on port {port}"),
            Err(e) => e.to_string(),
        };
        assert!(
            error.contains(&format!("127.0.0.1:{port}/coresdk")),
            "names the server: {error}"
        );
        assert!(
            error.contains("error connecting to server") && error.contains("refused"),
            "gives the cause: {error}"
        );
        assert!(
            error.contains("is the server running and reachable?")
                && error.contains("CORESDK_STORE"),
            "says what to check: {error}"
        );
        assert!(!error.contains("s3cret"), "never the password: {error}");
    }

    #[test]
    fn the_target_names_every_host_and_defaults_the_port_and_database() {
        let target = |url: &str| Connector::new(url, None).expect("valid").target();
        assert_eq!(target("postgres://app@db/coresdk"), "db:5432/coresdk");
        assert_eq!(
            target("postgres://app:pw@a:6000,b:6001/x"),
            "a:6000,b:6001/x"
        );
        assert_eq!(target("postgres://app@db:5433"), "db:5433/app");
    }
}
