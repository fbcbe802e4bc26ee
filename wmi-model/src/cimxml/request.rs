//! Reading a CIM-XML request message into a [`Request`].

use crate::cimxml::dom::{self, Element, XmlError};
use crate::instance::{Instance, Property};
use crate::path::{KeyValue, ObjectPath};
use crate::value::{CimType, CimValue, Scalar};

/// How deep embedded instances may nest inside each other.
const MAX_EMBEDDING: usize = 4;

/// Why a request is not a valid CIM-XML request; each maps onto DSP0200's `CIMError` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// Not well-formed XML (`request-not-well-formed`).
    #[error("request not well-formed: {0}")]
    NotWellFormed(#[from] XmlError),
    /// Well-formed but not a valid CIM-XML request (`request-not-valid`).
    #[error("request not valid: {0}")]
    NotValid(String),
    /// `DTDVERSION` other than 2.x (`unsupported-dtd-version`).
    #[error("unsupported DTD version {0}")]
    UnsupportedDtdVersion(String),
    /// `PROTOCOLVERSION` other than 1.x (`unsupported-protocol-version`).
    #[error("unsupported protocol version {0}")]
    UnsupportedProtocolVersion(String),
    /// A `MULTIREQ` (`multiple-requests-unsupported`).
    #[error("multiple requests are not supported")]
    MultipleRequests,
}

impl ProtocolError {
    /// The DSP0200 `CIMError` header value.
    pub fn header(&self) -> &'static str {
        match self {
            ProtocolError::NotWellFormed(_) => "request-not-well-formed",
            ProtocolError::NotValid(_) => "request-not-valid",
            ProtocolError::UnsupportedDtdVersion(_) => "unsupported-dtd-version",
            ProtocolError::UnsupportedProtocolVersion(_) => "unsupported-protocol-version",
            ProtocolError::MultipleRequests => "multiple-requests-unsupported",
        }
    }
}

fn invalid(message: impl Into<String>) -> ProtocolError {
    ProtocolError::NotValid(message.into())
}

/// One CIM-XML request message.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// `MESSAGE ID`, echoed in the response.
    pub message_id: String,
    /// The call.
    pub call: Call,
}

/// An intrinsic operation (`IMETHODCALL`) or an extrinsic method (`METHODCALL`).
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    /// `IMETHODCALL`.
    Intrinsic {
        /// The namespace, slash-separated.
        namespace: String,
        /// The operation (`EnumerateInstances`, …).
        name: String,
        /// `IPARAMVALUE`s in order.
        params: Vec<(String, IParam)>,
    },
    /// `METHODCALL`.
    Extrinsic {
        /// The target: an instance path or a class path (no keys), with its namespace.
        target: ObjectPath,
        /// The method.
        method: String,
        /// `PARAMVALUE`s in order.
        params: Vec<(String, Arg)>,
    },
}

/// An `IPARAMVALUE`'s content.
#[derive(Debug, Clone, PartialEq)]
pub enum IParam {
    /// `CLASSNAME`.
    ClassName(String),
    /// `INSTANCENAME`.
    InstanceName(ObjectPath),
    /// `VALUE`.
    Value(String),
    /// `VALUE.ARRAY`.
    ValueArray(Vec<String>),
    /// `INSTANCE` (CreateInstance's `NewInstance`).
    Instance(Instance),
    /// `VALUE.NAMEDINSTANCE` (ModifyInstance).
    NamedInstance(ObjectPath, Instance),
    /// Empty: NULL.
    Null,
}

/// A `PARAMVALUE`: its declared type (if sent) and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Arg {
    /// `PARAMTYPE`, when the client sent one it understood.
    pub paramtype: Option<CimType>,
    /// `PARAMTYPE` as sent, when not understood.
    pub unknown_type: Option<String>,
    /// `EmbeddedObject` was given.
    pub embedded: bool,
    /// The value.
    pub value: ArgValue,
}

/// A `PARAMVALUE`'s content.
#[derive(Debug, Clone, PartialEq)]
pub enum ArgValue {
    /// `VALUE`.
    Value(String),
    /// `VALUE.ARRAY`.
    Array(Vec<String>),
    /// `VALUE.REFERENCE`.
    Reference(ObjectPath),
    /// `VALUE.REFARRAY`.
    RefArray(Vec<ObjectPath>),
    /// Nothing: NULL.
    Null,
}

/// Parses a request body.
pub fn parse_request(xml: &str) -> Result<Request, ProtocolError> {
    let root = dom::parse(xml)?;
    if root.name != "CIM" {
        return Err(invalid("root element is not CIM"));
    }
    let dtd = root.attr("DTDVERSION").unwrap_or("2.0");
    if !dtd.starts_with("2.") {
        return Err(ProtocolError::UnsupportedDtdVersion(dtd.to_owned()));
    }
    let message = root.child("MESSAGE").ok_or_else(|| invalid("no MESSAGE"))?;
    let protocol = message.attr("PROTOCOLVERSION").unwrap_or("1.0");
    if !protocol.starts_with("1.") {
        return Err(ProtocolError::UnsupportedProtocolVersion(
            protocol.to_owned(),
        ));
    }
    let message_id = message
        .attr("ID")
        .ok_or_else(|| invalid("MESSAGE has no ID"))?
        .to_owned();
    if message.child("MULTIREQ").is_some() {
        return Err(ProtocolError::MultipleRequests);
    }
    let simple = message
        .child("SIMPLEREQ")
        .ok_or_else(|| invalid("no SIMPLEREQ"))?;
    let call = if let Some(call) = simple.child("IMETHODCALL") {
        intrinsic(call)?
    } else if let Some(call) = simple.child("METHODCALL") {
        extrinsic(call)?
    } else {
        return Err(invalid(
            "SIMPLEREQ holds neither IMETHODCALL nor METHODCALL",
        ));
    };
    Ok(Request { message_id, call })
}

fn name_attr(element: &Element) -> Result<String, ProtocolError> {
    element
        .attr("NAME")
        .map(str::to_owned)
        .ok_or_else(|| invalid(format!("{} has no NAME", element.name)))
}

fn intrinsic(call: &Element) -> Result<Call, ProtocolError> {
    let name = name_attr(call)?;
    let namespace = local_namespace(
        call.child("LOCALNAMESPACEPATH")
            .ok_or_else(|| invalid("IMETHODCALL has no LOCALNAMESPACEPATH"))?,
    )?;
    let mut params = Vec::new();
    for param in call.children_named("IPARAMVALUE") {
        let value = match param.children.first() {
            None => IParam::Null,
            Some(child) => match child.name.as_str() {
                "CLASSNAME" => IParam::ClassName(name_attr(child)?),
                "INSTANCENAME" => IParam::InstanceName(instance_name(child)?),
                "VALUE" => IParam::Value(child.text.clone()),
                "VALUE.ARRAY" => IParam::ValueArray(
                    child
                        .children_named("VALUE")
                        .map(|v| v.text.clone())
                        .collect(),
                ),
                "INSTANCE" => IParam::Instance(instance(child, 0)?),
                "VALUE.NAMEDINSTANCE" => {
                    let name = child
                        .child("INSTANCENAME")
                        .ok_or_else(|| invalid("VALUE.NAMEDINSTANCE has no INSTANCENAME"))?;
                    let body = child
                        .child("INSTANCE")
                        .ok_or_else(|| invalid("VALUE.NAMEDINSTANCE has no INSTANCE"))?;
                    IParam::NamedInstance(instance_name(name)?, instance(body, 0)?)
                }
                "VALUE.REFERENCE" => IParam::InstanceName(reference(child)?),
                other => return Err(invalid(format!("unexpected {other} in IPARAMVALUE"))),
            },
        };
        params.push((name_attr(param)?, value));
    }
    Ok(Call::Intrinsic {
        namespace,
        name,
        params,
    })
}

fn extrinsic(call: &Element) -> Result<Call, ProtocolError> {
    let method = name_attr(call)?;
    let target = if let Some(path) = call.child("LOCALINSTANCEPATH") {
        let mut target = instance_name(
            path.child("INSTANCENAME")
                .ok_or_else(|| invalid("LOCALINSTANCEPATH has no INSTANCENAME"))?,
        )?;
        target.namespace = Some(local_namespace(
            path.child("LOCALNAMESPACEPATH")
                .ok_or_else(|| invalid("LOCALINSTANCEPATH has no LOCALNAMESPACEPATH"))?,
        )?);
        target
    } else if let Some(path) = call.child("LOCALCLASSPATH") {
        let class = path
            .child("CLASSNAME")
            .ok_or_else(|| invalid("LOCALCLASSPATH has no CLASSNAME"))?;
        ObjectPath {
            namespace: Some(local_namespace(
                path.child("LOCALNAMESPACEPATH")
                    .ok_or_else(|| invalid("LOCALCLASSPATH has no LOCALNAMESPACEPATH"))?,
            )?),
            class: name_attr(class)?,
            ..ObjectPath::default()
        }
    } else {
        return Err(invalid(
            "METHODCALL has no LOCALINSTANCEPATH or LOCALCLASSPATH",
        ));
    };
    let mut params = Vec::new();
    for param in call.children_named("PARAMVALUE") {
        let declared = param.attr("PARAMTYPE");
        let value = match param.children.first() {
            None => ArgValue::Null,
            Some(child) => match child.name.as_str() {
                "VALUE" => ArgValue::Value(child.text.clone()),
                "VALUE.ARRAY" => ArgValue::Array(
                    child
                        .children_named("VALUE")
                        .map(|v| v.text.clone())
                        .collect(),
                ),
                "VALUE.REFERENCE" => ArgValue::Reference(reference(child)?),
                "VALUE.REFARRAY" => ArgValue::RefArray(
                    child
                        .children_named("VALUE.REFERENCE")
                        .map(reference)
                        .collect::<Result<_, _>>()?,
                ),
                "INSTANCENAME" => ArgValue::Reference(instance_name(child)?),
                other => return Err(invalid(format!("unexpected {other} in PARAMVALUE"))),
            },
        };
        params.push((
            name_attr(param)?,
            Arg {
                paramtype: declared.and_then(CimType::from_name),
                unknown_type: declared
                    .filter(|t| CimType::from_name(t).is_none())
                    .map(str::to_owned),
                embedded: param.attr("EmbeddedObject").is_some(),
                value,
            },
        ));
    }
    Ok(Call::Extrinsic {
        target,
        method,
        params,
    })
}

fn local_namespace(element: &Element) -> Result<String, ProtocolError> {
    let parts: Vec<String> = element
        .children_named("NAMESPACE")
        .map(name_attr)
        .collect::<Result<_, _>>()?;
    if parts.is_empty() {
        return Err(invalid("LOCALNAMESPACEPATH has no NAMESPACE"));
    }
    Ok(parts.join("/"))
}

/// `INSTANCENAME`: class and key bindings.
fn instance_name(element: &Element) -> Result<ObjectPath, ProtocolError> {
    let class = element
        .attr("CLASSNAME")
        .ok_or_else(|| invalid("INSTANCENAME has no CLASSNAME"))?;
    let mut path = ObjectPath {
        class: class.to_owned(),
        ..ObjectPath::default()
    };
    for binding in element.children_named("KEYBINDING") {
        let name = name_attr(binding)?;
        let value = match binding.children.first() {
            Some(kv) if kv.name == "KEYVALUE" => key_value(kv),
            Some(r) if r.name == "VALUE.REFERENCE" => KeyValue::Reference(Box::new(reference(r)?)),
            _ => {
                return Err(invalid(
                    "KEYBINDING holds neither KEYVALUE nor VALUE.REFERENCE",
                ));
            }
        };
        path.keys.push((name, value));
    }
    Ok(path)
}

fn key_value(element: &Element) -> KeyValue {
    match element.attr("VALUETYPE").unwrap_or("string") {
        t if t.eq_ignore_ascii_case("numeric") => KeyValue::Number(element.text.trim().to_owned()),
        t if t.eq_ignore_ascii_case("boolean") => {
            KeyValue::Boolean(element.text.trim().eq_ignore_ascii_case("true"))
        }
        _ => KeyValue::String(element.text.clone()),
    }
}

/// `VALUE.REFERENCE`: any of the six path forms.
fn reference(element: &Element) -> Result<ObjectPath, ProtocolError> {
    let inner = element
        .children
        .first()
        .ok_or_else(|| invalid("empty VALUE.REFERENCE"))?;
    path_element(inner)
}

fn path_element(inner: &Element) -> Result<ObjectPath, ProtocolError> {
    match inner.name.as_str() {
        "INSTANCENAME" => instance_name(inner),
        "LOCALINSTANCEPATH" | "INSTANCEPATH" => {
            let mut path = instance_name(
                inner
                    .child("INSTANCENAME")
                    .ok_or_else(|| invalid("instance path has no INSTANCENAME"))?,
            )?;
            if let Some(ns) = inner.child("LOCALNAMESPACEPATH") {
                path.namespace = Some(local_namespace(ns)?);
            }
            if let Some(ns) = inner.child("NAMESPACEPATH") {
                path.host = ns.child("HOST").map(|h| h.text.clone());
                if let Some(local) = ns.child("LOCALNAMESPACEPATH") {
                    path.namespace = Some(local_namespace(local)?);
                }
            }
            Ok(path)
        }
        "CLASSNAME" => Ok(ObjectPath {
            class: name_attr(inner)?,
            ..ObjectPath::default()
        }),
        "LOCALCLASSPATH" | "CLASSPATH" => {
            let class = inner
                .child("CLASSNAME")
                .ok_or_else(|| invalid("class path has no CLASSNAME"))?;
            Ok(ObjectPath {
                class: name_attr(class)?,
                ..ObjectPath::default()
            })
        }
        other => Err(invalid(format!("unexpected {other} in VALUE.REFERENCE"))),
    }
}

/// Parses an embedded instance: the text of a string parameter that holds an `INSTANCE`
/// (optionally inside `VALUE.OBJECT`, `VALUE.INSTANCEWITHPATH` or `VALUE.NAMEDINSTANCE`).
pub fn parse_instance(xml: &str) -> Result<Instance, ProtocolError> {
    parse_instance_at(xml, 0)
}

fn parse_instance_at(xml: &str, depth: usize) -> Result<Instance, ProtocolError> {
    if depth > MAX_EMBEDDING {
        return Err(invalid("embedded instances nest too deeply"));
    }
    let root = dom::parse(xml.trim())?;
    // pywbem renders an instance that has a path as VALUE.INSTANCEWITHPATH.
    let element = match root.name.as_str() {
        "VALUE.OBJECT"
        | "VALUE.INSTANCEWITHPATH"
        | "VALUE.NAMEDINSTANCE"
        | "VALUE.OBJECTWITHPATH" => root
            .child("INSTANCE")
            .ok_or_else(|| invalid(format!("{} holds no INSTANCE", root.name)))?,
        _ => &root,
    };
    if element.name != "INSTANCE" {
        return Err(invalid(format!(
            "expected INSTANCE, found {}",
            element.name
        )));
    }
    instance(element, depth)
}

fn instance(element: &Element, depth: usize) -> Result<Instance, ProtocolError> {
    let class = element
        .attr("CLASSNAME")
        .ok_or_else(|| invalid("INSTANCE has no CLASSNAME"))?;
    let mut result = Instance::new(class);
    for property in &element.children {
        let name = match property.name.as_str() {
            "PROPERTY" | "PROPERTY.ARRAY" | "PROPERTY.REFERENCE" => name_attr(property)?,
            "QUALIFIER" => continue,
            other => return Err(invalid(format!("unexpected {other} in INSTANCE"))),
        };
        let embedded = property.attr("EmbeddedObject").is_some();
        let ty = match property.name.as_str() {
            "PROPERTY.REFERENCE" => CimType::Reference,
            _ => property
                .attr("TYPE")
                .and_then(CimType::from_name)
                .unwrap_or(CimType::String),
        };
        let value = match property.name.as_str() {
            "PROPERTY.REFERENCE" => property
                .child("VALUE.REFERENCE")
                .map(reference)
                .transpose()?
                .map(CimValue::reference),
            "PROPERTY.ARRAY" => property
                .child("VALUE.ARRAY")
                .map(|array| {
                    array
                        .children_named("VALUE")
                        .map(|v| scalar(&v.text, ty, embedded, depth))
                        .collect::<Result<Vec<_>, _>>()
                        .map(CimValue::Array)
                })
                .transpose()?,
            _ => property
                .child("VALUE")
                .map(|v| scalar(&v.text, ty, embedded, depth).map(CimValue::Scalar))
                .transpose()?,
        };
        result.properties.push(Property {
            name,
            ty,
            array: property.name == "PROPERTY.ARRAY",
            embedded,
            value,
        });
    }
    Ok(result)
}

/// A `VALUE`'s text as a scalar of `ty`.
fn scalar(text: &str, ty: CimType, embedded: bool, depth: usize) -> Result<Scalar, ProtocolError> {
    Ok(match ty {
        CimType::Boolean => match text.trim() {
            t if t.eq_ignore_ascii_case("true") => Scalar::Boolean(true),
            t if t.eq_ignore_ascii_case("false") => Scalar::Boolean(false),
            other => return Err(invalid(format!("'{other}' is not a boolean"))),
        },
        t if t.is_integer() => {
            let value: i128 = text
                .trim()
                .parse()
                .map_err(|_| invalid(format!("'{text}' is not a {t}")))?;
            match t.range() {
                Some((low, high)) if value < low || value > high => {
                    return Err(invalid(format!("{value} is out of range for {t}")));
                }
                _ => Scalar::Integer(value),
            }
        }
        CimType::Datetime => Scalar::Datetime(text.trim().to_owned()),
        CimType::String if embedded && text.trim_start().starts_with('<') => {
            Scalar::Instance(Box::new(parse_instance_at(text, depth + 1)?))
        }
        _ => Scalar::String(text.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = r#"<LOCALNAMESPACEPATH><NAMESPACE NAME="root"/><NAMESPACE NAME="virtualization"/><NAMESPACE NAME="v2"/></LOCALNAMESPACEPATH>"#;

    fn wrap(body: &str) -> String {
        format!(
            r#"<?xml version="1.0" encoding="utf-8" ?><CIM CIMVERSION="2.0" DTDVERSION="2.0"><MESSAGE ID="1001" PROTOCOLVERSION="1.0"><SIMPLEREQ>{body}</SIMPLEREQ></MESSAGE></CIM>"#
        )
    }

    #[test]
    fn enumerate_instances_request_is_read() {
        let xml = wrap(&format!(
            r#"<IMETHODCALL NAME="EnumerateInstances">{NS}<IPARAMVALUE NAME="ClassName"><CLASSNAME NAME="Msvm_ComputerSystem"/></IPARAMVALUE></IMETHODCALL>"#
        ));

        let request = parse_request(&xml).expect("valid");

        assert_eq!(request.message_id, "1001");
        assert_eq!(
            request.call,
            Call::Intrinsic {
                namespace: "root/virtualization/v2".into(),
                name: "EnumerateInstances".into(),
                params: vec![(
                    "ClassName".into(),
                    IParam::ClassName("Msvm_ComputerSystem".into())
                )],
            }
        );
    }

    #[test]
    fn embedded_instance_parameter_is_parsed_from_escaped_xml() {
        let xml = wrap(&format!(
            r#"<METHODCALL NAME="DefineSystem"><LOCALCLASSPATH>{NS}<CLASSNAME NAME="Msvm_VirtualSystemManagementService"/></LOCALCLASSPATH><PARAMVALUE NAME="SystemSettings" PARAMTYPE="string" EmbeddedObject="instance"><VALUE>&lt;INSTANCE CLASSNAME="Msvm_VirtualSystemSettingData"&gt;&lt;PROPERTY NAME="ElementName" TYPE="string"&gt;&lt;VALUE&gt;vm1&lt;/VALUE&gt;&lt;/PROPERTY&gt;&lt;/INSTANCE&gt;</VALUE></PARAMVALUE></METHODCALL>"#
        ));

        let request = parse_request(&xml).expect("valid");
        let Call::Extrinsic { params, .. } = request.call else {
            panic!("extrinsic expected");
        };
        let ArgValue::Value(text) = &params[0].1.value else {
            panic!("value expected");
        };
        let instance = parse_instance(text).expect("embedded instance");

        assert_eq!(instance.class, "Msvm_VirtualSystemSettingData");
        assert_eq!(instance.get_str("ElementName"), Some("vm1"));
    }

    #[test]
    fn multireq_is_refused() {
        let xml = r#"<CIM CIMVERSION="2.0" DTDVERSION="2.0"><MESSAGE ID="1" PROTOCOLVERSION="1.0"><MULTIREQ/></MESSAGE></CIM>"#;

        assert_eq!(parse_request(xml), Err(ProtocolError::MultipleRequests));
    }

    #[test]
    fn out_of_range_integer_in_instance_is_invalid() {
        let xml = r#"<INSTANCE CLASSNAME="X"><PROPERTY NAME="P" TYPE="uint8"><VALUE>300</VALUE></PROPERTY></INSTANCE>"#;

        assert!(matches!(
            parse_instance(xml),
            Err(ProtocolError::NotValid(_))
        ));
    }
}
