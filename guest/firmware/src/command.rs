//! The shell's input side: line editing and command parsing, free of I/O.
//!
//! Compiled into the host crate's tests as well. The reply formats are in `protocol.rs`.

/// Longest command line the shell keeps; further characters are dropped (and not echoed).
pub const MAX_LINE: usize = 128;

const BACKSPACE: u8 = 0x08;
const DELETE: u8 = 0x7f;

/// What the terminal should see after a received byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edit {
    /// Nothing (ignored byte).
    None,
    /// Echo this character.
    Echo(u8),
    /// Erase the last character on screen.
    Erase,
    /// The line is complete: move to a new line and run [`LineEditor::line`].
    Submit,
}

/// The line being typed.
#[derive(Debug)]
pub struct LineEditor {
    bytes: [u8; MAX_LINE],
    len: usize,
    /// The last byte ended a line with `\r`: a `\n` right after it belongs to the same line end.
    after_cr: bool,
    /// The previous byte submitted a line: the next byte starts a fresh one.
    submitted: bool,
}

impl Default for LineEditor {
    fn default() -> Self {
        Self {
            bytes: [0; MAX_LINE],
            len: 0,
            after_cr: false,
            submitted: false,
        }
    }
}

impl LineEditor {
    /// Takes one received byte. A line ends at `\r`, `\n` or `\r\n`; backspace and DEL erase;
    /// other control bytes and non-ASCII bytes are ignored.
    pub fn feed(&mut self, byte: u8) -> Edit {
        if self.submitted {
            self.len = 0;
            self.submitted = false;
        }
        let after_cr = core::mem::replace(&mut self.after_cr, byte == b'\r');
        match byte {
            b'\n' if after_cr => Edit::None,
            b'\r' | b'\n' => {
                self.submitted = true;
                Edit::Submit
            }
            BACKSPACE | DELETE if self.len > 0 => {
                self.len -= 1;
                Edit::Erase
            }
            b' '..=b'~' if self.len < MAX_LINE => {
                self.bytes[self.len] = byte;
                self.len += 1;
                Edit::Echo(byte)
            }
            _ => Edit::None,
        }
    }

    /// The line typed so far (the submitted line right after [`Edit::Submit`]).
    pub fn line(&self) -> &str {
        // Only printable ASCII is ever stored.
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or_default()
    }
}

/// A parsed shell command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// An empty line: no reply.
    Empty,
    /// `echo <text>`.
    Echo(&'a str),
    /// `status`.
    Status,
    /// `write <n> [per-request]`: append `n` records to the disk, `per-request` records to a
    /// request (default: as many as one request carries).
    Write {
        /// Records to append.
        count: u64,
        /// Records per request, when given.
        per_request: Option<u64>,
    },
    /// `dirty <n>`: touch `n` pages.
    Dirty(u64),
    /// `writeloop`: keep appending records, one batch per main-loop pass, until `stop`.
    WriteLoop,
    /// `stop`: end `writeloop`.
    Stop,
    /// `halt`.
    Halt,
    /// `reboot`.
    Reboot,
    /// `help`.
    Help,
    /// `udp <ip> <port> <count> [size]`: send `count` numbered datagrams of `size` bytes
    /// (default 64).
    Udp {
        /// Destination address.
        ip: [u8; 4],
        /// Destination port.
        port: u16,
        /// Datagrams to send.
        count: u64,
        /// Payload bytes of each.
        size: usize,
    },
    /// `ping <ip> <count>`: ICMP echo requests, one at a time.
    Ping {
        /// Destination address.
        ip: [u8; 4],
        /// Requests to send.
        count: u16,
    },
    /// A network command with arguments it cannot use (the arguments as typed).
    BadArguments(&'a str),
    /// A command that needs a number got something else (the argument as typed).
    BadNumber(&'a str),
    /// A command word the shell does not know.
    Unknown(&'a str),
}

impl<'a> Command<'a> {
    /// Parses one line: the first word is the command, the rest (leading blanks dropped) its argument.
    pub fn parse(line: &'a str) -> Self {
        let line = line.trim();
        let (word, argument) = match line.split_once(' ') {
            Some((word, rest)) => (word, rest.trim_start()),
            None => (line, ""),
        };
        let number = |make: fn(u64) -> Self| match argument.parse::<u64>() {
            Ok(n) if !argument.starts_with('+') => make(n),
            _ => Self::BadNumber(argument),
        };
        match word {
            "" => Self::Empty,
            "echo" => Self::Echo(argument),
            "status" => Self::Status,
            "write" => parse_write(argument).unwrap_or(Self::BadNumber(argument)),
            "dirty" => number(Self::Dirty),
            "writeloop" => Self::WriteLoop,
            "stop" => Self::Stop,
            "halt" => Self::Halt,
            "reboot" => Self::Reboot,
            "help" => Self::Help,
            "udp" => parse_udp(argument).unwrap_or(Self::BadArguments(argument)),
            "ping" => parse_ping(argument).unwrap_or(Self::BadArguments(argument)),
            _ => Self::Unknown(word),
        }
    }
}

/// Default payload bytes of `udp`.
pub const DEFAULT_UDP_SIZE: usize = 64;

fn parse_udp(argument: &str) -> Option<Command<'_>> {
    let mut words = argument.split_ascii_whitespace();
    let ip = parse_ipv4(words.next()?)?;
    let port = parse_decimal(words.next()?)?;
    let count = parse_decimal(words.next()?)?;
    let size = match words.next() {
        Some(word) => parse_decimal(word)?,
        None => DEFAULT_UDP_SIZE,
    };
    words.next().is_none().then_some(Command::Udp {
        ip,
        port,
        count,
        size,
    })
}

fn parse_ping(argument: &str) -> Option<Command<'_>> {
    let mut words = argument.split_ascii_whitespace();
    let ip = parse_ipv4(words.next()?)?;
    let count = parse_decimal(words.next()?)?;
    words
        .next()
        .is_none()
        .then_some(Command::Ping { ip, count })
}

fn parse_write(argument: &str) -> Option<Command<'_>> {
    let mut words = argument.split_ascii_whitespace();
    let count = parse_decimal(words.next()?)?;
    let per_request = match words.next() {
        None => None,
        Some(word) => Some(parse_decimal::<u64>(word).filter(|&n| n > 0)?),
    };
    words
        .next()
        .is_none()
        .then_some(Command::Write { count, per_request })
}

fn parse_decimal<T: core::str::FromStr>(word: &str) -> Option<T> {
    if word.starts_with('+') {
        return None;
    }
    word.parse().ok()
}

/// Parses a dotted-quad IPv4 address (`10.0.0.2`).
pub fn parse_ipv4(text: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = text.split('.');
    for byte in &mut out {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *byte = part.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn type_into(editor: &mut LineEditor, input: &[u8]) -> Vec<Edit> {
        input.iter().map(|&byte| editor.feed(byte)).collect()
    }

    #[test]
    fn typed_characters_are_echoed_and_submitted_on_cr() {
        let mut editor = LineEditor::default();

        let edits = type_into(&mut editor, b"ok\r");

        assert_eq!(edits, [Edit::Echo(b'o'), Edit::Echo(b'k'), Edit::Submit]);
        assert_eq!(editor.line(), "ok");
    }

    #[test]
    fn crlf_submits_once() {
        let mut editor = LineEditor::default();

        let submits = type_into(&mut editor, b"a\r\nb\n")
            .into_iter()
            .filter(|e| *e == Edit::Submit)
            .count();

        assert_eq!(submits, 2);
        assert_eq!(editor.line(), "b");
    }

    #[test]
    fn backspace_erases_last_character() {
        let mut editor = LineEditor::default();

        let edits = type_into(&mut editor, b"ab\x08\x7f\x08c");

        assert_eq!(
            &edits[2..],
            [Edit::Erase, Edit::Erase, Edit::None, Edit::Echo(b'c')]
        );
        assert_eq!(editor.line(), "c");
    }

    #[test]
    fn overlong_line_drops_extra_characters() {
        let mut editor = LineEditor::default();
        type_into(&mut editor, &[b'x'; MAX_LINE]);

        let edit = editor.feed(b'y');

        assert_eq!(edit, Edit::None);
        assert_eq!(editor.line().len(), MAX_LINE);
    }

    #[test]
    fn control_and_non_ascii_bytes_are_ignored() {
        let mut editor = LineEditor::default();

        let edits = type_into(&mut editor, b"\x1b\xc3\x00");

        assert_eq!(edits, [Edit::None; 3]);
    }

    #[test]
    fn echo_keeps_inner_spacing() {
        assert_eq!(
            Command::parse("  echo  hello   world "),
            Command::Echo("hello   world")
        );
    }

    #[test]
    fn write_takes_a_decimal_count() {
        assert_eq!(
            Command::parse("write 42"),
            Command::Write {
                count: 42,
                per_request: None
            }
        );
    }

    #[test]
    fn write_takes_records_per_request() {
        assert_eq!(
            Command::parse("write 3000 1"),
            Command::Write {
                count: 3000,
                per_request: Some(1)
            }
        );
    }

    #[test]
    fn dirty_without_number_is_bad_number() {
        assert_eq!(Command::parse("dirty"), Command::BadNumber(""));
    }

    #[test]
    fn write_with_trailing_words_is_bad_number() {
        assert_eq!(Command::parse("write 3 4 5"), Command::BadNumber("3 4 5"));
        assert_eq!(Command::parse("write 3 x"), Command::BadNumber("3 x"));
        assert_eq!(Command::parse("write 3 0"), Command::BadNumber("3 0"));
    }

    #[test]
    fn signed_count_is_bad_number() {
        assert_eq!(Command::parse("write +3"), Command::BadNumber("+3"));
    }

    #[test]
    fn unknown_word_is_reported() {
        assert_eq!(Command::parse("format c:"), Command::Unknown("format"));
    }

    #[test]
    fn udp_takes_address_port_count_and_optional_size() {
        assert_eq!(
            Command::parse("udp 10.0.0.1 5000 100"),
            Command::Udp {
                ip: [10, 0, 0, 1],
                port: 5000,
                count: 100,
                size: DEFAULT_UDP_SIZE
            }
        );
        assert_eq!(
            Command::parse("udp 10.0.0.1 5000 100 1000"),
            Command::Udp {
                ip: [10, 0, 0, 1],
                port: 5000,
                count: 100,
                size: 1000
            }
        );
    }

    #[test]
    fn ping_with_bad_address_is_bad_arguments() {
        assert_eq!(
            Command::parse("ping 10.0.0.256 3"),
            Command::BadArguments("10.0.0.256 3")
        );
        assert_eq!(
            Command::parse("ping 10.0.0.2 3"),
            Command::Ping {
                ip: [10, 0, 0, 2],
                count: 3
            }
        );
    }

    proptest::proptest! {
        #[test]
        fn network_commands_never_panic(text in "\\PC*") {
            let _ = Command::parse(&text);
            let _ = parse_ipv4(&text);
        }
    }

    #[test]
    fn writeloop_and_stop_are_commands() {
        assert_eq!(Command::parse(" writeloop "), Command::WriteLoop);
        assert_eq!(Command::parse("stop"), Command::Stop);
    }

    #[test]
    fn blank_line_is_empty() {
        assert_eq!(Command::parse("   "), Command::Empty);
    }
}
