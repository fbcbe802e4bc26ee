//! The guest's integration agent on COM2: the qemu-guest-agent JSON protocol subset the host's
//! backup and shutdown integration speaks (Hyper-V's backup and shutdown integration services).
//!
//! Free of I/O, so the host crate compiles it for its tests: bytes go in through
//! [`Agent::receive`], replies come out through a `fmt::Write`, and what a command does to the
//! machine goes through [`AgentHost`]. No allocation: a command is at most [`MAX_COMMAND`] bytes,
//! longer ones are discarded and answered with an error.
//!
//! Framing, as qemu-ga's: the input is a stream of JSON objects. A `0xFF` byte discards whatever
//! was partly received (the host's resynchronisation); bytes outside an object that are not
//! blanks are answered with one `GenericError` (at the next newline or object). Every reply is one
//! line; `guest-sync-delimited`'s starts with a `0xFF` sentinel; `guest-shutdown` has none.

use core::fmt::{self, Write};

/// Longest command (one JSON object) the agent accepts.
pub const MAX_COMMAND: usize = 512;
/// Deepest nesting of JSON arrays and objects inside a command.
const MAX_DEPTH: u32 = 16;
/// The byte that resynchronises the stream (never valid in UTF-8 JSON).
pub const SYNC_BYTE: u8 = 0xff;
/// The agent's version, as `guest-info` reports it.
pub const AGENT_VERSION: &str = "vmms-test-guest 0.1.0";

/// The commands the agent knows, with whether each answers on success (`success-response`).
pub const COMMANDS: [(&str, bool); 8] = [
    ("guest-sync-delimited", true),
    ("guest-sync", true),
    ("guest-ping", true),
    ("guest-info", true),
    ("guest-fsfreeze-freeze", true),
    ("guest-fsfreeze-thaw", true),
    ("guest-fsfreeze-status", true),
    ("guest-shutdown", false),
];

/// What the commands do to the machine.
pub trait AgentHost {
    /// Finishes in-flight disk writes and stops issuing new ones; the number of file systems
    /// (record logs) frozen.
    fn freeze(&mut self) -> u32;
    /// Lets writes go on again; the number thawed.
    fn thaw(&mut self) -> u32;
    /// Powers off (`reboot`: resets) once the caller returns.
    fn shutdown(&mut self, reboot: bool);
}

/// Where replies go: text, plus the raw `0xFF` sentinel `guest-sync-delimited` starts with.
pub trait ReplySink: Write {
    /// Writes the single byte [`SYNC_BYTE`].
    fn write_sentinel(&mut self);
}

/// What a received byte completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framed {
    /// Nothing yet.
    Pending,
    /// A whole object is in the buffer.
    Command,
    /// An object too long for the buffer ended.
    Overflow,
    /// Bytes outside any object that are not JSON.
    Garbage,
}

/// Splits the byte stream into JSON objects.
#[derive(Debug)]
struct Framer {
    bytes: [u8; MAX_COMMAND],
    len: usize,
    /// Nesting depth inside the current object (0: between objects).
    depth: u32,
    in_string: bool,
    escaped: bool,
    overflow: bool,
    /// Non-blank bytes were seen between objects.
    garbage: bool,
}

impl Default for Framer {
    fn default() -> Self {
        Self {
            bytes: [0; MAX_COMMAND],
            len: 0,
            depth: 0,
            in_string: false,
            escaped: false,
            overflow: false,
            garbage: false,
        }
    }
}

impl Framer {
    fn reset(&mut self) {
        self.len = 0;
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
        self.overflow = false;
        self.garbage = false;
    }

    fn feed(&mut self, byte: u8) -> Framed {
        if byte == SYNC_BYTE {
            self.reset();
            return Framed::Pending;
        }
        if self.depth == 0 {
            return match byte {
                b'{' => {
                    self.len = 0;
                    self.overflow = false;
                    self.push(byte);
                    self.depth = 1;
                    if core::mem::replace(&mut self.garbage, false) {
                        Framed::Garbage
                    } else {
                        Framed::Pending
                    }
                }
                b'\n' if self.garbage => {
                    self.garbage = false;
                    Framed::Garbage
                }
                b' ' | b'\t' | b'\r' | b'\n' => Framed::Pending,
                _ => {
                    self.garbage = true;
                    Framed::Pending
                }
            };
        }
        self.push(byte);
        if self.in_string {
            match (self.escaped, byte) {
                (true, _) => self.escaped = false,
                (false, b'\\') => self.escaped = true,
                (false, b'"') => self.in_string = false,
                _ => {}
            }
            return Framed::Pending;
        }
        match byte {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.depth = self.depth.saturating_add(1),
            b'}' | b']' => self.depth -= 1,
            _ => {}
        }
        match (self.depth, self.overflow) {
            (0, false) => Framed::Command,
            (0, true) => Framed::Overflow,
            _ => Framed::Pending,
        }
    }

    fn push(&mut self, byte: u8) {
        match self.bytes.get_mut(self.len) {
            Some(slot) => {
                *slot = byte;
                self.len += 1;
            }
            None => self.overflow = true,
        }
    }

    fn command(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// A parsed command: what to execute and the arguments the subset uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    /// `execute`, as raw JSON string contents (escapes left as they are).
    pub execute: &'a str,
    /// `arguments.id` (guest-sync, guest-sync-delimited).
    pub id: Option<i64>,
    /// `arguments.mode` (guest-shutdown), raw string contents.
    pub mode: Option<&'a str>,
}

/// Why a command is not one the agent can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Not well-formed JSON.
    Syntax,
    /// JSON, but not an object with a string `execute`.
    NoExecute,
    /// `arguments` is not an object, or a member the command needs has the wrong type.
    BadArguments,
}

impl ParseError {
    fn describe(self) -> &'static str {
        match self {
            Self::Syntax => "JSON parse error",
            Self::NoExecute => "Expecting 'execute' with a command name",
            Self::BadArguments => "Invalid parameter type in 'arguments'",
        }
    }
}

/// A JSON value's shape, as far as the parser keeps it.
enum Value<'a> {
    Str(&'a str),
    Int(Option<i64>),
    Object(usize),
    Other,
}

/// A cursor over one command's bytes.
struct Parser<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn blanks(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.at += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Result<(), ParseError> {
        self.blanks();
        if self.peek() == Some(byte) {
            self.at += 1;
            Ok(())
        } else {
            Err(ParseError::Syntax)
        }
    }

    fn string(&mut self) -> Result<&'a str, ParseError> {
        self.expect(b'"')?;
        let start = self.at;
        loop {
            match self.peek().ok_or(ParseError::Syntax)? {
                b'"' => break,
                b'\\' => {
                    self.at += 1;
                    match self.peek().ok_or(ParseError::Syntax)? {
                        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.at += 1,
                        b'u' => {
                            let hex = self.bytes.get(self.at + 1..self.at + 5);
                            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                                return Err(ParseError::Syntax);
                            }
                            self.at += 5;
                        }
                        _ => return Err(ParseError::Syntax),
                    }
                }
                0..=0x1f => return Err(ParseError::Syntax),
                _ => self.at += 1,
            }
        }
        let raw = &self.bytes[start..self.at];
        self.at += 1;
        core::str::from_utf8(raw).map_err(|_| ParseError::Syntax)
    }

    fn number(&mut self) -> Result<Value<'a>, ParseError> {
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        let digits = self.at;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
        if self.at == digits {
            return Err(ParseError::Syntax);
        }
        let mut integer = true;
        if self.peek() == Some(b'.') {
            integer = false;
            self.at += 1;
            self.digits()?;
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            integer = false;
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            self.digits()?;
        }
        if !integer {
            return Ok(Value::Other);
        }
        let text = core::str::from_utf8(&self.bytes[start..self.at]).unwrap_or_default();
        Ok(Value::Int(text.parse().ok()))
    }

    fn digits(&mut self) -> Result<(), ParseError> {
        let start = self.at;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
        if self.at == start {
            Err(ParseError::Syntax)
        } else {
            Ok(())
        }
    }

    fn literal(&mut self, word: &[u8]) -> Result<Value<'a>, ParseError> {
        if self.bytes.get(self.at..self.at + word.len()) == Some(word) {
            self.at += word.len();
            Ok(Value::Other)
        } else {
            Err(ParseError::Syntax)
        }
    }

    /// One value; objects and arrays are checked through and reported by where they start.
    fn value(&mut self, depth: u32) -> Result<Value<'a>, ParseError> {
        if depth > MAX_DEPTH {
            return Err(ParseError::Syntax);
        }
        self.blanks();
        match self.peek().ok_or(ParseError::Syntax)? {
            b'"' => self.string().map(Value::Str),
            b'{' => {
                let start = self.at;
                self.members(depth, |_, _| Ok(()))?;
                Ok(Value::Object(start))
            }
            b'[' => {
                self.at += 1;
                self.blanks();
                if self.peek() == Some(b']') {
                    self.at += 1;
                    return Ok(Value::Other);
                }
                loop {
                    self.value(depth + 1)?;
                    self.blanks();
                    match self.peek() {
                        Some(b',') => self.at += 1,
                        Some(b']') => {
                            self.at += 1;
                            return Ok(Value::Other);
                        }
                        _ => return Err(ParseError::Syntax),
                    }
                }
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => Err(ParseError::Syntax),
        }
    }

    /// Walks an object, handing each member's key and value to `member`.
    fn members(
        &mut self,
        depth: u32,
        mut member: impl FnMut(&'a str, Value<'a>) -> Result<(), ParseError>,
    ) -> Result<(), ParseError> {
        self.expect(b'{')?;
        self.blanks();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(());
        }
        loop {
            let key = self.string()?;
            self.expect(b':')?;
            let value = self.value(depth + 1)?;
            member(key, value)?;
            self.blanks();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return Ok(());
                }
                _ => return Err(ParseError::Syntax),
            }
        }
    }
}

/// Parses one command object.
pub fn parse(bytes: &[u8]) -> Result<Request<'_>, ParseError> {
    let mut parser = Parser { bytes, at: 0 };
    let mut execute = None;
    let mut arguments = None;
    parser.blanks();
    if parser.peek() != Some(b'{') {
        // Well-formed JSON that is no object is still no command.
        parser.value(0)?;
        return Err(ParseError::NoExecute);
    }
    parser.members(0, |key, value| {
        match (key, value) {
            ("execute", Value::Str(name)) => execute = Some(name),
            ("execute", _) => execute = None,
            ("arguments", Value::Object(start)) => arguments = Some(Ok(start)),
            ("arguments", _) => arguments = Some(Err(ParseError::BadArguments)),
            _ => {}
        }
        Ok(())
    })?;
    parser.blanks();
    if parser.peek().is_some() {
        return Err(ParseError::Syntax);
    }
    let execute = execute.ok_or(ParseError::NoExecute)?;
    let mut request = Request {
        execute,
        id: None,
        mode: None,
    };
    if let Some(start) = arguments.transpose()? {
        let mut inner = Parser { bytes, at: start };
        inner.members(1, |key, value| {
            match (key, value) {
                ("id", Value::Int(Some(id))) => request.id = Some(id),
                ("id", _) => return Err(ParseError::BadArguments),
                ("mode", Value::Str(mode)) => request.mode = Some(mode),
                ("mode", _) => return Err(ParseError::BadArguments),
                _ => {}
            }
            Ok(())
        })?;
    }
    Ok(request)
}

/// The agent: input framing and the freeze state.
#[derive(Debug, Default)]
pub struct Agent {
    framer: Framer,
    frozen: bool,
    /// Never answer `guest-fsfreeze-freeze` (nor freeze): a guest whose freeze hangs, as a
    /// stuck VSS writer or file system does (`agent=hang-freeze`, for tests).
    hang_freeze: bool,
}

impl Agent {
    /// An agent that answers everything but `guest-fsfreeze-freeze`, which it swallows.
    pub fn hanging_on_freeze() -> Self {
        Agent {
            hang_freeze: true,
            ..Agent::default()
        }
    }

    /// Whether a freeze is in effect.
    pub fn frozen(&self) -> bool {
        self.frozen
    }

    /// Takes one byte from COM2; once it completes a command, runs it and writes the reply to
    /// `out`.
    pub fn receive(&mut self, byte: u8, host: &mut impl AgentHost, out: &mut impl ReplySink) {
        match self.framer.feed(byte) {
            Framed::Pending => {}
            Framed::Garbage => error(out, "GenericError", ParseError::Syntax.describe()),
            Framed::Overflow => error(out, "GenericError", "command too long"),
            Framed::Command => {
                let bytes = self.framer.command();
                let mut copy = [0u8; MAX_COMMAND];
                copy[..bytes.len()].copy_from_slice(bytes);
                match parse(&copy[..bytes.len()]) {
                    Ok(request) => self.execute(&request, host, out),
                    Err(e) => error(out, "GenericError", e.describe()),
                }
            }
        }
    }

    fn execute(
        &mut self,
        request: &Request<'_>,
        host: &mut impl AgentHost,
        out: &mut impl ReplySink,
    ) {
        // Formatting into the UART cannot fail; `out` is the serial port.
        let _ = match request.execute {
            "guest-sync-delimited" | "guest-sync" => match request.id {
                Some(id) => {
                    if request.execute == "guest-sync-delimited" {
                        out.write_sentinel();
                    }
                    writeln!(out, "{{\"return\":{id}}}")
                }
                None => {
                    error(out, "GenericError", "Parameter 'id' is missing");
                    Ok(())
                }
            },
            "guest-ping" => writeln!(out, "{{\"return\":{{}}}}"),
            "guest-info" => info(out),
            "guest-fsfreeze-status" => writeln!(
                out,
                "{{\"return\":\"{}\"}}",
                if self.frozen { "frozen" } else { "thawed" }
            ),
            "guest-fsfreeze-freeze" if self.hang_freeze => Ok(()),
            "guest-fsfreeze-freeze" if self.frozen => {
                error(out, "GenericError", "file systems are already frozen");
                Ok(())
            }
            "guest-fsfreeze-freeze" => {
                let count = host.freeze();
                self.frozen = true;
                writeln!(out, "{{\"return\":{count}}}")
            }
            "guest-fsfreeze-thaw" => {
                let count = if self.frozen { host.thaw() } else { 0 };
                self.frozen = false;
                writeln!(out, "{{\"return\":{count}}}")
            }
            "guest-shutdown" if self.frozen => {
                error(
                    out,
                    "GenericError",
                    "Command guest-shutdown has been disabled: the agent is in frozen state",
                );
                Ok(())
            }
            "guest-shutdown" => match request.mode {
                None | Some("powerdown" | "halt") => {
                    host.shutdown(false);
                    Ok(())
                }
                Some("reboot") => {
                    host.shutdown(true);
                    Ok(())
                }
                Some(_) => {
                    error(out, "GenericError", "Invalid parameter 'mode'");
                    Ok(())
                }
            },
            name => writeln!(
                out,
                "{{\"error\":{{\"class\":\"CommandNotFound\",\"desc\":\"The command {name} has not been found\"}}}}"
            ),
        };
    }
}

/// Writes `{"error":{"class":…,"desc":…}}`; `desc` is plain text without quotes.
fn error(out: &mut impl Write, class: &str, desc: &str) {
    let _ = writeln!(
        out,
        "{{\"error\":{{\"class\":\"{class}\",\"desc\":\"{desc}\"}}}}"
    );
}

/// The `guest-info` answer.
fn info(out: &mut impl Write) -> fmt::Result {
    write!(
        out,
        "{{\"return\":{{\"version\":\"{AGENT_VERSION}\",\"supported_commands\":["
    )?;
    for (index, (name, response)) in COMMANDS.iter().enumerate() {
        if index > 0 {
            out.write_char(',')?;
        }
        write!(
            out,
            "{{\"enabled\":true,\"name\":\"{name}\",\"success-response\":{response}}}"
        )?;
    }
    writeln!(out, "]}}}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Host {
        freezes: u32,
        thaws: u32,
        shutdown: Option<bool>,
    }

    impl AgentHost for Host {
        fn freeze(&mut self) -> u32 {
            self.freezes += 1;
            1
        }
        fn thaw(&mut self) -> u32 {
            self.thaws += 1;
            1
        }
        fn shutdown(&mut self, reboot: bool) {
            self.shutdown = Some(reboot);
        }
    }

    #[derive(Default)]
    struct Out(Vec<u8>);

    impl Write for Out {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            self.0.extend_from_slice(s.as_bytes());
            Ok(())
        }
    }

    impl ReplySink for Out {
        fn write_sentinel(&mut self) {
            self.0.push(SYNC_BYTE);
        }
    }

    fn run(agent: &mut Agent, host: &mut Host, input: &[u8]) -> String {
        let mut out = Out::default();
        for &byte in input {
            agent.receive(byte, host, &mut out);
        }
        String::from_utf8_lossy(&out.0).into_owned()
    }

    #[test]
    fn sync_delimited_answers_sentinel_then_id() {
        let mut agent = Agent::default();

        let mut out = Out::default();
        for &byte in br#"{"execute":"guest-sync-delimited","arguments":{"id":-42}}"# {
            agent.receive(byte, &mut Host::default(), &mut out);
        }

        assert_eq!(out.0, b"\xff{\"return\":-42}\n");
    }

    #[test]
    fn resync_byte_discards_a_partial_command() {
        let mut agent = Agent::default();
        let mut host = Host::default();

        let out = run(
            &mut agent,
            &mut host,
            b"{\"execute\":\"guest-fsfreeze-fr\xff{\"execute\":\"guest-ping\"}\n",
        );

        assert_eq!(out, "{\"return\":{}}\n");
        assert_eq!(host.freezes, 0);
    }

    #[test]
    fn freeze_thaw_and_status_follow_each_other() {
        let mut agent = Agent::default();
        let mut host = Host::default();

        let out = run(
            &mut agent,
            &mut host,
            br#"{"execute":"guest-fsfreeze-freeze"}{"execute":"guest-fsfreeze-status"}{"execute":"guest-fsfreeze-freeze"}{"execute":"guest-fsfreeze-thaw"}{"execute":"guest-fsfreeze-status"}{"execute":"guest-fsfreeze-thaw"}"#,
        );

        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], r#"{"return":1}"#);
        assert_eq!(lines[1], r#"{"return":"frozen"}"#);
        assert!(lines[2].contains("GenericError"), "{}", lines[2]);
        assert_eq!(lines[3], r#"{"return":1}"#);
        assert_eq!(lines[4], r#"{"return":"thawed"}"#);
        assert_eq!(lines[5], r#"{"return":0}"#);
        assert_eq!((host.freezes, host.thaws), (1, 1));
    }

    #[test]
    fn an_agent_hanging_on_freeze_swallows_it_and_answers_the_rest() {
        let mut agent = Agent::hanging_on_freeze();
        let mut host = Host::default();

        let out = run(
            &mut agent,
            &mut host,
            br#"{"execute":"guest-fsfreeze-freeze"}{"execute":"guest-ping"}{"execute":"guest-fsfreeze-status"}"#,
        );

        assert_eq!(out, "{\"return\":{}}\n{\"return\":\"thawed\"}\n");
        assert_eq!(host.freezes, 0);
    }

    #[test]
    fn unknown_command_is_command_not_found() {
        let out = run(
            &mut Agent::default(),
            &mut Host::default(),
            br#"{"execute":"guest-exec","arguments":{"path":"/bin/sh"}}"#,
        );

        assert_eq!(
            out,
            "{\"error\":{\"class\":\"CommandNotFound\",\"desc\":\"The command guest-exec has not been found\"}}\n"
        );
    }

    #[test]
    fn malformed_json_gets_generic_error_and_the_channel_goes_on() {
        let mut agent = Agent::default();
        let mut host = Host::default();

        let out = run(
            &mut agent,
            &mut host,
            b"{\"execute\":guest-ping}\nhello\n{\"execute\":\"guest-ping\"}",
        );

        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[0].contains("GenericError"));
        assert!(lines[1].contains("GenericError"));
        assert_eq!(lines[2], r#"{"return":{}}"#);
    }

    #[test]
    fn overlong_command_is_refused_and_the_next_one_runs() {
        let mut input = br#"{"execute":"guest-ping","arguments":{"pad":""#.to_vec();
        input.extend(core::iter::repeat_n(b'x', MAX_COMMAND));
        input.extend_from_slice(br#""}}{"execute":"guest-ping"}"#);

        let out = run(&mut Agent::default(), &mut Host::default(), &input);

        assert_eq!(
            out,
            "{\"error\":{\"class\":\"GenericError\",\"desc\":\"command too long\"}}\n{\"return\":{}}\n"
        );
    }

    #[test]
    fn info_lists_every_command_and_is_json() {
        let out = run(
            &mut Agent::default(),
            &mut Host::default(),
            br#"{"execute":"guest-info"}"#,
        );

        let value: serde_json::Value = serde_json::from_str(&out).unwrap();
        let commands = value["return"]["supported_commands"].as_array().unwrap();
        assert_eq!(commands.len(), COMMANDS.len());
        assert_eq!(value["return"]["version"], AGENT_VERSION);
        assert!(
            commands
                .iter()
                .any(|c| c["name"] == "guest-shutdown" && c["success-response"] == false)
        );
    }

    #[test]
    fn shutdown_powers_off_without_reply_unless_frozen() {
        let mut agent = Agent::default();
        let mut host = Host::default();

        let frozen = run(
            &mut agent,
            &mut host,
            br#"{"execute":"guest-fsfreeze-freeze"}{"execute":"guest-shutdown"}"#,
        );
        let thawed = run(
            &mut agent,
            &mut host,
            br#"{"execute":"guest-fsfreeze-thaw"}{"execute":"guest-shutdown","arguments":{"mode":"powerdown"}}"#,
        );

        assert!(frozen.contains("disabled"), "{frozen}");
        assert_eq!(thawed, "{\"return\":1}\n");
        assert_eq!(host.shutdown, Some(false));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_input_never_panics_and_a_ping_still_answers(
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)
        ) {
            let mut agent = Agent::default();
            let mut host = Host::default();
            let _ = run(&mut agent, &mut host, &noise);
            let _ = parse(&noise);

            let out = run(&mut agent, &mut host, b"\xff{\"execute\":\"guest-ping\"}");

            proptest::prop_assert!(out.ends_with("{\"return\":{}}\n"), "{}", out);
        }
    }
}
