//! The qemu-guest-agent wire format: commands out, replies in.
//!
//! Commands are JSON objects `{"execute":…,"arguments":…}`, one per line. Replies are a stream of
//! JSON objects (`{"return":…}` or `{"error":{"class":…,"desc":…}}`), possibly with a `0xFF`
//! sentinel before the answer to `guest-sync-delimited`. The decoder splits the stream on its own
//! (brace depth outside strings), so a reply cut anywhere, noise between replies, a reply larger
//! than [`MAX_REPLY`] or arbitrary bytes never make it panic or grow without bound: what it
//! cannot use it reports and skips.

use serde_json::{Map, Value};

/// The byte that resynchronises the stream: the client sends it to make the agent drop a partial
/// command; the agent sends it as the sentinel before `guest-sync-delimited`'s answer. It never
/// occurs in UTF-8 JSON.
pub const SYNC_BYTE: u8 = 0xff;

/// Longest reply kept; longer ones are skipped whole and reported as [`Incoming::Oversized`].
pub const MAX_REPLY: usize = 256 * 1024;

/// Encodes one command, newline-terminated.
pub fn encode_command(execute: &str, arguments: Option<Value>) -> Vec<u8> {
    let mut command = Map::new();
    command.insert("execute".into(), Value::String(execute.into()));
    if let Some(arguments) = arguments {
        command.insert("arguments".into(), arguments);
    }
    let mut bytes = Value::Object(command).to_string().into_bytes();
    bytes.push(b'\n');
    bytes
}

/// One thing the agent said.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// The `0xFF` sentinel (what came before it is dropped).
    Sentinel,
    /// `{"return": value}`.
    Return(Value),
    /// `{"error": {"class": …, "desc": …}}`.
    Error {
        /// `GenericError`, `CommandNotFound`, …
        class: String,
        /// The agent's words.
        desc: String,
    },
    /// A complete JSON object that is no reply, or bytes that are no JSON; with what was wrong.
    Malformed(String),
    /// A reply longer than [`MAX_REPLY`], skipped.
    Oversized,
}

/// Splits the agent's byte stream into [`Incoming`]s.
#[derive(Debug, Default)]
pub struct ReplyDecoder {
    object: Vec<u8>,
    depth: usize,
    in_string: bool,
    escaped: bool,
    oversized: bool,
}

impl ReplyDecoder {
    /// Forgets a partly received reply.
    pub fn reset(&mut self) {
        self.object.clear();
        self.depth = 0;
        self.in_string = false;
        self.escaped = false;
        self.oversized = false;
    }

    /// Takes the next bytes of the stream, appending every complete item to `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Incoming>) {
        for &byte in bytes {
            if let Some(item) = self.byte(byte) {
                out.push(item);
            }
        }
    }

    fn byte(&mut self, byte: u8) -> Option<Incoming> {
        if byte == SYNC_BYTE {
            self.reset();
            return Some(Incoming::Sentinel);
        }
        if self.depth == 0 {
            // Between replies only an object starts something; blanks and noise are skipped.
            if byte != b'{' {
                return None;
            }
            self.object.clear();
            self.oversized = false;
        }
        if self.object.len() < MAX_REPLY {
            self.object.push(byte);
        } else {
            self.oversized = true;
        }
        if self.in_string {
            match (self.escaped, byte) {
                (true, _) => self.escaped = false,
                (false, b'\\') => self.escaped = true,
                (false, b'"') => self.in_string = false,
                _ => {}
            }
            return None;
        }
        match byte {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.depth += 1,
            b'}' | b']' => self.depth -= 1,
            _ => {}
        }
        if self.depth > 0 {
            return None;
        }
        let item = if self.oversized {
            Incoming::Oversized
        } else {
            classify(&self.object)
        };
        self.object.clear();
        self.oversized = false;
        Some(item)
    }
}

/// What one complete object says.
fn classify(object: &[u8]) -> Incoming {
    let value: Value = match serde_json::from_slice(object) {
        Ok(value) => value,
        Err(e) => return Incoming::Malformed(format!("not JSON: {e}")),
    };
    let Value::Object(mut map) = value else {
        return Incoming::Malformed("not an object".into());
    };
    if let Some(value) = map.remove("return") {
        return Incoming::Return(value);
    }
    match map.remove("error") {
        Some(Value::Object(error)) => {
            let text = |key: &str| {
                error
                    .get(key)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            Incoming::Error {
                class: text("class"),
                desc: text("desc"),
            }
        }
        Some(_) => Incoming::Malformed("\"error\" is not an object".into()),
        None => Incoming::Malformed("neither \"return\" nor \"error\"".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn decode(bytes: &[u8]) -> Vec<Incoming> {
        let mut decoder = ReplyDecoder::default();
        let mut out = Vec::new();
        decoder.feed(bytes, &mut out);
        out
    }

    #[test]
    fn command_is_one_json_line() {
        let bytes = encode_command("guest-sync-delimited", Some(json!({"id": 7})));

        assert_eq!(
            bytes,
            b"{\"arguments\":{\"id\":7},\"execute\":\"guest-sync-delimited\"}\n"
        );
    }

    #[test]
    fn sentinel_drops_a_partial_reply_and_the_next_reply_decodes() {
        let items = decode(b"{\"return\":{\"ver\xff{\"return\":42}\n");

        assert_eq!(items, vec![Incoming::Sentinel, Incoming::Return(json!(42))]);
    }

    #[test]
    fn error_reply_carries_class_and_description() {
        let items =
            decode(br#"{"error":{"class":"CommandNotFound","desc":"no {such} \"thing\""}}"#);

        assert_eq!(
            items,
            vec![Incoming::Error {
                class: "CommandNotFound".into(),
                desc: "no {such} \"thing\"".into()
            }]
        );
    }

    #[test]
    fn reply_split_across_reads_decodes_once_whole() {
        let mut decoder = ReplyDecoder::default();
        let mut out = Vec::new();

        decoder.feed(b"  {\"return\":[1,", &mut out);
        let before = out.len();
        decoder.feed(b"2]}\n", &mut out);

        assert_eq!(before, 0);
        assert_eq!(out, vec![Incoming::Return(json!([1, 2]))]);
    }

    #[test]
    fn noise_between_replies_is_skipped_and_bad_objects_are_reported() {
        let items = decode(b"garbage\r\n{\"hello\":1}{\"return\":tru}{\"return\":{}}");

        assert!(matches!(&items[0], Incoming::Malformed(m) if m.contains("neither")));
        assert!(matches!(&items[1], Incoming::Malformed(m) if m.contains("not JSON")));
        assert_eq!(items[2], Incoming::Return(json!({})));
        assert_eq!(items.len(), 3);
    }

    #[test]
    fn oversized_reply_is_skipped_whole() {
        let mut bytes = b"{\"return\":\"".to_vec();
        bytes.extend(std::iter::repeat_n(b'x', MAX_REPLY));
        bytes.extend_from_slice(b"\"}{\"return\":1}");

        let items = decode(&bytes);

        assert_eq!(items, vec![Incoming::Oversized, Incoming::Return(json!(1))]);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_and_a_sentinel_recovers(
            noise in proptest::collection::vec(any::<u8>(), 0..2048),
        ) {
            let mut decoder = ReplyDecoder::default();
            let mut out = Vec::new();
            decoder.feed(&noise, &mut out);
            out.clear();

            decoder.feed(b"\xff{\"return\":5}", &mut out);

            prop_assert_eq!(out, vec![Incoming::Sentinel, Incoming::Return(json!(5))]);
        }

        #[test]
        fn any_reply_cut_anywhere_decodes_the_same(
            value in "[ -~]{0,40}",
            cut in any::<proptest::sample::Index>(),
        ) {
            let reply = serde_json::to_vec(&json!({"return": {"text": value}})).unwrap();
            let at = cut.index(reply.len() + 1);
            let mut decoder = ReplyDecoder::default();
            let mut out = Vec::new();

            decoder.feed(&reply[..at], &mut out);
            decoder.feed(&reply[at..], &mut out);

            prop_assert_eq!(out, vec![Incoming::Return(json!({"text": value}))]);
        }
    }
}
