//! COM1 as a picture: a vt100 terminal holds the screen state, and every cell is drawn with a
//! bitmap font (Noto Sans Mono, pre-rasterized by the `noto-sans-mono-bitmap` crate) into a
//! 32-bit BGRX framebuffer.

use std::num::NonZeroU16;

use noto_sans_mono_bitmap::{FontWeight, RasterHeight, get_raster, get_raster_width};

/// Terminal rows.
pub const ROWS: u16 = 25;
/// Terminal columns.
pub const COLUMNS: u16 = 80;
const NON_ZERO_ROWS: NonZeroU16 = non_zero(ROWS);
const NON_ZERO_COLUMNS: NonZeroU16 = non_zero(COLUMNS);

/// For the constants above (a zero fails the build).
const fn non_zero(n: u16) -> NonZeroU16 {
    match NonZeroU16::new(n) {
        Some(n) => n,
        None => panic!("terminal size must not be zero"),
    }
}
const FONT: RasterHeight = RasterHeight::Size20;
const WEIGHT: FontWeight = FontWeight::Regular;
/// Bytes per pixel (BGRX).
pub const BYTES_PER_PIXEL: usize = 4;

/// Width of one cell in pixels.
pub fn cell_width() -> usize {
    get_raster_width(WEIGHT, FONT)
}

/// Height of one cell in pixels.
pub fn cell_height() -> usize {
    FONT.val()
}

/// Framebuffer width in pixels.
pub fn width() -> u16 {
    // 80 cells of the 20-pixel font are ~800 pixels: far from u16's limit.
    u16::try_from(cell_width() * usize::from(COLUMNS)).unwrap_or(u16::MAX)
}

/// Framebuffer height in pixels.
pub fn height() -> u16 {
    u16::try_from(cell_height() * usize::from(ROWS)).unwrap_or(u16::MAX)
}

/// The terminal state of one VM's console.
pub struct Screen {
    parser: vt100::Parser,
}

impl std::fmt::Debug for Screen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Screen").finish_non_exhaustive()
    }
}

impl Default for Screen {
    fn default() -> Self {
        Screen {
            parser: vt100::Parser::new(NON_ZERO_ROWS, NON_ZERO_COLUMNS, 0),
        }
    }
}

impl Screen {
    /// Feeds guest output. A bare `\n` also returns the carriage: a serial console's guest may
    /// rely on the terminal's newline mode.
    pub fn process(&mut self, bytes: &[u8]) {
        let mut start = 0;
        for (at, &byte) in bytes.iter().enumerate() {
            if byte == b'\n' {
                self.parser.process(&bytes[start..at]);
                self.parser.process(b"\r\n");
                start = at + 1;
            }
        }
        self.parser.process(&bytes[start..]);
    }

    /// The visible text, rows joined by newlines (for tests and logs).
    pub fn text(&self) -> String {
        self.parser.screen().contents()
    }

    /// Draws the screen into `frame` (resized to `width() * height() * 4` bytes, BGRX).
    pub fn render(&self, frame: &mut Vec<u8>) {
        let (cw, ch) = (cell_width(), cell_height());
        let stride = usize::from(width()) * BYTES_PER_PIXEL;
        frame.clear();
        frame.resize(stride * usize::from(height()), 0);
        let screen = self.parser.screen();
        let (cursor_row, cursor_col) = screen.cursor_position();
        for row in 0..ROWS {
            for col in 0..COLUMNS {
                let cell = screen.cell(row, col);
                let mut fg = cell.map_or(LIGHT_GREY, |c| colour(c.fgcolor(), LIGHT_GREY));
                let mut bg = cell.map_or(BLACK, |c| colour(c.bgcolor(), BLACK));
                if cell.is_some_and(vt100::Cell::inverse)
                    ^ (row == cursor_row && col == cursor_col && !screen.hide_cursor())
                {
                    std::mem::swap(&mut fg, &mut bg);
                }
                let glyph = cell
                    .and_then(|c| c.contents().chars().next())
                    .filter(|c| !c.is_control())
                    .unwrap_or(' ');
                let raster =
                    get_raster(glyph, WEIGHT, FONT).or_else(|| get_raster('?', WEIGHT, FONT));
                let x0 = usize::from(col) * cw;
                let y0 = usize::from(row) * ch;
                for y in 0..ch {
                    let line = &mut frame[(y0 + y) * stride..][..stride];
                    for x in 0..cw {
                        let ink = raster.and_then(|r| r.pixel(x, y)).unwrap_or(0);
                        let pixel = blend(bg, fg, ink);
                        line[(x0 + x) * BYTES_PER_PIXEL..][..BYTES_PER_PIXEL]
                            .copy_from_slice(&pixel);
                    }
                }
            }
        }
    }
}

type Rgb = (u8, u8, u8);
const BLACK: Rgb = (0, 0, 0);
const LIGHT_GREY: Rgb = (0xd0, 0xd0, 0xd0);

/// The 16 ANSI colours (xterm's), then the 6×6×6 cube and the grey ramp.
fn colour(colour: vt100::Color, default: Rgb) -> Rgb {
    const ANSI: [Rgb; 16] = [
        (0, 0, 0),
        (205, 0, 0),
        (0, 205, 0),
        (205, 205, 0),
        (0, 0, 238),
        (205, 0, 205),
        (0, 205, 205),
        (229, 229, 229),
        (127, 127, 127),
        (255, 0, 0),
        (0, 255, 0),
        (255, 255, 0),
        (92, 92, 255),
        (255, 0, 255),
        (0, 255, 255),
        (255, 255, 255),
    ];
    match colour {
        vt100::Color::Default => default,
        vt100::Color::Rgb(r, g, b) => (r, g, b),
        vt100::Color::Idx(i) if i < 16 => ANSI[usize::from(i)],
        vt100::Color::Idx(i) if i < 232 => {
            let i = i - 16;
            let level = |v: u8| if v == 0 { 0 } else { 55 + v * 40 };
            (level(i / 36), level((i / 6) % 6), level(i % 6))
        }
        vt100::Color::Idx(i) => {
            let v = 8 + (i - 232) * 10;
            (v, v, v)
        }
    }
}

/// `bg` to `fg` by the glyph's coverage, as BGRX.
fn blend(bg: Rgb, fg: Rgb, ink: u8) -> [u8; 4] {
    let mix = |b: u8, f: u8| {
        let (b, f, a) = (u32::from(b), u32::from(f), u32::from(ink));
        // (b * (255 - a) + f * a) / 255 is at most 255.
        u8::try_from((b * (255 - a) + f * a) / 255).unwrap_or(u8::MAX)
    };
    [mix(bg.2, fg.2), mix(bg.1, fg.1), mix(bg.0, fg.0), 0xff]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_lands_on_the_screen_and_in_the_frame() {
        let mut screen = Screen::default();
        screen.process(b"hello\nworld $ ");

        assert!(screen.text().starts_with("hello\nworld $"));
        let mut frame = Vec::new();
        screen.render(&mut frame);
        assert_eq!(
            frame.len(),
            usize::from(width()) * usize::from(height()) * BYTES_PER_PIXEL
        );
        // The first cell ('h') has ink; the last row (empty) has none.
        let stride = usize::from(width()) * BYTES_PER_PIXEL;
        let first_cell_ink = (0..cell_height())
            .flat_map(|y| frame[y * stride..][..cell_width() * BYTES_PER_PIXEL].to_vec())
            .any(|b| b > 0x40 && b != 0xff);
        assert!(first_cell_ink);
        let last_row = &frame[(usize::from(height()) - cell_height()) * stride..];
        assert!(last_row.chunks(4).all(|p| p[..3] == [0, 0, 0]));
    }
}
