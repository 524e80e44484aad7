//! `commerce keys`: the token-signing keys of user-svc.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct KeysArgs {
    /// The key directory [default: COMMERCE__AUTH__KEYS_DIR, else ./var/keys]
    #[arg(long, global = true)]
    dir: Option<PathBuf>,

    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Add a new key; user-svc signs with it from the next token on (within a second)
    ///
    /// Tokens signed with older keys keep verifying until they expire. Delete an old key
    /// file once the access-token lifetime (COMMERCE__AUTH__ACCESS_TOKEN_TTL_SECS) has
    /// passed since the rotation.
    Rotate,
    /// List the keys, oldest first; the last one signs
    List,
}

fn key_ids(dir: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let mut ids: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "pem"))
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    ids.sort();
    Ok(ids)
}

pub fn run(args: KeysArgs) -> anyhow::Result<ExitCode> {
    let dir = match args.dir {
        Some(dir) => dir,
        None => shared::Settings::load()?.auth.keys_dir,
    };
    match args.command {
        KeysCommand::Rotate => {
            let kid = shared::auth::generate_key(&dir)?;
            println!("added key {kid} in {}", dir.display());
            println!("user-svc signs with it within a second; older keys keep verifying.");
        }
        KeysCommand::List => {
            let ids = key_ids(&dir)?;
            if ids.is_empty() {
                println!(
                    "no keys in {} (user-svc makes the first at start)",
                    dir.display()
                );
            }
            for (i, id) in ids.iter().enumerate() {
                let role = if i + 1 == ids.len() {
                    "signs"
                } else {
                    "verifies"
                };
                println!("{id}  {role}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
