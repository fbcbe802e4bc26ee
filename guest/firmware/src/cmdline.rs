//! The kernel command line: `key=value` words separated by spaces.
//!
//! The guest reads three keys: `bench=<mode>`, `idle_us=<n>` and Linux's
//! `virtio_mmio.device=<size>@<base>:<irq>[:<id>]`, which announces a virtio-mmio device exactly as
//! it does to a Linux kernel. Quoting (`key="a b"`) is not supported: no key the guest reads needs
//! it. This module is compiled into the host crate's tests as well.

/// Command-line key announcing a virtio-mmio device (Linux's `virtio_mmio.device`).
pub const VIRTIO_MMIO_KEY: &str = "virtio_mmio.device";

/// A command line, as text.
#[derive(Clone, Copy, Debug)]
pub struct Cmdline<'a> {
    text: &'a str,
}

impl<'a> Cmdline<'a> {
    /// Wraps `text`.
    pub fn new(text: &'a str) -> Self {
        Self { text }
    }

    /// Turns the raw bytes of a command line into text, keeping the longest valid UTF-8 prefix.
    pub fn from_bytes(bytes: &'a [u8]) -> Self {
        let text = match core::str::from_utf8(bytes) {
            Ok(text) => text,
            // `valid_up_to` marks a UTF-8 boundary, so the prefix is valid.
            Err(error) => core::str::from_utf8(&bytes[..error.valid_up_to()]).unwrap_or_default(),
        };
        Self::new(text)
    }

    /// Values of every `key=value` word for `key`, in order.
    pub fn values(&self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.text.split_ascii_whitespace().filter_map(move |word| {
            let (name, value) = word.split_once('=')?;
            (name == key).then_some(value)
        })
    }

    /// The value of the last `key=value` word for `key` (later words override earlier ones).
    pub fn value(&self, key: &'a str) -> Option<&'a str> {
        self.values(key).last()
    }
}

/// A virtio-mmio device announced on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Guest-physical base of the register window.
    pub base: u64,
    /// Size of the register window in bytes.
    pub size: u64,
    /// The device's interrupt line (unused by the polling guest).
    pub irq: u32,
}

/// Parses a `virtio_mmio.device` value, `<size>@<base>:<irq>[:<id>]`, where size and base are
/// numbers as [`parse_size`] reads them (`4K@0xd0000000:5`). `None` if malformed or if the window
/// is empty or wraps around the address space.
pub fn parse_virtio_mmio_device(value: &str) -> Option<VirtioMmioDevice> {
    let (size, rest) = value.split_once('@')?;
    let mut fields = rest.split(':');
    let base = parse_size(fields.next()?)?;
    let irq = fields.next()?.parse().ok()?;
    // An optional platform-device id may follow; more fields are malformed.
    if fields.next().is_some_and(|id| id.parse::<u32>().is_err()) || fields.next().is_some() {
        return None;
    }
    let size = parse_size(size)?;
    if size == 0 || base.checked_add(size).is_none() {
        return None;
    }
    Some(VirtioMmioDevice { base, size, irq })
}

/// Parses a number as Linux's `memparse` does for the forms VMMs write: decimal or `0x` hex,
/// optionally followed by `K`, `M` or `G` (binary multiples, either case). `None` on overflow.
pub fn parse_size(text: &str) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last()? {
        b'k' | b'K' => (&text[..text.len() - 1], 10),
        b'm' | b'M' => (&text[..text.len() - 1], 20),
        b'g' | b'G' => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let number = parse_u64(digits)?;
    let scaled = number.checked_shl(shift)?;
    (scaled >> shift == number).then_some(scaled)
}

/// Parses a decimal or `0x`/`0X`-prefixed hexadecimal unsigned number.
pub fn parse_u64(text: &str) -> Option<u64> {
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) if !hex.starts_with('+') => u64::from_str_radix(hex, 16).ok(),
        Some(_) => None,
        None if !text.starts_with('+') => text.parse().ok(),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn value_finds_key_among_other_words() {
        let cmdline = Cmdline::new("console=ttyS0 bench=pio-out  idle_us=0");

        assert_eq!(cmdline.value("bench"), Some("pio-out"));
    }

    #[test]
    fn later_word_overrides_earlier_one() {
        let cmdline = Cmdline::new("idle_us=5 idle_us=7");

        assert_eq!(cmdline.value("idle_us"), Some("7"));
    }

    #[test]
    fn key_prefix_does_not_match() {
        let cmdline = Cmdline::new("benchmark=1 bench");

        assert_eq!(cmdline.value("bench"), None);
    }

    #[test]
    fn invalid_utf8_keeps_the_valid_prefix() {
        let cmdline = Cmdline::from_bytes(b"idle_us=3 \xff bench=x");

        assert_eq!(cmdline.value("idle_us"), Some("3"));
    }

    #[test]
    fn firecracker_style_device_parses() {
        let device = parse_virtio_mmio_device("4K@0xd0000000:5");

        assert_eq!(
            device,
            Some(VirtioMmioDevice {
                base: 0xd000_0000,
                size: 0x1000,
                irq: 5
            })
        );
    }

    #[test]
    fn device_with_platform_id_parses() {
        let device = parse_virtio_mmio_device("0x200@0xd0001000:6:1");

        assert_eq!(
            device,
            Some(VirtioMmioDevice {
                base: 0xd000_1000,
                size: 0x200,
                irq: 6
            })
        );
    }

    #[test]
    fn device_without_irq_is_rejected() {
        assert_eq!(parse_virtio_mmio_device("4K@0xd0000000"), None);
    }

    #[test]
    fn device_window_wrapping_the_address_space_is_rejected() {
        assert_eq!(parse_virtio_mmio_device("8K@0xfffffffffffff000:5"), None);
    }

    #[test]
    fn size_suffix_overflow_is_rejected() {
        assert_eq!(parse_size("0xffffffffffffffffG"), None);
    }

    #[test]
    fn signed_numbers_are_rejected() {
        assert_eq!(parse_u64("+5"), None);
        assert_eq!(parse_u64("0x+5"), None);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(text in "\\PC*") {
            let _ = parse_virtio_mmio_device(&text);
            let _ = Cmdline::new(&text).value("bench");
        }

        #[test]
        fn formatted_device_parses_back(
            kib in 1u64..=1024, base in 0u64..0xffff_ffff, irq: u32, hex_size: bool,
        ) {
            let size = kib << 10;
            let size_text = if hex_size { format!("{size:#x}") } else { format!("{kib}K") };
            let cmdline = format!("console=ttyS0 {VIRTIO_MMIO_KEY}={size_text}@{base:#x}:{irq} quiet");

            let device = Cmdline::new(&cmdline).value(VIRTIO_MMIO_KEY).and_then(parse_virtio_mmio_device);

            prop_assert_eq!(device, Some(VirtioMmioDevice { base, size, irq }));
        }
    }
}
