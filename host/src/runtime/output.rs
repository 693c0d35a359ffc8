//! The guest's stdout and stderr, forwarded line by line to the host log.
//!
//! Each complete line becomes one log event as soon as it is written, inside the attempt's
//! span, so it carries the task id, queue and attempt. An attempt may write at most
//! [`OUTPUT_LIMIT_BYTES`] per stream; the rest is accepted and thrown away (a guest's
//! `println!` must not fail, or a chatty plugin would crash), and one line at the end of the
//! attempt says how much was dropped.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// How many bytes of each stream an attempt may write to the host log.
pub const OUTPUT_LIMIT_BYTES: usize = 64 * 1024;

/// The longest line written to the log; longer lines are split.
const MAX_LINE_BYTES: usize = 4096;

/// One of the guest's output streams. Clones share the same buffer and counters.
#[derive(Clone)]
pub struct GuestOutput {
    name: &'static str,
    state: Arc<Mutex<OutputState>>,
}

#[derive(Default)]
struct OutputState {
    /// The line being written, not yet ended by a newline.
    partial: Vec<u8>,
    /// Bytes kept so far, against the limit.
    kept: usize,
    /// Bytes thrown away past the limit.
    dropped: usize,
    /// The last complete lines, up to [`TAIL_BYTES`], for an error message (a panic's).
    tail: std::collections::VecDeque<String>,
    tail_bytes: usize,
}

/// How much of the end of a stream is kept for error messages.
const TAIL_BYTES: usize = 2048;

impl OutputState {
    fn keep_in_tail(&mut self, line: String) {
        self.tail_bytes += line.len();
        self.tail.push_back(line);
        while self.tail_bytes > TAIL_BYTES && self.tail.len() > 1 {
            let dropped = self.tail.pop_front().expect("not empty");
            self.tail_bytes -= dropped.len();
        }
    }
}

impl GuestOutput {
    /// A stream named `name` ("stdout" or "stderr") in the log.
    pub fn new(name: &'static str) -> Self {
        GuestOutput {
            name,
            state: Arc::default(),
        }
    }

    /// Takes `bytes` from the guest: logs the lines they complete, and counts what is over
    /// the limit.
    fn accept(&self, bytes: &[u8]) {
        let mut state = self.state.lock().expect("poisoned");
        let room = OUTPUT_LIMIT_BYTES.saturating_sub(state.kept);
        let (kept, dropped) = bytes.split_at(bytes.len().min(room));
        state.kept += kept.len();
        state.dropped += dropped.len();

        for &byte in kept {
            if byte == b'\n' {
                self.end_line(&mut state);
            } else {
                state.partial.push(byte);
                if state.partial.len() >= MAX_LINE_BYTES {
                    self.end_line(&mut state);
                }
            }
        }
    }

    /// Logs what is left at the end of the attempt: an unfinished line, and how much output
    /// went over the limit.
    pub fn finish(&self) {
        let mut state = self.state.lock().expect("poisoned");
        if !state.partial.is_empty() {
            self.end_line(&mut state);
        }
        if state.dropped > 0 {
            tracing::warn!(
                target: "rebound::guest",
                stream = self.name,
                dropped_bytes = state.dropped,
                limit_bytes = OUTPUT_LIMIT_BYTES,
                "guest output over the limit was dropped"
            );
            state.dropped = 0;
        }
    }

    /// The last lines written, oldest first (at most about 2 KiB).
    pub fn tail(&self) -> Vec<String> {
        let state = self.state.lock().expect("poisoned");
        state.tail.iter().cloned().collect()
    }

    /// Logs the line being written and keeps it in the tail; blank lines are skipped.
    fn end_line(&self, state: &mut OutputState) {
        let line = String::from_utf8_lossy(&state.partial).into_owned();
        state.partial.clear();
        if line.trim().is_empty() {
            return;
        }
        tracing::info!(target: "rebound::guest", stream = self.name, "{line}");
        state.keep_in_tail(line);
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.accept(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Always ready: what is over the limit is dropped, not refused.
        Ok(MAX_LINE_BYTES)
    }
}

#[async_trait::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.accept(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_past_the_limit_is_counted_not_kept() {
        let out = GuestOutput::new("stdout");
        out.accept(b"first line\nsecond ");
        out.accept(b"line\n");
        out.accept(&vec![b'x'; OUTPUT_LIMIT_BYTES]);
        let state = out.state.lock().unwrap();
        assert_eq!(state.kept, OUTPUT_LIMIT_BYTES);
        assert_eq!(state.dropped, "first line\nsecond line\n".len());
        // The kept part of the long run was logged in lines of at most MAX_LINE_BYTES.
        assert!(state.partial.len() < MAX_LINE_BYTES);
    }

    #[test]
    fn the_tail_holds_the_last_lines() {
        let out = GuestOutput::new("stderr");
        for n in 0..1000 {
            out.accept(format!("line {n}\n").as_bytes());
        }
        out.accept(b"unfinished");
        out.finish();
        let tail = out.tail();
        assert_eq!(tail.last().map(String::as_str), Some("unfinished"));
        assert_eq!(tail[tail.len() - 2], "line 999");
        assert!(tail.iter().map(String::len).sum::<usize>() <= TAIL_BYTES);
        assert!(tail.len() > 100, "{}", tail.len());
    }
}
