//! Splits a WQL query into tokens, each with its character position.

use super::WqlError;

/// One token.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Token {
    /// A name or keyword (keywords are recognised by the parser, any case).
    Ident(String),
    /// A quoted string (either quote style), escapes resolved.
    Str(String),
    /// An integer.
    Int(i128),
    /// A real number.
    Real(f64),
    /// `{…}`: an object path, braces removed.
    Path(String),
    /// `=`, `<>`, `!=`, `<`, `>`, `<=`, `>=`.
    Op(&'static str),
    /// `(`.
    LParen,
    /// `)`.
    RParen,
    /// `,`.
    Comma,
    /// `*`.
    Star,
    /// `.`.
    Dot,
}

/// A token and where it starts.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Spanned {
    pub(crate) token: Token,
    pub(crate) position: usize,
}

fn error(position: usize, message: impl Into<String>) -> WqlError {
    WqlError {
        position,
        message: message.into(),
    }
}

/// Tokenises `text`.
pub(crate) fn tokenize(text: &str) -> Result<Vec<Spanned>, WqlError> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        let token = match c {
            c if c.is_whitespace() => {
                i += 1;
                continue;
            }
            '(' => {
                i += 1;
                Token::LParen
            }
            ')' => {
                i += 1;
                Token::RParen
            }
            ',' => {
                i += 1;
                Token::Comma
            }
            '*' => {
                i += 1;
                Token::Star
            }
            '.' if !chars.get(i + 1).is_some_and(char::is_ascii_digit) => {
                i += 1;
                Token::Dot
            }
            '=' => {
                i += 1;
                Token::Op("=")
            }
            '!' if chars.get(i + 1) == Some(&'=') => {
                i += 2;
                Token::Op("<>")
            }
            '<' => match chars.get(i + 1) {
                Some('>') => {
                    i += 2;
                    Token::Op("<>")
                }
                Some('=') => {
                    i += 2;
                    Token::Op("<=")
                }
                _ => {
                    i += 1;
                    Token::Op("<")
                }
            },
            '>' => {
                if chars.get(i + 1) == Some(&'=') {
                    i += 2;
                    Token::Op(">=")
                } else {
                    i += 1;
                    Token::Op(">")
                }
            }
            '\'' | '"' => {
                let quote = c;
                let mut value = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        None => return Err(error(start, "unterminated string")),
                        Some('\\') => {
                            let Some(next) = chars.get(i + 1) else {
                                return Err(error(start, "unterminated string"));
                            };
                            value.push(*next);
                            i += 2;
                        }
                        Some(&q) if q == quote => {
                            i += 1;
                            break;
                        }
                        Some(&other) => {
                            value.push(other);
                            i += 1;
                        }
                    }
                }
                Token::Str(value)
            }
            '{' => {
                // Braces are literal; the path inside may hold quoted strings with braces.
                let mut value = String::new();
                let mut quote: Option<char> = None;
                i += 1;
                loop {
                    let Some(&ch) = chars.get(i) else {
                        return Err(error(start, "'}' to close the object path"));
                    };
                    i += 1;
                    match (quote, ch) {
                        (None, '}') => break,
                        (None, '\'' | '"') => quote = Some(ch),
                        (Some(q), ch) if ch == q => quote = None,
                        (Some(_), '\\') => {
                            value.push(ch);
                            if let Some(&next) = chars.get(i) {
                                value.push(next);
                                i += 1;
                            }
                            continue;
                        }
                        _ => {}
                    }
                    value.push(ch);
                }
                Token::Path(value.trim().to_owned())
            }
            c if c.is_ascii_digit() || c == '-' || c == '+' || c == '.' => {
                let mut end = i + 1;
                while chars
                    .get(end)
                    .is_some_and(|d| d.is_ascii_digit() || *d == '.' || *d == 'e' || *d == 'E')
                {
                    end += 1;
                }
                let literal: String = chars[i..end].iter().collect();
                i = end;
                if let Ok(int) = literal.parse::<i128>() {
                    Token::Int(int)
                } else if let Ok(real) = literal.parse::<f64>() {
                    Token::Real(real)
                } else {
                    return Err(error(start, format!("'{literal}' is not a number")));
                }
            }
            c if c.is_alphabetic() || c == '_' => {
                let mut end = i + 1;
                while chars
                    .get(end)
                    .is_some_and(|d| d.is_alphanumeric() || *d == '_')
                {
                    end += 1;
                }
                let ident: String = chars[i..end].iter().collect();
                i = end;
                Token::Ident(ident)
            }
            other => return Err(error(start, format!("unexpected character '{other}'"))),
        };
        tokens.push(Spanned {
            token,
            position: start,
        });
    }
    Ok(tokens)
}
