//! A local SMTP server for tests: receives real SMTP and keeps each message.
//!
//! It speaks enough of RFC 5321 for lettre (greeting, EHLO/HELO, MAIL, RCPT, DATA with
//! dot-unstuffing, RSET, NOOP, QUIT), without TLS or authentication, and can be told
//! to refuse the next messages so that a sender's retries are exercised.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::DEADLINE;

/// One message as the server accepted it.
#[derive(Clone, Debug)]
pub struct ReceivedMail {
    /// The envelope sender (`MAIL FROM`), without angle brackets.
    pub from: String,
    /// The envelope recipients (`RCPT TO`), without angle brackets.
    pub to: Vec<String>,
    /// The message as sent after `DATA`, dot-unstuffed, CRLF line ends.
    pub data: Vec<u8>,
}

impl ReceivedMail {
    fn parsed(&self) -> mail_parser::Message<'_> {
        mail_parser::MessageParser::default()
            .parse(&self.data)
            .expect("the server received a parseable message")
    }

    /// The decoded `Subject` header ("" when there is none).
    pub fn subject(&self) -> String {
        self.parsed().subject().unwrap_or_default().to_owned()
    }

    /// The decoded first text/plain body part ("" when there is none).
    pub fn text(&self) -> String {
        self.parsed()
            .body_text(0)
            .map(|t| t.into_owned())
            .unwrap_or_default()
    }

    /// A header's decoded value as text, e.g. `Message-ID` or `To`.
    pub fn header(&self, name: &str) -> Option<String> {
        let message = self.parsed();
        let value = message.header(name)?;
        Some(match value {
            mail_parser::HeaderValue::Text(t) => t.to_string(),
            mail_parser::HeaderValue::TextList(list) => list.join(", "),
            mail_parser::HeaderValue::Address(address) => address
                .iter()
                .filter_map(|a| a.address())
                .collect::<Vec<_>>()
                .join(", "),
            other => format!("{other:?}"),
        })
    }

    /// Whether `address` is one of the envelope recipients (case-insensitive).
    pub fn is_to(&self, address: &str) -> bool {
        self.to.iter().any(|t| t.eq_ignore_ascii_case(address))
    }
}

/// Failures to inject, consumed one per message (or recipient).
#[derive(Default)]
struct Faults {
    /// Refuse the next n messages at the end of DATA with this reply code.
    data: Option<(usize, u16)>,
    /// Refuse the next n `RCPT TO` of this address (lowercase) with this reply code.
    recipients: HashMap<String, (usize, u16)>,
}

#[derive(Default)]
struct State {
    messages: Vec<ReceivedMail>,
    faults: Faults,
    /// Messages refused on purpose so far.
    refused: usize,
}

/// A running SMTP server on 127.0.0.1; stops when dropped.
pub struct SmtpServer {
    port: u16,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl SmtpServer {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the test SMTP server");
        let port = listener.local_addr().expect("address").port();
        let state = Arc::new(Mutex::new(State::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            // Dropped (and with it every session) when the server is.
            let mut sessions = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                sessions.spawn(async move {
                    let _ = session(stream, state).await;
                });
                while sessions.try_join_next().is_some() {}
            }
        });
        Self { port, state, task }
    }

    /// `smtp://127.0.0.1:PORT`: plain SMTP for lettre (no `tls` parameter, no STARTTLS).
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every message accepted so far, in order of acceptance.
    pub fn messages(&self) -> Vec<ReceivedMail> {
        self.state().messages.clone()
    }

    /// The messages accepted so far for `address`.
    pub fn messages_to(&self, address: &str) -> Vec<ReceivedMail> {
        self.state()
            .messages
            .iter()
            .filter(|m| m.is_to(address))
            .cloned()
            .collect()
    }

    /// How many messages were refused on purpose (by [`Self::fail_next`] or
    /// [`Self::fail_recipient`]) so far.
    pub fn refused(&self) -> usize {
        self.state().refused
    }

    /// Waits until at least `count` messages were accepted; fails the test after
    /// [`DEADLINE`].
    pub async fn wait_for(&self, count: usize) -> Vec<ReceivedMail> {
        self.wait_until(&format!("{count} messages"), |m| m.len() >= count)
            .await
    }

    /// Waits until at least `count` messages for `address` were accepted.
    pub async fn wait_for_to(&self, address: &str, count: usize) -> Vec<ReceivedMail> {
        self.wait_until(&format!("{count} messages to {address}"), |m| {
            m.iter().filter(|m| m.is_to(address)).count() >= count
        })
        .await
        .into_iter()
        .filter(|m| m.is_to(address))
        .collect()
    }

    /// Waits until `done` holds for the messages accepted so far; returns them.
    pub async fn wait_until(
        &self,
        what: &str,
        done: impl Fn(&[ReceivedMail]) -> bool,
    ) -> Vec<ReceivedMail> {
        let started = Instant::now();
        loop {
            let messages = self.messages();
            if done(&messages) {
                return messages;
            }
            assert!(
                started.elapsed() < DEADLINE,
                "timed out after {DEADLINE:?} waiting for {what}; received {}: {:?}",
                messages.len(),
                messages
                    .iter()
                    .map(|m| (m.to.clone(), m.subject()))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Answers the next `n` messages with `code` (e.g. 451, 554) at the end of DATA
    /// instead of accepting them.
    pub fn fail_next(&self, n: usize, code: u16) {
        self.state().faults.data = (n > 0).then_some((n, code));
    }

    /// Answers the next `n` `RCPT TO:<address>` with `code` (e.g. 450).
    pub fn fail_recipient(&self, address: &str, n: usize, code: u16) {
        self.state()
            .faults
            .recipients
            .insert(address.to_ascii_lowercase(), (n, code));
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Takes one use of a fault, if one is armed.
fn take(fault: &mut Option<(usize, u16)>) -> Option<u16> {
    let (left, code) = fault.as_mut()?;
    let code = *code;
    *left -= 1;
    if *left == 0 {
        *fault = None;
    }
    Some(code)
}

fn reply_text(code: u16) -> &'static str {
    if code >= 500 {
        "5.0.0 refused by the test server"
    } else {
        "4.3.0 temporarily refused by the test server"
    }
}

/// The address between angle brackets after `MAIL FROM:` / `RCPT TO:`, ignoring
/// parameters such as `BODY=8BITMIME`.
fn address(argument: &str) -> Option<String> {
    let start = argument.find('<')?;
    let end = argument[start..].find('>')? + start;
    Some(argument[start + 1..end].to_owned())
}

async fn session(stream: TcpStream, state: Arc<Mutex<State>>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let lock = || state.lock().unwrap_or_else(|e| e.into_inner());
    write.write_all(b"220 testkit ESMTP ready\r\n").await?;
    let mut from: Option<String> = None;
    let mut to: Vec<String> = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        let (verb, argument) = text.split_once(' ').unwrap_or((text, ""));
        let reply: String = match verb.to_ascii_uppercase().as_str() {
            "EHLO" => {
                from = None;
                to.clear();
                "250-testkit greets you\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 10485760".into()
            }
            "HELO" => {
                from = None;
                to.clear();
                "250 testkit".into()
            }
            "MAIL" => match address(argument) {
                Some(sender) => {
                    from = Some(sender);
                    to.clear();
                    "250 2.1.0 OK".into()
                }
                None => "501 5.5.4 syntax: MAIL FROM:<address>".into(),
            },
            "RCPT" => match (address(argument), &from) {
                (_, None) => "503 5.5.1 MAIL first".into(),
                (None, _) => "501 5.5.4 syntax: RCPT TO:<address>".into(),
                (Some(recipient), Some(_)) => {
                    let mut state = lock();
                    let key = recipient.to_ascii_lowercase();
                    let mut fault = state.faults.recipients.get(&key).copied();
                    match take(&mut fault) {
                        Some(code) => {
                            match fault {
                                Some(left) => state.faults.recipients.insert(key, left),
                                None => state.faults.recipients.remove(&key),
                            };
                            state.refused += 1;
                            format!("{code} {}", reply_text(code))
                        }
                        None => {
                            to.push(recipient);
                            "250 2.1.5 OK".into()
                        }
                    }
                }
            },
            "DATA" => {
                if from.is_none() || to.is_empty() {
                    "503 5.5.1 MAIL and RCPT first".into()
                } else {
                    write
                        .write_all(b"354 end data with <CR><LF>.<CR><LF>\r\n")
                        .await?;
                    let data = read_data(&mut reader).await?;
                    let mut state = lock();
                    let reply = match take(&mut state.faults.data) {
                        Some(code) => {
                            state.refused += 1;
                            format!("{code} {}", reply_text(code))
                        }
                        None => {
                            state.messages.push(ReceivedMail {
                                from: from.clone().unwrap_or_default(),
                                to: to.clone(),
                                data,
                            });
                            "250 2.0.0 OK queued".into()
                        }
                    };
                    from = None;
                    to.clear();
                    reply
                }
            }
            "RSET" => {
                from = None;
                to.clear();
                "250 2.0.0 OK".into()
            }
            "NOOP" => "250 2.0.0 OK".into(),
            "VRFY" => "252 2.1.5 cannot verify".into(),
            "QUIT" => {
                write.write_all(b"221 2.0.0 bye\r\n").await?;
                return Ok(());
            }
            _ => "502 5.5.2 command not implemented".into(),
        };
        write.write_all(reply.as_bytes()).await?;
        write.write_all(b"\r\n").await?;
    }
}

/// Reads the DATA section up to the lone dot, undoing dot-stuffing.
async fn read_data(
    reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == b".\r\n" || line == b".\n" {
            return Ok(data);
        }
        let unstuffed = if line.starts_with(b".") {
            &line[1..]
        } else {
            &line[..]
        };
        data.extend_from_slice(unstuffed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn command(
        reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
        write: &mut tokio::net::tcp::OwnedWriteHalf,
        line: &str,
    ) -> String {
        write.write_all(line.as_bytes()).await.expect("write");
        let mut reply = String::new();
        loop {
            let mut next = String::new();
            reader.read_line(&mut next).await.expect("read");
            reply.push_str(&next);
            // The last line of a reply has a space after the code.
            if next.as_bytes().get(3) != Some(&b'-') {
                return reply;
            }
        }
    }

    #[tokio::test]
    async fn accepts_a_message_and_undoes_dot_stuffing() {
        let server = SmtpServer::start().await;
        let stream = TcpStream::connect(("127.0.0.1", server.port()))
            .await
            .expect("connect");
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut greeting = String::new();
        reader.read_line(&mut greeting).await.expect("greeting");
        assert!(greeting.starts_with("220"), "{greeting}");
        let ehlo = command(&mut reader, &mut write, "EHLO me\r\n").await;
        assert!(ehlo.contains("250 SIZE"), "{ehlo}");
        let mail = "MAIL FROM:<a@example.com> BODY=8BITMIME\r\n";
        assert!(
            command(&mut reader, &mut write, mail)
                .await
                .starts_with("250")
        );
        let rcpt = "RCPT TO:<B@example.com>\r\n";
        assert!(
            command(&mut reader, &mut write, rcpt)
                .await
                .starts_with("250")
        );
        let data = command(&mut reader, &mut write, "DATA\r\n").await;
        assert!(data.starts_with("354"), "{data}");
        let body = "Subject: Hi\r\n\r\nline one\r\n..dotted\r\n.\r\n";
        assert!(
            command(&mut reader, &mut write, body)
                .await
                .starts_with("250")
        );
        assert!(
            command(&mut reader, &mut write, "QUIT\r\n")
                .await
                .starts_with("221")
        );

        let messages = server.wait_for(1).await;
        assert_eq!(messages[0].from, "a@example.com");
        assert!(messages[0].is_to("b@example.com"));
        assert_eq!(messages[0].subject(), "Hi");
        let text = messages[0].text();
        assert!(text.contains("line one"), "{text:?}");
        assert!(
            text.contains("\n.dotted") && !text.contains(".."),
            "{text:?}"
        );
    }

    #[tokio::test]
    async fn refuses_the_next_messages_when_told_to() {
        let server = SmtpServer::start().await;
        server.fail_next(1, 451);
        server.fail_recipient("no@example.com", 1, 450);
        let stream = TcpStream::connect(("127.0.0.1", server.port()))
            .await
            .expect("connect");
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut greeting = String::new();
        reader.read_line(&mut greeting).await.expect("greeting");
        command(&mut reader, &mut write, "HELO me\r\n").await;
        command(&mut reader, &mut write, "MAIL FROM:<a@example.com>\r\n").await;
        let refused = command(&mut reader, &mut write, "RCPT TO:<no@example.com>\r\n").await;
        assert!(refused.starts_with("450"), "{refused}");
        command(&mut reader, &mut write, "RCPT TO:<b@example.com>\r\n").await;
        command(&mut reader, &mut write, "DATA\r\n").await;
        let first = command(&mut reader, &mut write, "Subject: 1\r\n\r\nx\r\n.\r\n").await;
        assert!(first.starts_with("451"), "{first}");
        command(&mut reader, &mut write, "MAIL FROM:<a@example.com>\r\n").await;
        command(&mut reader, &mut write, "RCPT TO:<no@example.com>\r\n").await;
        command(&mut reader, &mut write, "DATA\r\n").await;
        let second = command(&mut reader, &mut write, "Subject: 2\r\n\r\nx\r\n.\r\n").await;
        assert!(second.starts_with("250"), "{second}");
        assert_eq!(server.refused(), 2);
        let messages = server.messages();
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].subject(), "2");
        assert!(messages[0].is_to("no@example.com"));
    }
}
