//! Reaching the database: the URL's settings, TLS, and connection errors that say where the
//! sidecar tried to connect, why it failed and what to check.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use postgres::config::Host;
use postgres::{Client, NoTls};

use crate::problem::with_causes;
use crate::store::StoreError;

/// How to reach the database: the parsed URL, and TLS when the URL asks for it.
#[derive(Clone)]
pub struct Connector {
    config: postgres::Config,
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
        let cleaned = match url.split_once('?') {
            None => url.to_owned(),
            Some((base, query)) => {
                let kept: Vec<&str> = query
                    .split('&')
                    .filter(|pair| {
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
        let mut config: postgres::Config = cleaned
            .parse()
            .map_err(|e: postgres::Error| StoreError::Postgres(format!("bad URL: {e}")))?;
        if !(1..=64).contains(&read_connections) {
            return Err(StoreError::Unsupported(
                "pool_size must be between 1 and 64",
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
        config.ssl_mode(postgres::config::SslMode::Require);
        Ok(Self {
            config,
            tls: Some(tokio_postgres_rustls::MakeRustlsConnect::new(tls)),
            read_connections,
        })
    }

    /// Opens one connection. The sync client drives its own runtime, so this must not run on
    /// an async thread.
    pub(super) fn connect(&self) -> Result<Client, StoreError> {
        let connected = match &self.tls {
            Some(tls) => self.config.connect(tls.clone()),
            None => self.config.connect(NoTls),
        };
        connected.map_err(|e| self.unreachable(&e))
    }

    /// Connects, retrying with backoff until `stop`; None when stopping.
    pub(super) fn connect_with_backoff(&self, stop: &AtomicBool, what: &str) -> Option<Client> {
        let mut delay = Duration::from_millis(100);
        loop {
            if stop.load(Ordering::Acquire) {
                return None;
            }
            match self.connect() {
                Ok(client) => return Some(client),
                Err(e) => {
                    tracing::warn!(error = %e, what, retry_in = ?delay, "PostgreSQL unreachable");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(5));
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

    fn unreachable(&self, error: &postgres::Error) -> StoreError {
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

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
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
        ] {
            assert_eq!(crate::store::redact_password(url), shown);
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
