//! Keyboard input from the RDP client as bytes for COM1: set-1 scan codes through a US layout
//! (what FreeRDP sends for typed keys), Unicode key events as UTF-8, and the terminal escape
//! sequences of the arrow and editing keys.

/// Modifier state of one client's keyboard.
#[derive(Debug, Default, Clone, Copy)]
pub struct KeyTranslator {
    shift_left: bool,
    shift_right: bool,
    ctrl: bool,
    caps_lock: bool,
}

const LSHIFT: u8 = 0x2a;
const RSHIFT: u8 = 0x36;
const CTRL: u8 = 0x1d;
const CAPS: u8 = 0x3a;

/// Unshifted and shifted characters of the set-1 scan codes 0x02..=0x39 on a US keyboard
/// (`\0` where the key types nothing).
const US: [(u8, u8); 0x3a] = {
    let mut map = [(0u8, 0u8); 0x3a];
    let rows: [(u8, &[u8], &[u8]); 4] = [
        (0x02, b"1234567890-=", b"!@#$%^&*()_+"),
        (0x10, b"qwertyuiop[]", b"QWERTYUIOP{}"),
        (0x1e, b"asdfghjkl;'`", b"ASDFGHJKL:\"~"),
        (0x2b, b"\\zxcvbnm,./", b"|ZXCVBNM<>?"),
    ];
    let mut r = 0;
    while r < rows.len() {
        let (start, plain, shifted) = rows[r];
        let mut i = 0;
        while i < plain.len() {
            map[start as usize + i] = (plain[i], shifted[i]);
            i += 1;
        }
        r += 1;
    }
    map[0x39] = (b' ', b' ');
    map
};

impl KeyTranslator {
    /// A key went down: the bytes it types, if any (appended to `out`).
    pub fn pressed(&mut self, code: u8, extended: bool, out: &mut Vec<u8>) {
        match (code, extended) {
            (LSHIFT, false) => self.shift_left = true,
            (RSHIFT, _) => self.shift_right = true,
            (CTRL, _) => self.ctrl = true,
            (CAPS, false) => self.caps_lock = !self.caps_lock,
            (0x01, false) => out.push(0x1b),
            (0x0e, false) => out.push(0x7f),
            (0x0f, false) => out.push(b'\t'),
            (0x1c, _) => out.push(b'\r'),
            (0x48, true) => out.extend_from_slice(b"\x1b[A"),
            (0x50, true) => out.extend_from_slice(b"\x1b[B"),
            (0x4d, true) => out.extend_from_slice(b"\x1b[C"),
            (0x4b, true) => out.extend_from_slice(b"\x1b[D"),
            (0x47, true) => out.extend_from_slice(b"\x1b[H"),
            (0x4f, true) => out.extend_from_slice(b"\x1b[F"),
            (0x53, true) => out.extend_from_slice(b"\x1b[3~"),
            (0x35, true) => out.push(b'/'),
            (code, false) => self.character(code, out),
            _ => {}
        }
    }

    /// A key went up.
    pub fn released(&mut self, code: u8, extended: bool) {
        match (code, extended) {
            (LSHIFT, false) => self.shift_left = false,
            (RSHIFT, _) => self.shift_right = false,
            (CTRL, _) => self.ctrl = false,
            _ => {}
        }
    }

    /// A Unicode key event (clients send these for characters with no scan code).
    pub fn unicode(unit: u16, out: &mut Vec<u8>) {
        if let Some(c) = char::from_u32(u32::from(unit)) {
            let mut utf8 = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
        }
    }

    fn character(&self, code: u8, out: &mut Vec<u8>) {
        let Some(&(plain, shifted)) = US.get(usize::from(code)) else {
            return;
        };
        if plain == 0 {
            return;
        }
        let shift = self.shift_left || self.shift_right;
        let letter = plain.is_ascii_lowercase();
        let byte = if shift ^ (letter && self.caps_lock) {
            shifted
        } else {
            plain
        };
        if self.ctrl {
            // Ctrl-A..Ctrl-Z and the few punctuation controls ([ \ ] give ESC FS GS).
            if let b'@'..=b'_' = byte.to_ascii_uppercase() {
                out.push(byte.to_ascii_uppercase() & 0x1f);
            }
            return;
        }
        out.push(byte);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn typed(keys: &[(u8, bool, bool)]) -> Vec<u8> {
        let mut translator = KeyTranslator::default();
        let mut out = Vec::new();
        for &(code, extended, down) in keys {
            if down {
                translator.pressed(code, extended, &mut out);
            } else {
                translator.released(code, extended);
            }
        }
        out
    }

    #[test]
    fn letters_digits_shift_and_enter() {
        // e c h o SPACE Shift+h i ENTER
        let keys = [
            (0x12, false, true),
            (0x2e, false, true),
            (0x23, false, true),
            (0x18, false, true),
            (0x39, false, true),
            (LSHIFT, false, true),
            (0x23, false, true),
            (LSHIFT, false, false),
            (0x17, false, true),
            (0x02, false, true),
            (0x1c, false, true),
        ];
        assert_eq!(typed(&keys), b"echo Hi1\r");
    }

    #[test]
    fn ctrl_c_and_arrows() {
        let keys = [
            (CTRL, false, true),
            (0x2e, false, true),
            (CTRL, false, false),
            (0x48, true, true),
        ];
        assert_eq!(typed(&keys), b"\x03\x1b[A");
    }
}
