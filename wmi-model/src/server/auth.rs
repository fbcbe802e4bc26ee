//! HTTP Basic authentication against the one account of the daemon's configuration.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// A user name and password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Reads `user:password` from the first non-empty, non-comment line of a file's text.
    pub fn parse(text: &str) -> Option<Self> {
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))?;
        let (user, password) = line.split_once(':')?;
        (!user.is_empty()).then(|| Credentials {
            user: user.to_owned(),
            password: password.to_owned(),
        })
    }

    /// Whether an `Authorization` header value carries these credentials.
    pub fn accepts(&self, header: Option<&str>) -> bool {
        let Some(encoded) = header.and_then(|h| {
            let (scheme, rest) = h.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("basic").then_some(rest.trim())
        }) else {
            return false;
        };
        let Ok(decoded) = STANDARD.decode(encoded) else {
            return false;
        };
        let expected = format!("{}:{}", self.user, self.password);
        constant_time_eq(&decoded, expected.as_bytes())
    }
}

/// Compares without returning early on the first difference (no timing oracle on the password).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, byte) in b.iter().enumerate() {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ byte);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account() -> Credentials {
        Credentials::parse("# comment\nadmin:s3cret:x\n").expect("valid file")
    }

    #[test]
    fn password_may_contain_colons() {
        assert_eq!(account().password, "s3cret:x");
    }

    #[test]
    fn right_credentials_are_accepted() {
        let header = format!("Basic {}", STANDARD.encode("admin:s3cret:x"));

        assert!(account().accepts(Some(&header)));
    }

    #[test]
    fn wrong_or_missing_credentials_are_refused() {
        let wrong = format!("Basic {}", STANDARD.encode("admin:guess"));

        assert!(!account().accepts(Some(&wrong)));
        assert!(!account().accepts(None));
        assert!(!account().accepts(Some("Bearer x")));
    }
}
