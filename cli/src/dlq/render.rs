//! Tables for people. Long errors are cut to keep one line per row; `show` and `--json`
//! have them whole.

use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use shared::admin::{
    AuditView, DetailView, GroupView, MessageView, Page, ReplayResponse, Unavailable,
};

fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec());
    table
}

fn cut(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() <= max && line.len() == text.len() {
        line.to_owned()
    } else {
        let kept: String = line.chars().take(max.saturating_sub(1)).collect();
        format!("{kept}…")
    }
}

fn time(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S").to_string()
}

fn warn_unavailable(unavailable: &[Unavailable]) {
    for u in unavailable {
        eprintln!(
            "warning: {} {}; its dead letters are not in this list",
            u.service, u.error
        );
    }
}

fn footer(count: usize, what: (&str, &str), next: Option<&String>) {
    let what = if count == 1 { what.0 } else { what.1 };
    match next {
        Some(cursor) => println!("{count} {what} shown; more with --cursor {cursor}"),
        None => println!("{count} {what}"),
    }
}

pub fn groups(page: &Page<GroupView>) {
    warn_unavailable(&page.unavailable);
    if page.items.is_empty() {
        println!("no dead letters");
        return;
    }
    let mut t = table(&[
        "GROUP",
        "COUNT",
        "HANDLER",
        "KIND",
        "EVENTS",
        "FIRST SEEN",
        "LAST SEEN",
        "ERROR",
    ]);
    for g in &page.items {
        t.add_row(vec![
            g.key.clone(),
            g.count.to_string(),
            g.handler.clone(),
            g.error_kind.clone(),
            g.event_types.join(", "),
            time(&g.first_seen),
            time(&g.last_seen),
            cut(&g.error_message, 60),
        ]);
    }
    println!("{t}");
    footer(
        page.items.len(),
        ("group", "groups"),
        page.next_cursor.as_ref(),
    );
}

pub fn messages(page: &Page<MessageView>) {
    warn_unavailable(&page.unavailable);
    if page.items.is_empty() {
        println!("no dead letters");
        return;
    }
    let mut t = table(&[
        "ID",
        "EVENT",
        "STATUS",
        "ATTEMPTS",
        "REPLAYS",
        "LAST FAILED",
        "CORRELATION",
        "ERROR",
    ]);
    for m in &page.items {
        t.add_row(vec![
            m.id.clone(),
            m.event_type.clone().unwrap_or_else(|| "-".into()),
            m.status.clone(),
            m.attempts.to_string(),
            m.replay_count.to_string(),
            time(&m.last_failed_at),
            m.correlation_id.clone().unwrap_or_else(|| "-".into()),
            cut(&m.error_message, 50),
        ]);
    }
    println!("{t}");
    footer(
        page.items.len(),
        ("dead letter", "dead letters"),
        page.next_cursor.as_ref(),
    );
}

pub fn detail(d: &DetailView) {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled);
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let opt_time = |v: &Option<chrono::DateTime<chrono::Utc>>| v.as_ref().map_or("-".into(), time);
    let rows = [
        ("id", d.id.clone()),
        ("status", d.status.clone()),
        ("service", d.service.clone()),
        ("handler", d.handler.clone()),
        ("event type", opt(&d.event_type)),
        ("message id", d.message_id.clone()),
        ("correlation id", opt(&d.correlation_id)),
        ("group", d.group.clone()),
        ("error kind", d.error_kind.clone()),
        ("attempts", d.attempts.to_string()),
        ("first failed", time(&d.first_failed_at)),
        ("last failed", time(&d.last_failed_at)),
        (
            "dead-lettered",
            format!("{} time(s)", d.dead_lettered_count),
        ),
        ("replays", d.replay_count.to_string()),
        (
            "replayed",
            format!("{} by {}", opt_time(&d.replayed_at), opt(&d.replayed_by)),
        ),
        (
            "discarded",
            format!("{} by {}", opt_time(&d.discarded_at), opt(&d.discarded_by)),
        ),
        ("replay pending", d.replay_pending.to_string()),
        (
            "published to",
            format!("{} / {}", d.original_exchange, d.original_routing_key),
        ),
    ];
    for (name, value) in rows {
        t.add_row(vec![name.to_owned(), value]);
    }
    println!("{t}");
    println!("\nError:\n{}", d.error_chain);
    let mut headers = table(&["HEADER", "VALUE"]);
    if let Some(map) = d.headers.as_object() {
        for (name, value) in map {
            let value = match value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            headers.add_row(vec![name.clone(), cut(&value, 100)]);
        }
    }
    println!("\nHeaders:\n{headers}");
    println!("\nBody:\n{}", d.body);
}

pub fn replayed(answer: &ReplayResponse) {
    warn_unavailable(&answer.unavailable);
    println!("replayed {}", answer.replayed);
    for id in &answer.ids {
        println!("  {id}");
    }
    if !answer.skipped.is_empty() {
        println!("skipped {} (not open):", answer.skipped.len());
        for id in &answer.skipped {
            println!("  {id}");
        }
    }
}

pub fn audit(page: &Page<AuditView>) {
    warn_unavailable(&page.unavailable);
    if page.items.is_empty() {
        println!("no replays or discards yet");
        return;
    }
    let mut t = table(&[
        "AT",
        "OPERATOR",
        "ACTION",
        "SERVICE",
        "GROUP",
        "REQUESTED",
        "AFFECTED",
        "RESULT",
    ]);
    for a in &page.items {
        t.add_row(vec![
            time(&a.at),
            a.operator.clone(),
            a.action.clone(),
            a.service.clone(),
            a.group.clone().unwrap_or_else(|| "-".into()),
            a.requested.len().to_string(),
            a.affected.len().to_string(),
            a.result.clone(),
        ]);
    }
    println!("{t}");
    footer(
        page.items.len(),
        ("entry", "entries"),
        page.next_cursor.as_ref(),
    );
}
