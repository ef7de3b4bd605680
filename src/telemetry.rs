//! Logs: one JSON object per line on stdout (or a readable format for people).
//!
//! What is never logged: API keys, full customer or payee ids (they appear masked, e.g.
//! `c_***23`), request bodies.
//!
//! # Writing
//! Lines are formatted on the thread that logs them and written by a thread of their own
//! ([`LogWriter`]): a request never waits on stdout, and the lines that pile up while one
//! write is in progress leave together in the next. Nothing is dropped: when the queue is
//! full, logging waits. [`LogGuard`] writes out what is queued when the program ends.

use std::fmt::{self, Write as _};
use std::io::Write;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::time::Duration;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter, format};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// Lines queued for the writer thread before logging waits for it.
const QUEUE_LINES: usize = 16 * 1024;
/// The writer's buffer: a batch of lines leaves in one write of at most this size.
const WRITE_BUFFER: usize = 64 * 1024;
/// After each write the writer thread lets lines gather this long before it looks again.
/// A thread waiting for the next line must be woken, a system call on the logging thread,
/// for every line; a sleeping one is not. Lines reach stdout at most this much later.
const GATHER: Duration = Duration::from_millis(2);

enum Message {
    Line(Vec<u8>),
    /// Write out everything queued before, then answer.
    Flush(std::sync::mpsc::Sender<()>),
}

/// The `MakeWriter` of the subscriber: hands each formatted line to the writer thread.
#[derive(Clone)]
pub struct LogWriter {
    queue: SyncSender<Message>,
}

impl LogWriter {
    /// Starts the writer thread over `out`.
    fn spawn(out: impl Write + Send + 'static) -> std::io::Result<Self> {
        let (queue, lines) = std::sync::mpsc::sync_channel(QUEUE_LINES);
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_lines(out, lines))?;
        Ok(LogWriter { queue })
    }

    fn flush_and_wait(&self, timeout: Duration) {
        let (done, wait) = std::sync::mpsc::channel();
        if self.queue.send(Message::Flush(done)).is_ok() {
            let _ = wait.recv_timeout(timeout);
        }
    }
}

fn write_lines(out: impl Write, lines: Receiver<Message>) {
    let mut out = std::io::BufWriter::with_capacity(WRITE_BUFFER, out);
    let mut waiting = Vec::new();
    while let Ok(first) = lines.recv() {
        let mut next = Ok(first);
        // Take every line already queued, then write them out in as few writes as possible.
        loop {
            match next {
                Ok(Message::Line(line)) => {
                    let _ = out.write_all(&line);
                }
                Ok(Message::Flush(done)) => waiting.push(done),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    let _ = out.flush();
                    return;
                }
            }
            next = lines.try_recv();
        }
        let _ = out.flush();
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
        std::thread::sleep(GATHER);
    }
    let _ = out.flush();
}

/// One event's line, sent to the writer thread when the formatter is done with it.
pub struct LineWriter {
    queue: SyncSender<Message>,
    line: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            // Fails only once the writer thread is gone, at exit: nothing left to write to.
            let _ = self.queue.send(Message::Line(line));
        }
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            queue: self.queue.clone(),
            line: Vec::new(),
        }
    }
}

/// Writes out the queued lines when dropped; keep it until the program ends.
pub struct LogGuard(Option<LogWriter>);

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some(writer) = &self.0 {
            writer.flush_and_wait(Duration::from_secs(2));
        }
    }
}

fn install<W>(format: LogFormat, writer: W) -> bool
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    // A second init (tests start many servers) keeps the first subscriber.
    match format {
        LogFormat::Json => builder.event_format(JsonLine).try_init().is_ok(),
        LogFormat::Pretty => builder.pretty().try_init().is_ok(),
    }
}

/// The JSON line of an event: `timestamp` (RFC 3339, UTC), `level`, the event's fields at the
/// top level, then `target`; spans are left out. The fields go straight into the line: the
/// stock JSON format first gathers them through serde and checks the bytes it wrote back
/// into text, which made the two lines of a decision cost the request thread more than the
/// HTTP exchange of a `/healthz`.
struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: format::Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // An event of the `log` crate (from a dependency) carries its own level and target.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        writer.write_str("{\"timestamp\":\"")?;
        SystemTime.format_time(&mut writer)?;
        write!(writer, "\",\"level\":\"{}\"", meta.level())?;
        let mut fields = JsonFields {
            out: &mut writer,
            skip_log_fields: normalized.is_some(),
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_str(",\"target\":")?;
        json_string(&mut writer, format_args!("{}", meta.target()))?;
        writer.write_str("}\n")
    }
}

/// Writes each field of an event as `,"name":value`.
struct JsonFields<'w, 'a> {
    out: &'w mut format::Writer<'a>,
    /// A `log` record's metadata, already written as the line's level and target.
    skip_log_fields: bool,
    result: fmt::Result,
}

impl JsonFields<'_, '_> {
    fn entry(&mut self, field: &Field, value: impl FnOnce(&mut format::Writer<'_>) -> fmt::Result) {
        let name = field.name();
        if self.result.is_err() || (self.skip_log_fields && name.starts_with("log.")) {
            return;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        self.result = write_entry(self.out, name, value);
    }
}

fn write_entry(
    out: &mut format::Writer<'_>,
    name: &str,
    value: impl FnOnce(&mut format::Writer<'_>) -> fmt::Result,
) -> fmt::Result {
    out.write_char(',')?;
    json_string(out, format_args!("{name}"))?;
    out.write_char(':')?;
    value(out)
}

impl Visit for JsonFields<'_, '_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.entry(field, |out| {
            if value.is_finite() {
                write!(out, "{value}")
            } else {
                out.write_str("null")
            }
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.entry(field, |out| write!(out, "{value}"));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.entry(field, |out| write!(out, "{value}"));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.entry(field, |out| write!(out, "{value}"));
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.entry(field, |out| write!(out, "{value}"));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.entry(field, |out| write!(out, "{value}"));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.entry(field, |out| json_string(out, format_args!("{value}")));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.entry(field, |out| json_string(out, format_args!("{value:?}")));
    }
}

/// Writes `text` as a JSON string, escaped as it is formatted.
fn json_string(out: &mut format::Writer<'_>, text: fmt::Arguments<'_>) -> fmt::Result {
    out.write_char('"')?;
    Escaping(out).write_fmt(text)?;
    out.write_char('"')
}

/// Escapes what JSON does not allow inside a string: `"`, `\` and control characters.
struct Escaping<'w, 'a>(&'w mut format::Writer<'a>);

impl fmt::Write for Escaping<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, byte) in s.bytes().enumerate() {
            let short = match byte {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0x08 => "\\b",
                0x0c => "\\f",
                0..0x20 => "",
                _ => continue,
            };
            // An escaped byte is ASCII, so `i` is on a character boundary.
            self.0.write_str(&s[plain..i])?;
            if short.is_empty() {
                write!(self.0, "\\u{byte:04x}")?;
            } else {
                self.0.write_str(short)?;
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
    }
}

/// Installs the global subscriber. `RUST_LOG` refines the level (default `info`).
pub fn init(format: LogFormat) -> LogGuard {
    match LogWriter::spawn(std::io::stdout()) {
        Ok(writer) => {
            let installed = install(format, writer.clone());
            LogGuard(installed.then_some(writer))
        }
        Err(e) => {
            // Without the thread, log straight to stdout rather than not at all.
            eprintln!("paynow: cannot start the log writer thread ({e}); logging synchronously");
            install(format, std::io::stdout);
            LogGuard(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut out) = self.0.lock() {
                out.extend_from_slice(buf);
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_is_written_in_order_before_the_flush_returns() {
        let out = Shared::default();
        let writer = LogWriter::spawn(out.clone()).unwrap();
        for i in 0..1000 {
            let mut line = writer.make_writer();
            writeln!(line, "line {i}").unwrap();
        }
        writer.flush_and_wait(Duration::from_secs(5));
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1000);
        assert_eq!(lines[0], "line 0");
        assert_eq!(lines[999], "line 999");
    }

    #[test]
    fn a_json_line_holds_every_field_as_json_whatever_its_text() {
        let out = Shared::default();
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .event_format(JsonLine)
            .finish();
        let awkward = "quote \" backslash \\ newline \n tab \t bell \u{7} é ✓";
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(
                event = "test.awkward",
                text = awkward,
                shown = %awkward,
                debugged = ?vec!["a\"b"],
                count = 7_u64,
                delta = -3_i64,
                big = u128::MAX,
                ratio = 0.25_f64,
                nan = f64::NAN,
                yes = true,
                r#type = "raw",
                "a message {}",
                "with \"arguments\""
            );
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.ends_with("}\n"));
        let line: serde_json::Value = serde_json::from_str(&text).unwrap();
        let keys = [
            "timestamp",
            "level",
            "message",
            "event",
            "text",
            "shown",
            "debugged",
            "count",
            "delta",
            "big",
            "ratio",
            "nan",
            "yes",
            "type",
            "target",
        ];
        assert_eq!(line.as_object().unwrap().len(), keys.len(), "{text}");
        let at: Vec<usize> = keys
            .iter()
            .map(|k| text.find(&format!("\"{k}\":")).unwrap())
            .collect();
        assert!(at.is_sorted(), "fields in the order logged: {text}");
        assert_eq!(line["level"], "WARN");
        assert_eq!(line["event"], "test.awkward");
        assert_eq!(line["text"], awkward);
        assert_eq!(line["shown"], awkward);
        assert_eq!(line["debugged"], r#"["a\"b"]"#);
        assert_eq!(line["count"], 7);
        assert_eq!(line["delta"], -3);
        assert_eq!(line["big"].to_string(), u128::MAX.to_string());
        assert_eq!(line["ratio"], 0.25);
        assert!(line["nan"].is_null());
        assert_eq!(line["yes"], true);
        assert_eq!(line["type"], "raw");
        assert_eq!(line["message"], r#"a message with "arguments""#);
        assert_eq!(line["target"], module_path!());
        let stamp = line["timestamp"].as_str().unwrap();
        assert!(
            stamp.len() == 27 && stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
            "{stamp}"
        );
    }
}
