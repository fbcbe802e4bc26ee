//! Request lines off a connection, bounded in size ([`MAX_REQUEST_BYTES`]) and in time (the
//! idle and request timeouts).

use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::{CHUNK, MAX_REQUEST_BYTES, Timeouts};

/// What [`LineReader::next_line`] got.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Received {
    /// A whole request line, newline removed.
    Line(Vec<u8>),
    /// The client closed (or the connection was closed to make room).
    Closed,
    /// A line longer than [`MAX_REQUEST_BYTES`].
    TooLong,
    /// Idle too long, or too slow to finish a line.
    TimedOut,
}

/// Splits a connection's bytes into lines, holding at most one line's worth plus one chunk.
#[derive(Debug)]
pub(super) struct LineReader {
    buffer: Vec<u8>,
    /// How much of `buffer` is known to hold no newline.
    scanned: usize,
    timeouts: Timeouts,
    idle_since: Instant,
    line_since: Option<Instant>,
}

impl LineReader {
    pub(super) fn new(timeouts: Timeouts) -> Self {
        LineReader {
            buffer: Vec::new(),
            scanned: 0,
            timeouts,
            idle_since: Instant::now(),
            line_since: None,
        }
    }

    /// The answer went out: the clocks start again (the time we took answering is not the
    /// client's), and a large request's memory goes back.
    pub(super) fn answered(&mut self) {
        let now = Instant::now();
        self.idle_since = now;
        if self.line_since.is_some() {
            self.line_since = Some(now);
        }
        self.buffer.shrink_to(CHUNK);
    }

    pub(super) fn next_line(&mut self, mut source: impl ReadWithTimeout) -> Received {
        loop {
            if let Some(at) = self.buffer[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + at;
                if end > MAX_REQUEST_BYTES {
                    return Received::TooLong;
                }
                let mut line: Vec<u8> = self.buffer.drain(..=end).collect();
                line.pop();
                self.scanned = 0;
                // Pipelined bytes already begun the next line.
                self.line_since = (!self.buffer.is_empty()).then(Instant::now);
                return Received::Line(line);
            }
            self.scanned = self.buffer.len();
            if self.buffer.len() > MAX_REQUEST_BYTES {
                return Received::TooLong;
            }
            let deadline = match self.line_since {
                Some(started) => started + self.timeouts.request,
                None => self.idle_since + self.timeouts.idle,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Received::TimedOut;
            }
            let mut chunk = [0u8; CHUNK];
            match source.read_within(&mut chunk, left) {
                Ok(0) => return Received::Closed,
                Ok(n) => {
                    self.line_since.get_or_insert_with(Instant::now);
                    self.buffer.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Received::TimedOut;
                }
                Err(_) => return Received::Closed,
            }
        }
    }
}

/// A byte source whose reads give up after a while (a socket; a script of reads in tests).
pub(super) trait ReadWithTimeout {
    fn read_within(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize>;
}

impl ReadWithTimeout for &UnixStream {
    fn read_within(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        self.set_read_timeout(Some(timeout))?;
        self.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::io::Write;
    use std::thread;

    /// Reads from a script: each entry is one read's result.
    struct Script(VecDeque<io::Result<Vec<u8>>>);

    impl ReadWithTimeout for &mut Script {
        fn read_within(&mut self, buf: &mut [u8], _: Duration) -> io::Result<usize> {
            match self.0.pop_front() {
                Some(Ok(bytes)) => {
                    buf[..bytes.len()].copy_from_slice(&bytes);
                    Ok(bytes.len())
                }
                Some(Err(e)) => Err(e),
                None => Ok(0),
            }
        }
    }

    const TIMEOUTS: Timeouts = Timeouts {
        idle: Duration::from_secs(60),
        request: Duration::from_secs(10),
    };

    fn script(reads: Vec<io::Result<Vec<u8>>>) -> Script {
        Script(reads.into())
    }

    #[test]
    fn pipelined_lines_come_out_one_at_a_time() {
        let mut source = script(vec![Ok(b"a\nb".to_vec()), Ok(b"c\n".to_vec())]);
        let mut reader = LineReader::new(TIMEOUTS);

        let first = reader.next_line(&mut source);
        let second = reader.next_line(&mut source);
        let end = reader.next_line(&mut source);

        assert_eq!(first, Received::Line(b"a".to_vec()));
        assert_eq!(second, Received::Line(b"bc".to_vec()));
        assert_eq!(end, Received::Closed);
    }

    #[test]
    fn line_without_newline_past_the_cap_is_too_long_and_buffer_stays_bounded() {
        let reads = (0..100).map(|_| Ok(vec![b'x'; CHUNK])).collect();
        let mut source = script(reads);
        let mut reader = LineReader::new(TIMEOUTS);

        let result = reader.next_line(&mut source);

        assert_eq!(result, Received::TooLong);
        assert!(reader.buffer.len() <= MAX_REQUEST_BYTES + CHUNK);
        assert!(source.0.len() >= 100 - (MAX_REQUEST_BYTES / CHUNK) - 2);
    }

    #[test]
    fn line_of_exactly_the_cap_is_accepted() {
        let mut bytes = vec![b'x'; MAX_REQUEST_BYTES];
        bytes.push(b'\n');
        let reads = bytes.chunks(CHUNK).map(|c| Ok(c.to_vec())).collect();
        let mut source = script(reads);
        let mut reader = LineReader::new(TIMEOUTS);

        let result = reader.next_line(&mut source);

        assert_eq!(result, Received::Line(vec![b'x'; MAX_REQUEST_BYTES]));
    }

    #[test]
    fn read_timeout_ends_the_connection() {
        let mut source = script(vec![
            Ok(b"{\"op\":".to_vec()),
            Err(io::ErrorKind::WouldBlock.into()),
        ]);
        let mut reader = LineReader::new(TIMEOUTS);

        assert_eq!(reader.next_line(&mut source), Received::TimedOut);
    }

    #[test]
    fn slow_client_is_cut_when_its_line_takes_longer_than_the_request_timeout() {
        let (client, server) = UnixStream::pair().expect("pair");
        let timeouts = Timeouts {
            idle: Duration::from_secs(60),
            request: Duration::from_millis(300),
        };
        let mut reader = LineReader::new(timeouts);
        let started = Instant::now();
        let trickle = thread::spawn(move || {
            for _ in 0..20 {
                if (&client).write_all(b"x").is_err() {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
        });

        let result = reader.next_line(&server);
        drop(server);
        let _ = trickle.join();

        assert_eq!(result, Received::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    proptest::proptest! {
        /// However a client's bytes are cut into reads, the reader returns exactly the lines
        /// they hold, in order, then the end; it never panics.
        #[test]
        fn any_split_of_the_bytes_yields_the_same_lines(
            chunks in proptest::collection::vec(
                proptest::collection::vec(
                    proptest::prop_oneof![proptest::strategy::Just(b'\n'), proptest::num::u8::ANY],
                    1..64,
                ),
                0..64,
            )
        ) {
            let bytes: Vec<u8> = chunks.concat();
            let mut expected: Vec<Vec<u8>> =
                bytes.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
            // What follows the last newline is an unfinished line: never returned.
            expected.pop();
            let mut source = script(chunks.into_iter().map(Ok).collect());
            let mut reader = LineReader::new(TIMEOUTS);

            let mut lines = Vec::new();
            let end = loop {
                match reader.next_line(&mut source) {
                    Received::Line(line) => lines.push(line),
                    other => break other,
                }
            };

            proptest::prop_assert_eq!(lines, expected);
            proptest::prop_assert_eq!(end, Received::Closed);
        }
    }
}
