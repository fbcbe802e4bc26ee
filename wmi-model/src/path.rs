//! Object paths (`Msvm_ComputerSystem.CreationClassName="Msvm_ComputerSystem",Name="…"`), in
//! both the form WMI renders and the CIM-XML `INSTANCENAME` form.

use std::fmt;

/// The value of one key binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyValue {
    /// A string key (`VALUETYPE="string"`).
    String(String),
    /// A numeric key, kept as written.
    Number(String),
    /// A boolean key.
    Boolean(bool),
    /// A reference key (association instances).
    Reference(Box<ObjectPath>),
}

impl KeyValue {
    /// Whether two key values name the same thing. Strings compare without regard to case,
    /// as WMI compares keys (GUIDs arrive in either case).
    pub fn matches(&self, other: &KeyValue) -> bool {
        match (self, other) {
            (KeyValue::String(a), KeyValue::String(b)) => a.eq_ignore_ascii_case(b),
            (KeyValue::Number(a), KeyValue::Number(b)) => a == b,
            (KeyValue::Boolean(a), KeyValue::Boolean(b)) => a == b,
            (KeyValue::Reference(a), KeyValue::Reference(b)) => a.matches(b),
            (KeyValue::Reference(a), KeyValue::String(b))
            | (KeyValue::String(b), KeyValue::Reference(a)) => {
                ObjectPath::parse(b).is_ok_and(|p| a.matches(&p))
            }
            _ => false,
        }
    }
}

/// An object path: an optional host and namespace, a class and (for instances) its keys.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObjectPath {
    /// The host, when the path is absolute.
    pub host: Option<String>,
    /// The namespace with slashes (`root/virtualization/v2`), when given.
    pub namespace: Option<String>,
    /// The class name.
    pub class: String,
    /// Key bindings in order; empty for a class path or a singleton (`Class=@`).
    pub keys: Vec<(String, KeyValue)>,
}

/// Why a textual object path could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad object path at character {position}: {message}")]
pub struct PathError {
    /// Byte offset of the problem.
    pub position: usize,
    /// What was expected.
    pub message: &'static str,
}

impl ObjectPath {
    /// A local instance path of `class` with string keys.
    pub fn new(class: impl Into<String>, keys: &[(&str, &str)]) -> Self {
        ObjectPath {
            host: None,
            namespace: None,
            class: class.into(),
            keys: keys
                .iter()
                .map(|(k, v)| ((*k).to_owned(), KeyValue::String((*v).to_owned())))
                .collect(),
        }
    }

    /// A string key's value (name matched without case).
    pub fn key(&self, name: &str) -> Option<&str> {
        self.keys.iter().find_map(|(k, v)| match v {
            KeyValue::String(s) | KeyValue::Number(s) if k.eq_ignore_ascii_case(name) => {
                Some(s.as_str())
            }
            _ => None,
        })
    }

    /// Whether two paths name the same instance: same class (any case) and the same key
    /// values; host and namespace are not compared (one provider, one host).
    pub fn matches(&self, other: &ObjectPath) -> bool {
        self.class.eq_ignore_ascii_case(&other.class)
            && self.keys.len() == other.keys.len()
            && self.keys.iter().all(|(name, value)| {
                other
                    .keys
                    .iter()
                    .any(|(n, v)| n.eq_ignore_ascii_case(name) && v.matches(value))
            })
    }

    /// Parses the textual form: `[\\host\ns:|//host/ns:|ns:]Class[.Key=value,…|=@]` where a value
    /// is `"…"` or `'…'` (backslash escapes), a number, or TRUE/FALSE.
    pub fn parse(text: &str) -> Result<Self, PathError> {
        let mut path = ObjectPath::default();
        let mut rest = text.trim();
        let mut offset = text.len() - text.trim_start().len();
        if let Some(stripped) = rest
            .strip_prefix("\\\\")
            .or_else(|| rest.strip_prefix("//"))
        {
            let end = stripped.find(['\\', '/']).ok_or(PathError {
                position: offset + 2,
                message: "namespace after host",
            })?;
            path.host = Some(stripped[..end].to_owned());
            offset += 2 + end + 1;
            rest = &stripped[end + 1..];
        }
        // A namespace prefix ends at the first ':' that comes before any key binding.
        let first_key = rest.find(['.', '=']).unwrap_or(rest.len());
        if let Some(colon) = rest[..first_key].find(':') {
            path.namespace = Some(rest[..colon].replace('\\', "/"));
            offset += colon + 1;
            rest = &rest[colon + 1..];
        }
        let class_end = rest.find(['.', '=']).unwrap_or(rest.len());
        let class = rest[..class_end].trim();
        if class.is_empty() || !class.chars().all(|c| c.is_alphanumeric() || c == '_') {
            return Err(PathError {
                position: offset,
                message: "class name",
            });
        }
        path.class = class.to_owned();
        let mut tail = &rest[class_end..];
        offset += class_end;
        if tail.is_empty() || tail.trim() == "=@" {
            return Ok(path);
        }
        tail = &tail[1..];
        offset += 1;
        loop {
            let eq = tail.find('=').ok_or(PathError {
                position: offset,
                message: "'=' after key name",
            })?;
            let name = tail[..eq].trim();
            if name.is_empty() {
                return Err(PathError {
                    position: offset,
                    message: "key name",
                });
            }
            let (value, used) = key_value(&tail[eq + 1..]).map_err(|message| PathError {
                position: offset + eq + 1,
                message,
            })?;
            path.keys.push((name.to_owned(), value));
            offset += eq + 1 + used;
            tail = &tail[eq + 1 + used..];
            let trimmed = tail.trim_start();
            offset += tail.len() - trimmed.len();
            tail = trimmed;
            if tail.is_empty() {
                return Ok(path);
            }
            if let Some(after) = tail.strip_prefix(',') {
                tail = after;
                offset += 1;
            } else {
                return Err(PathError {
                    position: offset,
                    message: "',' between keys",
                });
            }
        }
    }
}

/// One key value at the start of `text`; returns it and the bytes used.
fn key_value(text: &str) -> Result<(KeyValue, usize), &'static str> {
    let lead = text.len() - text.trim_start().len();
    let body = &text[lead..];
    let mut chars = body.char_indices();
    match chars.next() {
        Some((_, quote @ ('"' | '\''))) => {
            let mut value = String::new();
            let mut escaped = false;
            for (i, c) in chars {
                if escaped {
                    value.push(c);
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == quote {
                    return Ok((KeyValue::String(value), lead + i + c.len_utf8()));
                } else {
                    value.push(c);
                }
            }
            Err("closing quote")
        }
        Some(_) => {
            let end = body.find(',').unwrap_or(body.len());
            let raw = body[..end].trim();
            let value = if raw.eq_ignore_ascii_case("true") {
                KeyValue::Boolean(true)
            } else if raw.eq_ignore_ascii_case("false") {
                KeyValue::Boolean(false)
            } else if !raw.is_empty()
                && raw
                    .strip_prefix('-')
                    .unwrap_or(raw)
                    .chars()
                    .all(|c| c.is_ascii_digit())
                && raw != "-"
            {
                KeyValue::Number(raw.to_owned())
            } else {
                return Err("a quoted string, number or boolean");
            };
            Ok((value, lead + end))
        }
        None => Err("a key value"),
    }
}

impl fmt::Display for ObjectPath {
    /// Renders as WMI does: `Class.Key="value",…` with `\` and `"` escaped; a namespace prefix
    /// when set.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(host) = &self.host {
            write!(f, "//{host}/")?;
        }
        if let Some(namespace) = &self.namespace {
            write!(f, "{namespace}:")?;
        }
        f.write_str(&self.class)?;
        for (i, (name, value)) in self.keys.iter().enumerate() {
            f.write_str(if i == 0 { "." } else { "," })?;
            write!(f, "{name}=")?;
            match value {
                KeyValue::String(s) => write!(f, "\"{}\"", quote(s))?,
                KeyValue::Number(n) => f.write_str(n)?,
                KeyValue::Boolean(b) => f.write_str(if *b { "TRUE" } else { "FALSE" })?,
                KeyValue::Reference(p) => write!(f, "\"{}\"", quote(&p.to_string()))?,
            }
        }
        Ok(())
    }
}

fn quote(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wmi_rendered_path_parses_with_both_quote_styles() {
        let path = ObjectPath::parse(
            "Msvm_ComputerSystem.CreationClassName='Msvm_ComputerSystem',Name=\"ABC\"",
        )
        .expect("valid path");

        assert_eq!(path.class, "Msvm_ComputerSystem");
        assert_eq!(path.key("name"), Some("ABC"));
        assert_eq!(path.key("CreationClassName"), Some("Msvm_ComputerSystem"));
    }

    #[test]
    fn host_and_namespace_prefixes_are_split_off() {
        let path =
            ObjectPath::parse(r#"\\HV01\root\virtualization\v2:Msvm_ConcreteJob.InstanceID="J1""#)
                .expect("valid path");

        assert_eq!(path.host.as_deref(), Some("HV01"));
        assert_eq!(path.namespace.as_deref(), Some("root/virtualization/v2"));
        assert_eq!(path.key("InstanceID"), Some("J1"));
    }

    #[test]
    fn display_round_trips_escaped_backslashes() {
        let path = ObjectPath::new(
            "Msvm_MemorySettingData",
            &[("InstanceID", r"Microsoft:X\Memory")],
        );

        let parsed = ObjectPath::parse(&path.to_string()).expect("own rendering parses");

        assert!(parsed.matches(&path));
    }

    #[test]
    fn singleton_and_class_paths_have_no_keys() {
        assert!(
            ObjectPath::parse("Msvm_VirtualSystemManagementService=@")
                .expect("singleton")
                .keys
                .is_empty()
        );
    }

    #[test]
    fn unterminated_quote_is_an_error_with_position() {
        let error = ObjectPath::parse("C.K=\"open").expect_err("unterminated");

        assert_eq!(error.position, 4);
    }
}
