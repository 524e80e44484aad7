//! Prefixed, optionally coloured, line-atomic output shared by all services.

use std::fmt::Display;
use std::io::{IsTerminal, Write};

/// Wide enough for the longest service name (`notification-svc`).
const WIDTH: usize = 16;

/// Distinct ANSI foreground colours, one per catalogue position.
const PALETTE: [&str; 8] = ["36", "32", "33", "34", "35", "91", "92", "94"];

/// Bold, so supervisor messages stand out from service output.
const SUPERVISOR_STYLE: &str = "1";

/// Writes whole lines to stdout; cheap to copy into every task.
#[derive(Debug, Clone, Copy)]
pub struct Printer {
    color: bool,
}

impl Printer {
    /// Colour only for a terminal, and never when `NO_COLOR` is set (https://no-color.org).
    pub fn detect() -> Self {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|value| !value.is_empty());
        Self {
            color: std::io::stdout().is_terminal() && !no_color,
        }
    }

    /// The prefix for lines from the service at `index` in the catalogue.
    pub fn service_prefix(&self, name: &str, index: usize) -> Prefix {
        self.prefix(name, PALETTE[index % PALETTE.len()])
    }

    /// Prints a supervisor message.
    pub fn info(&self, message: impl Display) {
        let prefix = self.prefix("commerce", SUPERVISOR_STYLE);
        self.line(&prefix, message.to_string().as_bytes());
    }

    /// Prints one line; a single locked write keeps concurrent lines from interleaving.
    pub fn line(&self, prefix: &Prefix, text: &[u8]) {
        let text = trim_line_end(text);
        let mut buf = Vec::with_capacity(prefix.0.len() + text.len() + 1);
        buf.extend_from_slice(prefix.0.as_bytes());
        buf.extend_from_slice(text);
        buf.push(b'\n');
        // Nowhere better to report a broken stdout; the supervisor keeps supervising.
        let _ = std::io::stdout().lock().write_all(&buf);
    }

    fn prefix(&self, name: &str, style: &str) -> Prefix {
        let padded = format!("{name:<WIDTH$} |");
        if self.color {
            Prefix(format!("\x1b[{style}m{padded}\x1b[0m "))
        } else {
            Prefix(format!("{padded} "))
        }
    }
}

/// "1 service", "3 services".
pub fn services(n: usize) -> String {
    if n == 1 {
        "1 service".to_owned()
    } else {
        format!("{n} services")
    }
}

/// A ready-made line prefix such as `order-svc        | `.
#[derive(Debug, Clone)]
pub struct Prefix(String);

fn trim_line_end(text: &[u8]) -> &[u8] {
    let text = text.strip_suffix(b"\n").unwrap_or(text);
    text.strip_suffix(b"\r").unwrap_or(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_prefix_is_padded() {
        let printer = Printer { color: false };
        assert_eq!(
            printer.service_prefix("order-svc", 3).0,
            "order-svc        | "
        );
        assert_eq!(
            printer.service_prefix("notification-svc", 6).0,
            "notification-svc | "
        );
    }

    #[test]
    fn coloured_prefix_resets_style() {
        let printer = Printer { color: true };
        assert_eq!(
            printer.service_prefix("gateway", 0).0,
            "\x1b[36mgateway          |\x1b[0m "
        );
    }

    #[test]
    fn counts_services() {
        assert_eq!(services(1), "1 service");
        assert_eq!(services(8), "8 services");
    }

    #[test]
    fn trims_line_endings() {
        assert_eq!(trim_line_end(b"a\r\n"), b"a");
        assert_eq!(trim_line_end(b"a\n"), b"a");
        assert_eq!(trim_line_end(b"a"), b"a");
    }
}
