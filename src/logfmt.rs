//! The text log's field formatter and clock: the same lines as
//! tracing-subscriber's defaults (`DefaultFields`, `SystemTime`), written
//! with fewer steps. The default paints every field name through
//! nu_ansi_term even with colours off and formats the whole date for every
//! line; at one access line a request, that was a third of what logging a
//! request cost. Colours (italic names, a dimmed `=`) only when the writer
//! has them; the message is escaped as the default escapes it (a log line
//! can carry text from the network, so no terminal control character gets
//! through).

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{FormatFields, Writer};
use tracing_subscriber::fmt::time::FormatTime;

/// Formats an event's or a span's fields as `name=value` pairs separated by
/// spaces, the message first as it is (escaped), strings quoted.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TextFields;

impl<'writer> FormatFields<'writer> for TextFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = TextVisitor {
            ansi: writer.has_ansi_escapes(),
            writer,
            empty: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct TextVisitor<'writer> {
    writer: Writer<'writer>,
    ansi: bool,
    empty: bool,
    result: fmt::Result,
}

impl TextVisitor<'_> {
    /// Writes the separator and `name=`; false when the field is skipped.
    fn name(&mut self, field: &Field) -> bool {
        if self.result.is_err() {
            return false;
        }
        let name = field.name();
        // A `log` record's metadata, already shown by the event formatter.
        if name.starts_with("log.") {
            return false;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        let separator = if std::mem::take(&mut self.empty) {
            ""
        } else {
            " "
        };
        self.result = if self.ansi {
            write!(
                self.writer,
                "{separator}\x1b[3m{name}\x1b[0m\x1b[2m=\x1b[0m"
            )
        } else {
            self.writer
                .write_str(separator)
                .and_then(|()| self.writer.write_str(name))
                .and_then(|()| self.writer.write_char('='))
        };
        self.result.is_ok()
    }

    /// The message: as it is, with terminal control characters escaped.
    fn message(&mut self, message: fmt::Arguments<'_>) {
        if self.result.is_err() {
            return;
        }
        if !std::mem::take(&mut self.empty) {
            self.result = self.writer.write_char(' ');
        }
        if self.result.is_ok() {
            self.result = fmt::write(
                &mut Escaping {
                    inner: &mut self.writer,
                },
                message,
            );
        }
    }
}

impl Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message(format_args!("{value}"));
        } else if self.name(field) {
            self.result = write!(self.writer, "{value:?}");
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.name(field) {
            self.result = write!(self.writer, "{value}");
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.name(field) {
            self.result = write!(self.writer, "{value}");
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.name(field) {
            self.result = self.writer.write_str(if value { "true" } else { "false" });
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        // As the default: the error, then its sources as a list.
        if !self.name(field) {
            return;
        }
        self.result = write!(
            Escaping {
                inner: &mut self.writer,
            },
            "{value}"
        );
        let mut source = value.source();
        if source.is_none() || self.result.is_err() {
            return;
        }
        let name = field.name();
        self.result = if self.ansi {
            write!(
                self.writer,
                " \x1b[3m{name}\x1b[0m\x1b[3m.sources\x1b[0m\x1b[2m=\x1b[0m["
            )
        } else {
            write!(self.writer, " {name}.sources=[")
        };
        let mut first = true;
        while let (Some(error), Ok(())) = (source, self.result) {
            if !std::mem::take(&mut first) {
                self.result = self.writer.write_str(", ");
            }
            if self.result.is_ok() {
                self.result = write!(
                    Escaping {
                        inner: &mut self.writer,
                    },
                    "{error}"
                );
            }
            source = error.source();
        }
        if self.result.is_ok() {
            self.result = self.writer.write_char(']');
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if field.name() == "message" {
            self.message(format_args!("{value:?}"));
        } else if self.name(field) {
            self.result = write!(self.writer, "{value:?}");
        }
    }
}

/// Writes through, with the control characters a terminal acts on escaped
/// (as tracing-subscriber escapes a message).
struct Escaping<'a, W: fmt::Write> {
    inner: &'a mut W,
}

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let mut rest = text;
        while let Some(at) = rest.find(|c: char| {
            matches!(
                c,
                '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
            )
        }) {
            self.inner.write_str(&rest[..at])?;
            let Some(control) = rest[at..].chars().next() else {
                break;
            };
            if control < '\u{80}' {
                write!(self.inner, "\\x{:02x}", u32::from(control))?;
            } else {
                write!(self.inner, "\\u{{{:x}}}", u32::from(control))?;
            }
            rest = &rest[at + control.len_utf8()..];
        }
        self.inner.write_str(rest)
    }
}

/// The clock of the text log: UTC, RFC 3339 to the microsecond with a `Z`,
/// like tracing-subscriber's `SystemTime`; the date and time to the second
/// are formatted once a second (per thread), then only the microseconds.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Clock;

thread_local! {
    /// The second last formatted, and its text up to the decimal point.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl FormatTime for Clock {
    fn format_time(&self, writer: &mut Writer<'_>) -> fmt::Result {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| fmt::Error)?;
        let seconds = since.as_secs();
        SECOND.with(|cell| {
            let mut cell = cell.borrow_mut();
            if cell.0 != seconds {
                let Ok(at) = time::OffsetDateTime::from_unix_timestamp(
                    i64::try_from(seconds).map_err(|_| fmt::Error)?,
                ) else {
                    return Err(fmt::Error);
                };
                let text = &mut cell.1;
                text.clear();
                write!(
                    text,
                    "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.",
                    at.year(),
                    u8::from(at.month()),
                    at.day(),
                    at.hour(),
                    at.minute(),
                    at.second()
                )?;
                cell.0 = seconds;
            }
            writer.write_str(&cell.1)?;
            write!(writer, "{:06}Z", since.subsec_micros())
        })
    }
}

/// A log writer into shared bytes, for tests that read what was logged.
#[cfg(test)]
pub(crate) struct Sink(pub(crate) std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut bytes) = self.0.lock() {
            bytes.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `emit` logs, formatted by tracing-subscriber's text layer with
    /// `fields` (no time), colours or not.
    fn formatted<N>(fields: N, ansi: bool, emit: fn()) -> String
    where
        N: for<'w> FormatFields<'w> + Send + Sync + 'static,
    {
        use tracing_subscriber::layer::SubscriberExt;
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        let layer = tracing_subscriber::fmt::layer()
            .fmt_fields(fields)
            .without_time()
            .with_ansi(ansi)
            .with_writer(move || Sink(sink.clone()));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = out.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer \x1b[2J")
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    fn every_kind() {
        let addr: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let lone = std::io::Error::other("lone");
        let chained = Outer(std::io::Error::other("inner \u{9b}31m"));
        tracing::event!(
            target: "portcullis::access",
            tracing::Level::INFO,
            client.addr = %addr,
            protocol = "http",
            method = "GET",
            dst.host = "example.com \x1b[31m\"quoted\"",
            dst.port = 443u32,
            status = 200u16,
            negative = -3i64,
            yes = true,
            float = 1.5f64,
            debugged = ?Some("x"),
            "allowed \x1b[31mred\x07 {}",
            "formatted"
        );
        tracing::warn!(error = &lone as &(dyn std::error::Error + 'static), "one");
        tracing::warn!(
            error = &chained as &(dyn std::error::Error + 'static),
            "chain"
        );
        tracing::error!(r#type = "raw", "named r#");
        tracing::info!(only = 1u64);
        let span = tracing::info_span!("outer", id = 7u64, name = "s");
        let _entered = span.enter();
        tracing::debug!("inside a span");
        tracing::info!(field = "x", "inside a span");
    }

    #[test]
    fn fields_are_written_as_the_default_writes_them() {
        for ansi in [false, true] {
            let theirs = formatted(
                tracing_subscriber::fmt::format::DefaultFields::new(),
                ansi,
                every_kind,
            );
            let ours = formatted(TextFields, ansi, every_kind);
            assert!(theirs.lines().count() >= 5, "{theirs}");
            assert_eq!(ours, theirs, "ansi {ansi}");
        }
    }

    #[test]
    fn control_characters_are_escaped() {
        let mut out = String::new();
        write!(Escaping { inner: &mut out }, "a\x1b[31mred\x07 é \u{9b}x").unwrap();
        assert_eq!(out, "a\\x1b[31mred\\x07 é \\u{9b}x");
    }

    #[test]
    fn the_clock_matches_the_default_format() {
        let theirs = || {
            let mut text = String::new();
            tracing_subscriber::fmt::time::SystemTime
                .format_time(&mut Writer::new(&mut text))
                .unwrap();
            text
        };
        let before = theirs();
        let mut ours = String::new();
        Clock.format_time(&mut Writer::new(&mut ours)).unwrap();
        let after = theirs();
        // Same shape (2026-12-07T23:56:05.123456Z), and the second of one
        // of the two readings taken around ours.
        assert_eq!(ours.len(), before.len(), "{ours} / {before}");
        assert_eq!(ours.as_bytes()[10], b'T');
        assert!(ours.ends_with('Z'));
        let second = |s: &str| s[..19].to_owned();
        assert!(
            second(&ours) == second(&before) || second(&ours) == second(&after),
            "{before} <= {ours} <= {after}"
        );
    }
}
