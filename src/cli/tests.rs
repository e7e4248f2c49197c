//! `--help` describes every flag, and refused values are explained with their source.

use clap::CommandFactory as _;

use super::*;

fn all_args(command: &clap::Command) -> Vec<(String, clap::Arg)> {
    let mut args: Vec<(String, clap::Arg)> = command
        .get_arguments()
        .map(|a| (command.get_name().to_owned(), a.clone()))
        .collect();
    for sub in command.get_subcommands() {
        args.extend(all_args(sub));
    }
    args
}

fn built() -> clap::Command {
    let mut command = Cli::command();
    command.build();
    command
}

#[test]
fn every_flag_has_a_description() {
    for (command, arg) in all_args(&built()) {
        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        assert!(
            !help.trim().is_empty(),
            "`{command} {arg}` has no description in --help"
        );
    }
}

#[test]
fn help_names_only_flags_that_exist() {
    let command = built();
    let longs: Vec<String> = all_args(&command)
        .iter()
        .filter_map(|(_, a)| a.get_long().map(|l| format!("--{l}")))
        .collect();
    for (name, arg) in all_args(&command) {
        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        for word in help.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
            if word.starts_with("--") {
                assert!(
                    longs.iter().any(|l| l == word),
                    "`{name} {arg}` mentions {word}, which does not exist"
                );
            }
        }
    }
}

#[test]
fn store_help_lists_every_kind_of_store_and_the_default() {
    let command = built();
    let store = command
        .get_arguments()
        .find(|a| a.get_long() == Some("store"))
        .expect("--store");
    let help = store.get_help().expect("help").to_string();
    for needed in ["sqlite://PATH", "postgres://", "memory", DEFAULT_STORE] {
        assert!(help.contains(needed), "--store help lacks {needed}: {help}");
    }
}

fn refused(argv: &[&str], env: &dyn Fn(&str) -> Option<OsString>) -> String {
    let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
    let error = Cli::command()
        .mut_args(|a| a.env(None::<&str>))
        .try_get_matches_from(&argv)
        .expect_err("refused");
    explain_clap_error(&error, &argv, env).expect("explained")
}

fn no_env(_: &str) -> Option<OsString> {
    None
}

#[test]
fn a_refused_flag_value_names_the_flag_the_setting_and_the_fix() {
    assert_eq!(
        refused(&["coresdk", "--fail-mode", "sometimes"], &no_env),
        r#"CORESDK_FAIL_MODE (from --fail-mode on the command line) = "sometimes": invalid value; use open or closed"#
    );
    assert_eq!(
        refused(&["coresdk", "serve", "--listen=nowhere"], &no_env),
        r#"CORESDK_LISTEN (from --listen on the command line) = "nowhere": invalid socket address syntax; use an IP address and port, e.g. 127.0.0.1:50051"#
    );
    let line = refused(&["coresdk", "--shutdown-grace-s", "ten"], &no_env);
    assert!(
        line.starts_with(
            "CORESDK_SHUTDOWN_GRACE_S (from --shutdown-grace-s on the command line) = \"ten\": "
        ),
        "{line}"
    );
    assert!(line.ends_with("use a whole number of 0 or more"), "{line}");
    let line = refused(&["coresdk", "--mock", "maybe"], &no_env);
    assert!(line.ends_with("use true or false"), "{line}");
    let line = refused(&["coresdk", "health", "--timeout-s", "soon"], &no_env);
    assert!(
        line.starts_with("--timeout-s (from --timeout-s on the command line)"),
        "{line}"
    );
}

#[test]
fn a_refused_value_from_the_environment_names_the_variable() {
    // clap reports the flag alone; the value came from the environment when the flag was not
    // on the command line and the variable is set.
    let argv: Vec<OsString> = ["coresdk", "--fail-mode", "sometimes"]
        .iter()
        .map(OsString::from)
        .collect();
    let error = Cli::command()
        .mut_args(|a| a.env(None::<&str>))
        .try_get_matches_from(&argv)
        .expect_err("refused");
    let from_env = |name: &str| (name == "CORESDK_FAIL_MODE").then(|| "sometimes".into());
    assert_eq!(
        explain_clap_error(&error, &[OsString::from("coresdk")], &from_env).expect("explained"),
        r#"CORESDK_FAIL_MODE (from the environment) = "sometimes": invalid value; use open or closed"#
    );
}

#[test]
fn errors_clap_explains_best_are_left_to_clap() {
    for argv in [&["coresdk", "--no-such-flag"][..], &["coresdk", "--help"]] {
        let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
        let error = Cli::command()
            .try_get_matches_from(&argv)
            .expect_err("an error");
        assert!(explain_clap_error(&error, &argv, &no_env).is_none());
    }
}

#[test]
fn a_configuration_error_says_where_the_value_came_from_and_hides_secrets() {
    let explain = |argv: &[&str]| {
        let invocation = Invocation::parse_from(argv.iter().map(OsString::from).collect())
            .ok()
            .expect("parses");
        let args = match &invocation.cli.command {
            Some(Command::Serve(args)) => args.clone(),
            _ => invocation.cli.serve.clone(),
        };
        // `Config` has no Debug (it holds secrets), so no `expect_err`.
        let Err(error) = crate::config::Config::from_args(args) else {
            panic!("{argv:?} was accepted");
        };
        invocation.explain(&error)
    };
    assert_eq!(
        explain(&["coresdk", "--store", "mysql://x"]),
        "CORESDK_STORE (from --store on the command line) = \"mysql://x\": unsupported store URL 'mysql://x': use sqlite://PATH, postgres://… or memory"
    );
    let line = explain(&["coresdk", "--store", "postgress://app:s3cret@db/x"]);
    assert!(
        !line.contains("s3cret") && line.contains("postgress://app:***@db/x"),
        "{line}"
    );
    let line = explain(&["coresdk", "serve", "--admin-token", "short-secret"]);
    assert!(
        line.starts_with("CORESDK_ADMIN_TOKEN (from --admin-token on the command line): "),
        "{line}"
    );
    assert!(!line.contains("short-secret"), "{line}");
    let line = explain(&["coresdk", "--tls-cert-file", "/cert.pem"]);
    assert!(
        line.starts_with("CORESDK_TLS_KEY_FILE (not set): "),
        "{line}"
    );
}
