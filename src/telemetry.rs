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

use std::io::Write;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::time::Duration;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

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
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .try_init()
            .is_ok(),
        LogFormat::Pretty => builder.pretty().try_init().is_ok(),
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
}
