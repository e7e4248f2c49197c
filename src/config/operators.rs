//! Named operators: who may call admin RPCs, each under its own name. The single admin token
//! (`CORESDK_ADMIN_TOKEN` or `_FILE`) is the operator `admin`; `CORESDK_ADMIN_TOKENS_FILE`
//! names more, one `name: token` line each, and is re-read when it changes (see
//! [`crate::reload`]), so an operator is added or removed without a restart.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Weak};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::reload::{Reload, Secret, WatchedFile};

/// The name of the operator whose token is `CORESDK_ADMIN_TOKEN` (or `_FILE`).
pub const ADMIN_OPERATOR: &str = "admin";

/// Most operators a tokens file may name: each admin call compares the presented token with
/// every operator's, so the file's size bounds that work.
pub const MAX_OPERATORS: usize = 1000;

/// Longest operator name; names are audit actors, so they are short identifiers.
const MAX_NAME_LEN: usize = 64;

/// One operator of a tokens file. Only a digest of the token is kept: comparing digests is
/// constant-time whatever the lengths (as [`crate::auth::tokens_match`] does), and the token
/// itself never stays in memory to be printed by mistake.
struct Operator {
    name: String,
    digest: [u8; 32],
}

/// The operators of a tokens file, in file order.
pub struct OperatorSet(Vec<Operator>);

impl OperatorSet {
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|o| o.name.as_str())
    }
}

/// What is wrong with an operator name: `[a-z0-9][a-z0-9._-]{0,63}`, so it reads the same in
/// the audit trail, logs and a shell, and cannot pose as another field.
fn name_defect(name: &str) -> Option<&'static str> {
    let mut chars = name.chars();
    match chars.next() {
        None => Some("the name is empty"),
        Some(first) if !(first.is_ascii_lowercase() || first.is_ascii_digit()) => {
            Some("the name must start with a lowercase letter or a digit")
        }
        Some(_) if name.len() > MAX_NAME_LEN => Some("the name is longer than 64 characters"),
        Some(_)
            if !chars.all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
            }) =>
        {
            Some("the name may hold only a-z, 0-9, '.', '_' and '-'")
        }
        Some(_) => None,
    }
}

/// The actors the sidecar writes under itself: an operator so named would pose as it.
const SYSTEM_ACTORS: [&str; 6] = [
    crate::ops::WEBHOOK_ACTOR,
    crate::ops::REPLAY_ACTOR,
    crate::ops::SEED_ACTOR,
    crate::ops::PARKING_ACTOR,
    crate::coalesce::OVERFLOW_ACTOR,
    crate::auth::ANONYMOUS_ACTOR,
];

/// The other tokens a tokens file is read beside, by their current value (either may be a
/// file that reloads).
#[derive(Clone, Default)]
pub struct Beside {
    /// `CORESDK_ADMIN_TOKEN` (or `_FILE`), the operator `admin`: a file operator with its
    /// token would be audited as `admin`, and the name `admin` is taken.
    pub admin: Option<Secret<String>>,
    /// `CORESDK_API_TOKEN` (or `_FILE`): an operator with it would make every app an admin.
    pub api: Option<Secret<String>>,
}

fn digest_of(secret: &Option<Secret<String>>) -> Option<[u8; 32]> {
    secret
        .as_ref()
        .map(|s| s.with(|token| Sha256::digest(token.trim().as_bytes()).into()))
}

fn parse(path: &Path, bytes: &[u8], beside: &Beside) -> Result<OperatorSet, String> {
    let admin_digest = digest_of(&beside.admin);
    let api_digest = digest_of(&beside.api);
    let text = crate::reload::utf8(path, bytes)?;
    if text.trim().is_empty() {
        // What a file being written in place looks like between its truncation and its
        // write: taking it would lock every operator out until the next check.
        return Err(format!(
            "{} is empty; to name no operator, leave a comment line in it",
            path.display()
        ));
    }
    let mut operators = Vec::new();
    let mut names = HashSet::new();
    let mut digests = HashSet::new();
    for (index, line) in text.lines().enumerate() {
        // Errors name the line, never its content, not even the name: a line written the wrong
        // way round (`<token>: alice`) has a valid name that is the token.
        let at = |what: &str| format!("{}:{}: {what}", path.display(), index + 1);
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, token)) = line.split_once(':') else {
            return Err(at("expected `name: token`"));
        };
        let (name, token) = (name.trim(), token.trim());
        if let Some(defect) = name_defect(name) {
            return Err(at(defect));
        }
        if let Some(defect) = super::token_defect(token) {
            return Err(at(&format!("the token {defect}")));
        }
        if beside.admin.is_some() && name == ADMIN_OPERATOR {
            return Err(at(&format!(
                "operator '{ADMIN_OPERATOR}' is CORESDK_ADMIN_TOKEN's; remove this line or that setting"
            )));
        }
        if SYSTEM_ACTORS.contains(&name) {
            // A fixed name of the sidecar's own, safe to show.
            return Err(at(&format!(
                "'{name}' is an actor the sidecar itself writes the audit trail under; choose another name"
            )));
        }
        if !names.insert(name.to_owned()) {
            return Err(at("this operator's name is already given above"));
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if !digests.insert(digest) {
            return Err(at(
                "this operator has the token of an operator above; give each its own",
            ));
        }
        if admin_digest == Some(digest) {
            return Err(at(
                "this operator has CORESDK_ADMIN_TOKEN's token; give it its own",
            ));
        }
        if api_digest == Some(digest) {
            return Err(at(
                "this operator has CORESDK_API_TOKEN's token, which would make every app an operator; give it its own",
            ));
        }
        if operators.len() == MAX_OPERATORS {
            return Err(at(&format!("more than {MAX_OPERATORS} operators")));
        }
        operators.push(Operator {
            name: name.to_owned(),
            digest,
        });
    }
    Ok(OperatorSet(operators))
}

/// Parses a tokens file read beside the admin and API tokens: a parser for
/// [`WatchedFile::load`] that compares with their values at each read. One of comments only
/// names no operator (removing every line revokes every operator it named); an empty one is
/// refused.
pub fn operators_parser(
    beside: Beside,
) -> impl Fn(&Path, &[u8]) -> Result<OperatorSet, String> + Send + Sync + 'static {
    move |path, bytes| parse(path, bytes, &beside)
}

/// Every operator this sidecar accepts.
#[derive(Clone, Default)]
pub struct Operators {
    /// `CORESDK_ADMIN_TOKEN` or `_FILE`: the operator `admin`.
    pub admin: Option<Secret<String>>,
    /// `CORESDK_ADMIN_TOKENS_FILE`.
    pub file: Option<Arc<WatchedFile<OperatorSet>>>,
    /// `CORESDK_API_TOKEN` or `_FILE`: no operator's, whatever a reload makes of it.
    pub api: Option<Secret<String>>,
}

impl Operators {
    /// Whether any operator is configured (else admin RPCs are refused, but in mock mode).
    pub fn configured(&self) -> bool {
        self.admin.is_some() || self.file.is_some()
    }

    /// The name of the operator whose token `presented` is (trimmed, as every presented
    /// token), comparing with every operator's token in constant time and without stopping
    /// at a match, so the time taken says nothing about which one matched, if any.
    pub fn identify(&self, presented: &str) -> Option<String> {
        let mut found: Option<String> = None;
        let mut matches = 0usize;
        if let Some(admin) = &self.admin
            && admin.with(|expected| crate::auth::tokens_match(presented, expected))
        {
            found = Some(ADMIN_OPERATOR.to_owned());
            matches += 1;
        }
        if let Some(file) = &self.file {
            let presented: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
            for operator in &file.current().0 {
                let matched: bool = presented.ct_eq(&operator.digest).into();
                if matched {
                    matches += 1;
                    if found.is_none() {
                        found = Some(operator.name.clone());
                    }
                }
            }
        }
        if matches > 1 {
            // The tokens file refuses the admin token's token when it is read, but a later
            // reload of CORESDK_ADMIN_TOKEN_FILE can still make them one: which operator made
            // the change could not be told, so nobody did.
            tracing::error!(
                "a token is both CORESDK_ADMIN_TOKEN's and a CORESDK_ADMIN_TOKENS_FILE operator's; refused until one of them changes"
            );
            return None;
        }
        if let Some(name) = &found
            && let Some(api) = &self.api
            && api.with(|api| crate::auth::tokens_match(presented, api))
        {
            // Refused at start and whenever the tokens file is read, but a reload of
            // CORESDK_API_TOKEN_FILE or CORESDK_ADMIN_TOKEN_FILE can still make them one: every
            // app would be an admin.
            tracing::error!(
                operator = %name,
                "an operator's token is also the API token; its admin calls are refused until one of them changes"
            );
            return None;
        }
        found
    }

    /// The files to re-read when they change.
    pub fn watched(&self) -> Vec<Weak<dyn Reload>> {
        let mut watched: Vec<Weak<dyn Reload>> =
            self.admin.iter().filter_map(Secret::watched).collect();
        if let Some(file) = &self.file {
            let file: Arc<dyn Reload> = file.clone();
            watched.push(Arc::downgrade(&file));
        }
        watched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN_A: &str = "token-of-alice-0123456789";
    const TOKEN_B: &str = "token-of-bob-0123456789";
    /// A token as `openssl rand -hex 16` makes one: also a valid operator name.
    const REVERSED: &str = "0123456789abcdef0123456789abcdef";

    fn parsed(text: &str) -> Result<Vec<String>, String> {
        parse(Path::new("/etc/ops"), text.as_bytes(), &Beside::default())
            .map(|set| set.names().map(str::to_owned).collect())
    }

    fn fixed(token: &str) -> Option<Secret<String>> {
        Some(Secret::Fixed(Arc::new(token.to_owned())))
    }

    #[test]
    fn lines_comments_and_blanks() {
        let text =
            format!("# who may change flags\n\nalice: {TOKEN_A}\n  bob.ops_2-x :  {TOKEN_B}  \r\n");
        assert_eq!(parsed(&text).expect("parses"), ["alice", "bob.ops_2-x"]);
        for empty in ["", " \n\n"] {
            let error = parsed(empty).expect_err("an empty file");
            assert!(error.contains("is empty"), "{error}");
        }
        assert_eq!(
            parsed("# none yet\n").expect("comments"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn errors_name_the_line_and_never_the_token() {
        let cases = [
            (format!("alice {TOKEN_A}"), 1, "expected `name: token`"),
            (
                format!("\nAlice: {TOKEN_A}"),
                2,
                "lowercase letter or a digit",
            ),
            (format!("-x: {TOKEN_A}"), 1, "lowercase letter or a digit"),
            (format!("a b: {TOKEN_A}"), 1, "only a-z"),
            (
                format!("{}: {TOKEN_A}", "a".repeat(65)),
                1,
                "longer than 64",
            ),
            (format!(": {TOKEN_A}"), 1, "name is empty"),
            ("alice: short-token".to_owned(), 1, "at least 16 characters"),
            ("alice:".to_owned(), 1, "empty"),
            (
                format!("alice: {TOKEN_A}\n#\nalice: {TOKEN_B}"),
                3,
                "already given above",
            ),
            (
                format!("alice: {TOKEN_A}\nbob: {TOKEN_A}"),
                2,
                "token of an operator above",
            ),
            // Written the wrong way round: the token is a valid name, and must not be shown.
            (format!("{REVERSED}: alice"), 1, "at least 16 characters"),
        ];
        for (text, line, what) in cases {
            let error = parsed(&text).expect_err(&text);
            assert!(error.starts_with(&format!("/etc/ops:{line}: ")), "{error}");
            assert!(error.contains(what), "{error} should say {what}");
            for token in [TOKEN_A, TOKEN_B, "short-token", REVERSED] {
                assert!(!error.contains(token), "{error} echoes a token");
            }
        }
        let mut many: String = (0..MAX_OPERATORS)
            .map(|i| format!("op{i}: token-number-{i:012}\n"))
            .collect();
        assert_eq!(parsed(&many).expect("the most").len(), MAX_OPERATORS);
        many.push_str("one-more: token-number-one-more\n");
        let error = parsed(&many).expect_err("one past the most");
        assert!(
            error.contains(&format!(":{}: more than", MAX_OPERATORS + 1)),
            "{error}"
        );
        let beside_admin = Beside {
            admin: fixed("the-admin-token-0123456789"),
            api: None,
        };
        let error = parse(
            Path::new("f"),
            format!("admin: {TOKEN_A}").as_bytes(),
            &beside_admin,
        )
        .err()
        .expect("admin is reserved");
        assert!(
            error.starts_with("f:1: ") && error.contains("CORESDK_ADMIN_TOKEN"),
            "{error}"
        );
        assert!(parsed(&format!("admin: {TOKEN_A}")).is_ok());
    }

    #[test]
    fn the_sidecars_own_actors_are_not_operator_names() {
        for actor in SYSTEM_ACTORS {
            let error = parsed(&format!("alice: {TOKEN_A}\n{actor}: {TOKEN_B}")).expect_err(actor);
            assert!(
                error.starts_with("/etc/ops:2: ") && error.contains(actor),
                "{error}"
            );
        }
    }

    #[test]
    fn another_settings_token_is_refused_by_its_value_now() {
        let beside = Beside {
            admin: fixed(TOKEN_A),
            api: fixed(&format!(" {TOKEN_B}\n")),
        };
        let read = |text: &str| parse(Path::new("f"), text.as_bytes(), &beside).err();
        let error = read(&format!("alice: {TOKEN_A}")).expect("the admin token");
        assert!(
            error.starts_with("f:1: ") && error.contains("CORESDK_ADMIN_TOKEN"),
            "{error}"
        );
        let error = read(&format!("# x\nbob: {TOKEN_B}")).expect("the API token");
        assert!(
            error.starts_with("f:2: ") && error.contains("CORESDK_API_TOKEN"),
            "{error}"
        );
        assert!(!error.contains(TOKEN_B), "{error}");
        assert!(read("carol: token-of-carol-0123456789").is_none());
    }

    #[test]
    fn a_token_identifies_its_operator() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("operators");
        std::fs::write(&path, format!("alice: {TOKEN_A}\nbob: {TOKEN_B}\n")).expect("write");
        let operators = Operators {
            admin: Some(Secret::Fixed(Arc::new(
                "the-admin-token-0123456789".to_owned(),
            ))),
            file: Some(Arc::new(
                WatchedFile::load(
                    "CORESDK_ADMIN_TOKENS_FILE",
                    &path,
                    operators_parser(Beside::default()),
                )
                .expect("loads"),
            )),
            api: None,
        };
        assert_eq!(operators.identify(TOKEN_B).as_deref(), Some("bob"));
        assert_eq!(
            operators.identify(&format!(" {TOKEN_A}\n")).as_deref(),
            Some("alice")
        );
        assert_eq!(
            operators.identify("the-admin-token-0123456789").as_deref(),
            Some("admin")
        );
        assert_eq!(operators.identify("token-of-nobody-0123456789"), None);
        assert_eq!(operators.identify(""), None);
        assert!(operators.configured());
        assert!(!Operators::default().configured());
        assert_eq!(operators.watched().len(), 1);
    }
}
