//! `--config FILE` of `vane controller` and `vane agent`: a TOML file whose keys are the
//! subcommand's long flags, spelled as on the command line (`data-dir = "/srv/vane"`), a
//! switch such as `plaintext` as `true` or `false`. What the command line or the
//! environment gives wins over the file, and the file over the defaults.
//!
//! The file is turned into flags and parsed again by clap: the same parsers check it as
//! check the command line, so the file can never mean something the flags cannot. Each
//! key is first checked alone so that a mistake names the file and the key.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use clap::parser::ValueSource;
use clap::{ArgAction, CommandFactory, Parser};

use crate::cli::{AgentArgs, Cli, Cmd, ControllerArgs};

/// Flags that are not settings of the daemon: never keys of its file.
const NOT_KEYS: &[&str] = &["config", "help", "version"];

/// `vane controller`'s arguments, completed from its config file.
pub fn controller(path: &Path) -> Result<ControllerArgs> {
    match merge(
        &std::env::args_os().collect::<Vec<_>>(),
        "controller",
        path,
        &[],
    )?
    .command
    {
        Cmd::Controller(args) => Ok(args),
        _ => unreachable!("parsed again as `vane controller`"),
    }
}

/// `vane agent`'s arguments, completed from its config file, and the controller's URL,
/// which the agent takes from the global `--controller` (so `controller` is a key of its
/// file too).
pub fn agent(path: &Path) -> Result<(AgentArgs, Option<String>)> {
    let cli = merge(
        &std::env::args_os().collect::<Vec<_>>(),
        "agent",
        path,
        &["controller"],
    )?;
    match cli.command {
        Cmd::Agent(args) => Ok((args, cli.controller)),
        _ => unreachable!("parsed again as `vane agent`"),
    }
}

/// Parses `argv` (a `vane SUB ...` command line) again with the keys of the TOML file at
/// `path` that it does not give: SUB's own flags, and of the global ones those in
/// `globals`.
fn merge(argv: &[OsString], sub: &str, path: &Path, globals: &[&str]) -> Result<Cli> {
    let file = path.display();
    let text = std::fs::read_to_string(path).with_context(|| format!("read config file {file}"))?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let line = e
            .span()
            .map_or(0, |s| text[..s.start].matches('\n').count() + 1);
        anyhow!("{file}: line {line}: {}", e.message().trim())
    })?;

    let mut cmd = Cli::command();
    cmd.build();
    let given = cmd
        .clone()
        .try_get_matches_from(argv)
        .map_err(|e| anyhow!("{}", first_line(&e.to_string())))?;
    let given = given
        .subcommand_matches(sub)
        .with_context(|| format!("not a `vane {sub}` command line"))?;
    let sub_cmd = cmd.find_subcommand(sub).expect("a subcommand of vane");

    let mut extra: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        let arg = sub_cmd
            .get_arguments()
            .find(|a| {
                a.get_long() == Some(key.as_str())
                    && !NOT_KEYS.contains(&key.as_str())
                    && (!a.is_global_set() || globals.contains(&key.as_str()))
            })
            .ok_or_else(|| {
                let kebab = key.replace('_', "-");
                if kebab != *key && sub_cmd.get_arguments().any(|a| a.get_long() == Some(&kebab)) {
                    anyhow!("{file}: unknown key {key:?} (keys are spelled as the flags: {kebab:?})")
                } else {
                    anyhow!("{file}: unknown key {key:?} (`vane {sub} --help` lists the flags, which are the keys)")
                }
            })?;
        // The command line and the environment were given for this run: they win.
        if matches!(
            given.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        if matches!(arg.get_action(), ArgAction::SetTrue) {
            match value.as_bool() {
                Some(true) => extra.push(format!("--{key}").into()),
                Some(false) => {}
                None => bail!(
                    "{file}: key {key:?}: expected true or false, found {}",
                    value.type_str()
                ),
            }
            continue;
        }
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            other => bail!(
                "{file}: key {key:?}: expected a string or an integer, found {}",
                other.type_str()
            ),
        };
        // The flag alone, as the command line would give it: its own parser checks it.
        let probe = arg
            .clone()
            .required(false)
            .required_unless_present(clap::builder::Resettable::Reset);
        clap::Command::new("vane")
            .no_binary_name(true)
            .arg(probe)
            .try_get_matches_from([format!("--{key}={text}")])
            .map_err(|e| {
                // Clap names the flag; the reader of this line is editing the file.
                let why = first_line(&e.to_string());
                let why = why.rsplit_once("': ").map_or(why.as_str(), |(_, w)| w);
                anyhow!("{file}: key {key:?}: invalid value {text:?}: {why}")
            })?;
        // One argument, so that a value beginning with '-' is not taken for a flag.
        extra.push(format!("--{key}={text}").into());
    }
    let mut argv = argv.to_vec();
    argv.extend(extra);
    Cli::try_parse_from(argv).map_err(|e| anyhow!("{file}: {}", first_line(&e.to_string())))
}

/// The line of a clap error that says what is wrong.
fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or("invalid arguments");
    line.trim_start_matches("error: ").trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<OsString> {
        std::iter::once("vane")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    fn controller_with(text: &str, args: &[&str]) -> Result<ControllerArgs> {
        let f = file(text);
        let path = f.path().to_str().unwrap();
        let mut line = vec!["controller", "--config", path];
        line.extend(args);
        match merge(&argv(&line), "controller", f.path(), &[])?.command {
            Cmd::Controller(a) => Ok(a),
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_file_sets_what_the_command_line_does_not() {
        let args = controller_with(
            "listen = \"127.0.0.1:9000\"\ndata-dir = \"/srv/vane\"\nplaintext = true\n",
            &[],
        )
        .unwrap();
        assert_eq!(args.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(args.data_dir, Path::new("/srv/vane"));
        assert!(args.plaintext);
        // Untouched keys keep their defaults.
        assert_eq!(args.global_space.to_string(), "10.0.0.0/8");
    }

    #[test]
    fn a_flag_wins_over_the_file() {
        let args = controller_with(
            "listen = \"127.0.0.1:9000\"\ndata-dir = \"/srv/vane\"\n",
            &["--listen", "127.0.0.1:9100"],
        )
        .unwrap();
        assert_eq!(args.listen.to_string(), "127.0.0.1:9100");
        assert_eq!(args.data_dir, Path::new("/srv/vane"));
    }

    #[test]
    fn false_leaves_a_switch_off() {
        let args = controller_with("plaintext = false\n", &[]).unwrap();
        assert!(!args.plaintext);
    }

    #[test]
    fn an_unknown_key_is_refused_by_name() {
        let e = controller_with("colour = \"blue\"\n", &[])
            .err()
            .expect("refused");
        let e = format!("{e:#}");
        assert!(e.contains("unknown key \"colour\""), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn a_snake_case_key_is_shown_its_spelling() {
        let e = controller_with("data_dir = \"/srv\"\n", &[])
            .err()
            .expect("refused");
        assert!(e.to_string().contains("\"data-dir\""), "{e}");
    }

    #[test]
    fn a_global_flag_is_not_a_key_of_the_controller() {
        let e = controller_with("controller = \"https://x:7946\"\n", &[])
            .err()
            .expect("refused");
        assert!(e.to_string().contains("unknown key \"controller\""), "{e}");
    }

    #[test]
    fn a_bad_value_names_the_file_the_key_and_why() {
        let f = file("listen = \"nowhere\"\n");
        let path = f.path().to_str().unwrap().to_string();
        let e = merge(
            &argv(&["controller", "--config", &path]),
            "controller",
            f.path(),
            &[],
        )
        .err()
        .expect("refused")
        .to_string();
        assert!(e.starts_with(&format!(
            "{path}: key \"listen\": invalid value \"nowhere\""
        )));
        assert!(!e.contains('\n'), "one line: {e}");
        let e = controller_with("plaintext = \"yes\"\n", &[])
            .err()
            .expect("refused");
        assert!(
            e.to_string()
                .contains("expected true or false, found string"),
            "{e}"
        );
        let e = controller_with("listen = [1]\n", &[])
            .err()
            .expect("refused");
        assert!(e.to_string().contains("found array"), "{e}");
    }

    #[test]
    fn broken_toml_names_the_line() {
        let e = controller_with("listen = \"127.0.0.1:9000\"\nplaintext = \n", &[])
            .err()
            .expect("refused");
        let e = e.to_string();
        assert!(e.contains(": line 2: "), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn the_agent_takes_its_name_and_controller_from_the_file() {
        let f =
            file("name = \"h9\"\ncontroller = \"https://198.18.9.254:7946\"\ntunnel-idle = 30\n");
        let path = f.path().to_str().unwrap();
        let cli = merge(
            &argv(&["agent", "--config", path, "--tunnel-idle", "60"]),
            "agent",
            f.path(),
            &["controller"],
        )
        .unwrap();
        let Cmd::Agent(args) = cli.command else {
            panic!("an agent command line")
        };
        assert_eq!(args.name.as_deref(), Some("h9"));
        assert_eq!(args.tunnel_idle, 60);
        assert_eq!(cli.controller.as_deref(), Some("https://198.18.9.254:7946"));
    }

    #[test]
    fn a_global_flag_before_the_subcommand_wins_over_the_file() {
        let f = file("name = \"h9\"\ncontroller = \"https://198.18.9.254:7946\"\n");
        let path = f.path().to_str().unwrap();
        let cli = merge(
            &argv(&[
                "--controller",
                "https://10.1.0.5:7946",
                "agent",
                "--config",
                path,
            ]),
            "agent",
            f.path(),
            &["controller"],
        )
        .unwrap();
        assert_eq!(cli.controller.as_deref(), Some("https://10.1.0.5:7946"));
    }
}
