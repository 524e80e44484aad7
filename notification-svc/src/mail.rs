//! Templates and transports: a mail is rendered from a template (built in, or read from
//! `smtp.templates_dir`), then sent by SMTP or written as an .eml file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use chrono::Utc;
use lettre::message::{Mailbox, header::ContentType};
use lettre::{AsyncSmtpTransport, AsyncTransport as _, Message, Tokio1Executor};
use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, UndefinedBehavior};
use secrecy::ExposeSecret as _;
use shared::config::SmtpSettings;
use uuid::Uuid;

/// The mails this service sends; each is `<name>.txt` with a `subject` and a `text` block.
pub const TEMPLATES: [&str; 5] = [
    "welcome",
    "order_receipt",
    "seller_order_notice",
    "order_cancelled",
    "review_created",
];

fn builtin(name: &str) -> Option<&'static str> {
    Some(match name {
        "welcome" => include_str!("../templates/welcome.txt"),
        "order_receipt" => include_str!("../templates/order_receipt.txt"),
        "seller_order_notice" => include_str!("../templates/seller_order_notice.txt"),
        "order_cancelled" => include_str!("../templates/order_cancelled.txt"),
        "review_created" => include_str!("../templates/review_created.txt"),
        _ => return None,
    })
}

/// A mail's words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rendered {
    /// One line.
    pub subject: String,
    pub text: String,
}

/// Where templates come from: built into the binary, or a directory an operator edits.
#[derive(Clone, Debug)]
pub struct Templates {
    dir: Option<PathBuf>,
}

impl Templates {
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    /// Renders `name` with `context`. A missing or broken template, or one that uses a
    /// variable the context lacks, is an error: fixing it needs a person.
    pub async fn render(
        &self,
        name: &str,
        context: &serde_json::Value,
    ) -> anyhow::Result<Rendered> {
        let file = format!("{name}.txt");
        let source = match &self.dir {
            // Read on every mail, so an edited template takes effect without a restart.
            Some(dir) => {
                let path = dir.join(&file);
                tokio::fs::read_to_string(&path)
                    .await
                    .with_context(|| format!("reading mail template {}", path.display()))?
            }
            None => builtin(name)
                .with_context(|| format!("no built-in mail template {name:?}"))?
                .to_owned(),
        };
        render(&file, &source, context).with_context(|| format!("rendering mail template {file}"))
    }
}

fn render(file: &str, source: &str, context: &serde_json::Value) -> anyhow::Result<Rendered> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_syntax(
        SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()?,
    );
    env.add_template(file, source)?;
    let template = env.get_template(file)?;
    let mut captured =
        template.render_captured(minijinja::Value::from(minijinja::value::Serde(context)))?;
    let subject = captured.with_state_mut(|state| state.render_block("subject"))?;
    let text = captured.with_state_mut(|state| state.render_block("text"))?;
    // A header is one line; whitespace a template wraps it in is not part of it.
    let subject = subject.split_whitespace().collect::<Vec<_>>().join(" ");
    anyhow::ensure!(!subject.is_empty(), "the subject block renders empty");
    let text = format!("{}\n", text.trim_matches('\n'));
    Ok(Rendered { subject, text })
}

/// One mail ready to go.
pub struct Outgoing<'a> {
    pub to: Mailbox,
    pub rendered: &'a Rendered,
    /// Stable per (event, recipient, template), so a receiver can spot the duplicate left
    /// by a crash between the send and its record.
    pub message_id: String,
}

/// What the transport said about a mail it took.
#[derive(Clone, Debug)]
pub struct Receipt {
    /// `smtp` or `file`.
    pub transport: &'static str,
    /// The SMTP server's reply, or the file written.
    pub detail: String,
}

/// How mail leaves: SMTP (`smtp.url` set) or .eml files under `smtp.dir`.
#[derive(Clone)]
pub enum Mailer {
    Smtp {
        transport: AsyncSmtpTransport<Tokio1Executor>,
        from: Mailbox,
    },
    Files {
        dir: PathBuf,
        from: Mailbox,
    },
}

/// Longest wait for one SMTP exchange; well under the consumer's handler timeout.
const SMTP_TIMEOUT: Duration = Duration::from_secs(10);

impl Mailer {
    pub fn from_settings(settings: &SmtpSettings) -> anyhow::Result<Self> {
        let from: Mailbox = settings.from.parse().with_context(|| {
            format!("COMMERCE__SMTP__FROM {:?} is not an address", settings.from)
        })?;
        Ok(match &settings.url {
            Some(url) => {
                // Pooled: connections are reused across mails and handlers.
                let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url.expose_secret())
                    .context("COMMERCE__SMTP__URL is not a usable smtp:// or smtps:// URL")?
                    .timeout(Some(SMTP_TIMEOUT))
                    .build();
                Self::Smtp { transport, from }
            }
            None => Self::Files {
                dir: settings.dir.clone(),
                from,
            },
        })
    }

    pub fn from_address(&self) -> &Mailbox {
        match self {
            Self::Smtp { from, .. } | Self::Files { from, .. } => from,
        }
    }

    /// The message as it goes on the wire.
    pub fn message(&self, mail: &Outgoing<'_>) -> anyhow::Result<Message> {
        Message::builder()
            .from(self.from_address().clone())
            .to(mail.to.clone())
            .subject(mail.rendered.subject.clone())
            .message_id(Some(mail.message_id.clone()))
            .header(ContentType::TEXT_PLAIN)
            .body(mail.rendered.text.clone())
            .context("building the message")
    }

    /// Hands the message over. Any refusal or connection trouble is an error the caller
    /// retries later.
    pub async fn send(&self, message: Message) -> anyhow::Result<Receipt> {
        match self {
            Self::Smtp { transport, .. } => {
                let response = transport
                    .send(message)
                    .await
                    .context("the SMTP server did not take the mail")?;
                let mut detail = response.code().to_string();
                for line in response.message() {
                    detail.push(' ');
                    detail.push_str(line);
                }
                Ok(Receipt {
                    transport: "smtp",
                    detail,
                })
            }
            Self::Files { dir, .. } => {
                let path = write_eml(dir, &message.formatted()).await?;
                Ok(Receipt {
                    transport: "file",
                    detail: path.display().to_string(),
                })
            }
        }
    }
}

/// Writes under a generated name, through a temporary file, so a reader never sees half a
/// mail.
async fn write_eml(dir: &Path, bytes: &[u8]) -> anyhow::Result<PathBuf> {
    tokio::fs::create_dir_all(dir)
        .await
        .with_context(|| format!("creating the mail directory {}", dir.display()))?;
    let name = format!(
        "{}-{}.eml",
        Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
        Uuid::new_v4().simple()
    );
    let path = dir.join(&name);
    let partial = dir.join(format!(".{name}.partial"));
    tokio::fs::write(&partial, bytes)
        .await
        .with_context(|| format!("writing {}", partial.display()))?;
    tokio::fs::rename(&partial, &path)
        .await
        .with_context(|| format!("renaming {} to {}", partial.display(), path.display()))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn line() -> serde_json::Value {
        json!({"product_id": Uuid::nil(), "product_name": "Teapot", "quantity": 2,
               "unit_price": "12.50", "unit_price_cents": 1250, "line_total": "25.00",
               "line_total_cents": 2500})
    }

    fn contexts() -> Vec<(&'static str, serde_json::Value)> {
        let person = json!({"name": "Ada", "email": "ada@example.com"});
        let order = json!({"id": Uuid::nil(), "total": "25.00", "total_cents": 2500,
                           "currency": "EUR"});
        vec![
            (
                "welcome",
                json!({"name": "Ada", "email": "ada@example.com", "roles": ["seller"]}),
            ),
            (
                "order_receipt",
                json!({"customer": person, "order": order, "lines": [line()]}),
            ),
            (
                "seller_order_notice",
                json!({"seller": person, "order": order, "lines": [line()],
                       "subtotal": "25.00", "subtotal_cents": 2500}),
            ),
            (
                "order_cancelled",
                json!({"customer": person, "order": order, "lines": [line()],
                       "reason": "customer_cancelled", "reason_text": "you cancelled it"}),
            ),
            (
                "review_created",
                json!({"seller": person, "product": {"id": Uuid::nil(), "name": "Teapot"},
                       "review": {"id": Uuid::nil(), "rating": 4, "stars": "★★★★☆",
                                  "body": "Pours well."}}),
            ),
        ]
    }

    #[tokio::test]
    async fn every_built_in_template_renders_a_subject_and_a_text() {
        let templates = Templates::new(None);
        for (name, context) in contexts() {
            let rendered = templates
                .render(name, &context)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e:#}"));
            assert!(!rendered.subject.contains('\n'), "{name}: {rendered:?}");
            assert!(
                rendered.text.starts_with("Hello Ada,"),
                "{name}: {rendered:?}"
            );
            assert!(!rendered.text.contains("{{"), "{name}: {rendered:?}");
        }
        assert_eq!(TEMPLATES.len(), contexts().len());
    }

    #[tokio::test]
    async fn receipt_lists_lines_with_amounts() {
        let context = &contexts()[1].1;
        let rendered = Templates::new(None)
            .render("order_receipt", context)
            .await
            .expect("renders");
        assert_eq!(
            rendered.subject,
            format!("Your receipt for order {}", Uuid::nil())
        );
        assert!(
            rendered
                .text
                .contains("2 x Teapot at 12.50 EUR = 25.00 EUR"),
            "{}",
            rendered.text
        );
        assert!(rendered.text.contains("Total paid: 25.00 EUR"));
    }

    #[tokio::test]
    async fn a_missing_variable_or_broken_syntax_is_an_error() {
        let missing = render(
            "t.txt",
            "{% block subject %}Hi {{ nobody }}{% endblock %}{% block text %}x{% endblock %}",
            &json!({}),
        );
        assert!(missing.is_err());
        let broken = render(
            "t.txt",
            "{% block subject %}Hi {{ name",
            &json!({"name": "a"}),
        );
        assert!(broken.is_err());
        let no_text = render("t.txt", "{% block subject %}Hi{% endblock %}", &json!({}));
        assert!(no_text.is_err());
    }

    #[tokio::test]
    async fn a_template_directory_replaces_the_built_in_ones() {
        let dir = std::env::temp_dir().join(format!("notification-templates-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(
            dir.join("welcome.txt"),
            "{% block subject %}Hey {{ name }}{% endblock %}{% block text %}Custom{% endblock %}",
        )
        .expect("write");
        let templates = Templates::new(Some(dir.clone()));
        let rendered = templates
            .render("welcome", &contexts()[0].1)
            .await
            .expect("renders");
        assert_eq!(rendered.subject, "Hey Ada");
        assert_eq!(rendered.text, "Custom\n");
        let missing = templates
            .render("order_receipt", &contexts()[1].1)
            .await
            .expect_err("not in the directory");
        assert!(
            format!("{missing:#}").contains("order_receipt.txt"),
            "{missing:#}"
        );
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
