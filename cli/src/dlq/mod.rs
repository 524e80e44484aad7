//! `commerce dlq`: the dead letters of every service, through the gateway, for the
//! on-call engineer. Human tables by default, `--json` for scripts (the API's own JSON).

mod client;
mod render;

use std::process::ExitCode;

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::Value;
use shared::admin::{
    AuditView, DetailView, GroupView, MessageView, Page, ReplayRequest, ReplayResponse,
};

use client::{Client, Credentials};

const BASE: &str = "/api/v1/admin/dead-letters";

#[derive(Debug, Args)]
pub struct DlqArgs {
    /// Base URL of the gateway
    #[arg(
        long,
        env = "COMMERCE_GATEWAY",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    gateway: String,
    /// An admin's access token
    #[arg(long, env = "COMMERCE_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Log in as this admin instead of giving a token
    #[arg(long, env = "COMMERCE_EMAIL", global = true)]
    email: Option<String>,
    /// Password for --email; asked for when not given
    #[arg(long, env = "COMMERCE_PASSWORD", hide_env_values = true, global = true)]
    password: Option<String>,
    /// Print the API's JSON instead of tables
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Groups of dead letters by cause; with --messages (or --group) the dead letters
    List(ListArgs),
    /// Everything about one dead letter: error chain, attempts, headers, body
    Show {
        /// `<service>:<uuid>`, as listed
        id: String,
    },
    /// Send dead letters back to the service that failed them (paced, audited)
    Replay {
        /// Dead letter ids (`<service>:<uuid>`)
        #[arg(required_unless_present = "group", conflicts_with = "group")]
        ids: Vec<String>,
        /// A whole group (`<service>:<fingerprint>`), as it stands now
        #[arg(long)]
        group: Option<String>,
    },
    /// Discard dead letters: they leave the open list and are purged after the retention
    Discard {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Who replayed or discarded what, newest first
    Audit(AuditArgs),
}

#[derive(Debug, Args)]
struct ListArgs {
    /// List the dead letters themselves, not their groups
    #[arg(long)]
    messages: bool,
    /// Only this service (e.g. notification)
    #[arg(long)]
    service: Option<String>,
    /// Only this group (`<service>:<fingerprint>`); lists its dead letters
    #[arg(long)]
    group: Option<String>,
    /// Only this event type (e.g. order.paid)
    #[arg(long)]
    event_type: Option<String>,
    /// Last failure at or after this RFC 3339 time
    #[arg(long)]
    since: Option<String>,
    /// Last failure before this RFC 3339 time
    #[arg(long)]
    until: Option<String>,
    /// Text in the error, ids or body
    #[arg(long, short)]
    query: Option<String>,
    /// open (default), replayed, discarded or all
    #[arg(long)]
    status: Option<String>,
    /// Items per page, 1 to 200
    #[arg(long)]
    limit: Option<u32>,
    /// Continue from a previous page's cursor
    #[arg(long)]
    cursor: Option<String>,
}

#[derive(Debug, Args)]
struct AuditArgs {
    #[arg(long)]
    service: Option<String>,
    /// Only this operator (user id)
    #[arg(long)]
    operator: Option<String>,
    /// replay or discard
    #[arg(long)]
    action: Option<String>,
    #[arg(long)]
    limit: Option<u32>,
    #[arg(long)]
    cursor: Option<String>,
}

fn pairs(fields: &[(&'static str, Option<String>)]) -> Vec<(&'static str, String)> {
    fields
        .iter()
        .filter_map(|(k, v)| v.clone().map(|v| (*k, v)))
        .collect()
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub async fn run(args: DlqArgs) -> anyhow::Result<ExitCode> {
    let credentials = Credentials {
        token: args.token,
        email: args.email,
        password: args.password,
    };
    let client = Client::connect(&args.gateway, credentials).await?;
    let json = args.json;
    match args.command {
        DlqCommand::List(list) => {
            let query = pairs(&[
                ("service", list.service),
                ("group", list.group.clone()),
                ("event_type", list.event_type),
                ("since", list.since),
                ("until", list.until),
                ("q", list.query),
                ("status", list.status),
                ("limit", list.limit.map(|l| l.to_string())),
                ("cursor", list.cursor),
            ]);
            if list.messages || list.group.is_some() {
                let page: Page<MessageView> =
                    client.get(&format!("{BASE}/messages"), &query).await?;
                if json {
                    print_json(&page)?;
                } else {
                    render::messages(&page);
                }
            } else {
                let page: Page<GroupView> = client.get(BASE, &query).await?;
                if json {
                    print_json(&page)?;
                } else {
                    render::groups(&page);
                }
            }
        }
        DlqCommand::Show { id } => {
            let detail: DetailView = client.get(&format!("{BASE}/{id}"), &[]).await?;
            if json {
                print_json(&detail)?;
            } else {
                render::detail(&detail);
            }
        }
        DlqCommand::Replay { ids, group } => {
            let request = match group {
                Some(group) => ReplayRequest {
                    ids: None,
                    group: Some(group),
                },
                None => ReplayRequest {
                    ids: Some(ids),
                    group: None,
                },
            };
            let answer: ReplayResponse = client
                .send(Method::POST, &format!("{BASE}/replay"), &[], Some(&request))
                .await?
                .unwrap_or_default();
            if json {
                print_json(&answer)?;
            } else {
                render::replayed(&answer);
            }
            if !answer.unavailable.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
        DlqCommand::Discard { ids } => {
            let mut done = Vec::new();
            for id in &ids {
                client
                    .send::<Value>(Method::DELETE, &format!("{BASE}/{id}"), &[], None::<&()>)
                    .await?;
                if !json {
                    println!("discarded {id}");
                }
                done.push(id.clone());
            }
            if json {
                print_json(&serde_json::json!({"discarded": done}))?;
            }
        }
        DlqCommand::Audit(audit) => {
            let query = pairs(&[
                ("service", audit.service),
                ("operator", audit.operator),
                ("action", audit.action),
                ("limit", audit.limit.map(|l| l.to_string())),
                ("cursor", audit.cursor),
            ]);
            let page: Page<AuditView> = client.get(&format!("{BASE}/audit"), &query).await?;
            if json {
                print_json(&page)?;
            } else {
                render::audit(&page);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
