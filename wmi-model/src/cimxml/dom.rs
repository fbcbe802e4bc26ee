//! A small, bounded element tree built from quick-xml events.
//!
//! CIM-XML messages are small and deeply regular; reading them into a tree first keeps the
//! interpretation code (request.rs) free of streaming state. The builder refuses documents that
//! are too deep or have too many elements, so a hostile request costs bounded memory and time.

use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};

/// The deepest nesting accepted (CIM-XML needs about 12; embedded instances add a few).
pub const MAX_DEPTH: usize = 64;
/// The most elements one document may have.
pub const MAX_ELEMENTS: usize = 200_000;

/// Why a document is not well-formed XML (or too large).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    /// quick-xml rejected the text.
    #[error("xml syntax error at byte {position}: {message}")]
    Syntax {
        /// Byte offset in the document.
        position: u64,
        /// quick-xml's message.
        message: String,
    },
    /// An end tag does not match its start tag, or the document ends inside an element.
    #[error("unbalanced element at byte {0}")]
    Unbalanced(u64),
    /// No root element.
    #[error("document has no root element")]
    Empty,
    /// More than one root element.
    #[error("document has more than one root element")]
    MultipleRoots,
    /// Deeper than [`MAX_DEPTH`].
    #[error("elements nested deeper than {MAX_DEPTH}")]
    TooDeep,
    /// More than [`MAX_ELEMENTS`].
    #[error("more than {MAX_ELEMENTS} elements")]
    TooManyElements,
    /// An unknown entity reference.
    #[error("unknown entity &{0};")]
    UnknownEntity(String),
}

/// One element: its name, attributes, child elements and the text directly inside it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    /// The tag name.
    pub name: String,
    /// Attributes in document order, values unescaped.
    pub attrs: Vec<(String, String)>,
    /// Child elements in order.
    pub children: Vec<Element>,
    /// Text and CDATA directly inside this element, entities resolved.
    pub text: String,
}

impl Element {
    /// An attribute's value; names are matched case-insensitively (pywbem and WMI differ on
    /// `EmbeddedObject` vs `EMBEDDEDOBJECT`).
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The first child named `name`.
    pub fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child named `name`.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }
}

/// Parses `xml` into its root element.
pub fn parse(xml: &str) -> Result<Element, XmlError> {
    let mut reader = Reader::from_str(xml);
    reader.config_mut().trim_text(false);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    let mut count = 0usize;
    loop {
        let position = reader.buffer_position();
        let event = reader.read_event().map_err(|e| XmlError::Syntax {
            position,
            message: e.to_string(),
        })?;
        match event {
            Event::Start(start) => {
                count += 1;
                if count > MAX_ELEMENTS {
                    return Err(XmlError::TooManyElements);
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(XmlError::TooDeep);
                }
                stack.push(element(&start, position)?);
            }
            Event::Empty(start) => {
                count += 1;
                if count > MAX_ELEMENTS {
                    return Err(XmlError::TooManyElements);
                }
                let done = element(&start, position)?;
                attach(&mut stack, &mut root, done)?;
            }
            Event::End(end) => {
                let Some(done) = stack.pop() else {
                    return Err(XmlError::Unbalanced(position));
                };
                if end.name().as_ref() != done.name.as_bytes() {
                    return Err(XmlError::Unbalanced(position));
                }
                attach(&mut stack, &mut root, done)?;
            }
            Event::Text(text) => {
                if let Some(top) = stack.last_mut() {
                    let decoded = text.decode().map_err(|e| syntax(position, e))?;
                    top.text.push_str(&decoded);
                }
            }
            Event::CData(data) => {
                if let Some(top) = stack.last_mut() {
                    let decoded = data.decode().map_err(|e| syntax(position, e))?;
                    top.text.push_str(&decoded);
                }
            }
            Event::GeneralRef(reference) => {
                let resolved = match reference.resolve_char_ref() {
                    Ok(Some(c)) => c,
                    Ok(None) => {
                        let name = reference.decode().map_err(|e| syntax(position, e))?;
                        match name.as_ref() {
                            "lt" => '<',
                            "gt" => '>',
                            "amp" => '&',
                            "quot" => '"',
                            "apos" => '\'',
                            other => return Err(XmlError::UnknownEntity(other.to_owned())),
                        }
                    }
                    Err(e) => return Err(syntax(position, e)),
                };
                if let Some(top) = stack.last_mut() {
                    top.text.push(resolved);
                }
            }
            Event::Eof => break,
            Event::Decl(_) | Event::PI(_) | Event::Comment(_) | Event::DocType(_) => {}
        }
    }
    if !stack.is_empty() {
        return Err(XmlError::Unbalanced(reader.buffer_position()));
    }
    root.ok_or(XmlError::Empty)
}

fn syntax(position: u64, error: impl std::fmt::Display) -> XmlError {
    XmlError::Syntax {
        position,
        message: error.to_string(),
    }
}

fn element(start: &BytesStart<'_>, position: u64) -> Result<Element, XmlError> {
    let name = String::from_utf8_lossy(start.name().as_ref()).into_owned();
    let mut attrs = Vec::new();
    for attr in start.attributes() {
        let attr = attr.map_err(|e| syntax(position, e))?;
        let key = String::from_utf8_lossy(attr.key.as_ref()).into_owned();
        let value = attr.unescape_value().map_err(|e| syntax(position, e))?;
        attrs.push((key, value.into_owned()));
    }
    Ok(Element {
        name,
        attrs,
        ..Element::default()
    })
}

fn attach(
    stack: &mut [Element],
    root: &mut Option<Element>,
    done: Element,
) -> Result<(), XmlError> {
    match stack.last_mut() {
        Some(parent) => parent.children.push(done),
        None if root.is_some() => return Err(XmlError::MultipleRoots),
        None => *root = Some(done),
    }
    Ok(())
}

/// Escapes text for element content and attribute values.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    quick_xml::escape::escape(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entities_and_char_refs_are_resolved_in_text() {
        let root = parse("<A>&lt;B&gt; &amp; &#65;&#x42;</A>").expect("well-formed");

        assert_eq!(root.text, "<B> & AB");
    }

    #[test]
    fn attributes_are_unescaped_and_matched_without_case() {
        let root = parse(r#"<P EMBEDDEDOBJECT="instance" N="a&quot;b"/>"#).expect("well-formed");

        assert_eq!(root.attr("EmbeddedObject"), Some("instance"));
        assert_eq!(root.attr("N"), Some("a\"b"));
    }

    #[test]
    fn mismatched_end_tag_is_rejected() {
        assert!(matches!(
            parse("<A><B></A></B>"),
            Err(XmlError::Unbalanced(_) | XmlError::Syntax { .. })
        ));
    }

    #[test]
    fn unclosed_document_is_rejected() {
        assert!(parse("<A><B>").is_err());
    }

    #[test]
    fn deep_nesting_is_refused() {
        let xml = "<A>".repeat(MAX_DEPTH + 1) + &"</A>".repeat(MAX_DEPTH + 1);

        assert_eq!(parse(&xml), Err(XmlError::TooDeep));
    }
}
