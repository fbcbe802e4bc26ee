//! Writing CIM-XML responses (and the export requests that carry indications).

use std::fmt::Write as _;

use crate::cimxml::dom::escape;
use crate::error::CimError;
use crate::instance::Instance;
use crate::path::{KeyValue, ObjectPath};
use crate::schema::{ClassDecl, MethodDecl, ParamDecl, PropertyDecl};
use crate::value::{CimType, CimValue, Scalar};

/// What an intrinsic operation returns inside `IRETURNVALUE`.
#[derive(Debug, Clone, PartialEq)]
pub enum IReturn {
    /// Nothing (DeleteInstance, ModifyInstance).
    Nothing,
    /// `VALUE.NAMEDINSTANCE`s (EnumerateInstances).
    NamedInstances(Vec<(ObjectPath, Instance)>),
    /// `INSTANCENAME`s (EnumerateInstanceNames, CreateInstance).
    InstanceNames(Vec<ObjectPath>),
    /// One `INSTANCE` (GetInstance).
    Instance(Instance),
    /// `CLASS`es (GetClass, EnumerateClasses).
    Classes(Vec<&'static ClassDecl>),
    /// `CLASSNAME`s (EnumerateClassNames).
    ClassNames(Vec<&'static str>),
    /// `VALUE.OBJECTWITHPATH`s (ExecQuery, Associators, References).
    ObjectsWithPath(Vec<(ObjectPath, Instance)>),
    /// `OBJECTPATH`s (AssociatorNames, ReferenceNames).
    ObjectPaths(Vec<ObjectPath>),
    /// `VALUE.OBJECTWITHPATH`s holding classes (`ASSOCIATORS OF … ClassDefsOnly`).
    ClassesWithPath(Vec<&'static ClassDecl>),
}

/// One output parameter of an extrinsic method.
#[derive(Debug, Clone, PartialEq)]
pub enum OutValue {
    /// A reference (`PARAMTYPE="reference"`).
    Reference(ObjectPath),
    /// An array of references.
    RefArray(Vec<ObjectPath>),
    /// An array of embedded instances (`EmbeddedObject="instance"`).
    EmbeddedArray(Vec<Instance>),
}

/// An extrinsic method's result: `ReturnValue` and output parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodOutput {
    /// `ReturnValue` (uint32).
    pub return_value: u32,
    /// Output parameters by name.
    pub outputs: Vec<(&'static str, OutValue)>,
}

/// Where the server lives, for absolute paths (`INSTANCEPATH`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin<'a> {
    pub(crate) host: &'a str,
    pub(crate) namespace: &'a str,
}

fn envelope(message_id: &str, body: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="utf-8" ?><CIM CIMVERSION="2.0" DTDVERSION="2.0"><MESSAGE ID="{}" PROTOCOLVERSION="1.0"><SIMPLERSP>{body}</SIMPLERSP></MESSAGE></CIM>"#,
        escape(message_id)
    )
}

fn error_xml(out: &mut String, error: &CimError) {
    let _ = write!(
        out,
        r#"<ERROR CODE="{}" DESCRIPTION="{}"/>"#,
        error.status.code(),
        escape(&error.to_string())
    );
}

/// A complete `IMETHODRESPONSE` message.
pub fn imethod_response(
    message_id: &str,
    name: &str,
    host: &str,
    namespace: &str,
    result: &Result<IReturn, CimError>,
) -> String {
    let origin = Origin { host, namespace };
    let mut body = format!(r#"<IMETHODRESPONSE NAME="{}">"#, escape(name));
    match result {
        Err(error) => error_xml(&mut body, error),
        Ok(IReturn::Nothing) => {}
        Ok(value) => {
            body.push_str("<IRETURNVALUE>");
            ireturn(&mut body, value, origin);
            body.push_str("</IRETURNVALUE>");
        }
    }
    body.push_str("</IMETHODRESPONSE>");
    envelope(message_id, &body)
}

fn ireturn(out: &mut String, value: &IReturn, origin: Origin<'_>) {
    match value {
        IReturn::Nothing => {}
        IReturn::NamedInstances(list) => {
            for (path, instance) in list {
                out.push_str("<VALUE.NAMEDINSTANCE>");
                instance_name(out, path);
                instance_xml(out, instance, origin);
                out.push_str("</VALUE.NAMEDINSTANCE>");
            }
        }
        IReturn::InstanceNames(list) => list.iter().for_each(|p| instance_name(out, p)),
        IReturn::Instance(instance) => instance_xml(out, instance, origin),
        IReturn::Classes(list) => list.iter().for_each(|c| class_xml(out, c)),
        IReturn::ClassNames(list) => {
            for name in list {
                let _ = write!(out, r#"<CLASSNAME NAME="{name}"/>"#);
            }
        }
        IReturn::ObjectsWithPath(list) => {
            for (path, instance) in list {
                out.push_str("<VALUE.OBJECTWITHPATH>");
                instance_path(out, path, origin);
                instance_xml(out, instance, origin);
                out.push_str("</VALUE.OBJECTWITHPATH>");
            }
        }
        IReturn::ClassesWithPath(list) => {
            for class in list {
                let _ = write!(
                    out,
                    "<VALUE.OBJECTWITHPATH><CLASSPATH><NAMESPACEPATH><HOST>{}</HOST>",
                    escape(origin.host)
                );
                local_namespace(out, origin.namespace);
                let _ = write!(
                    out,
                    r#"</NAMESPACEPATH><CLASSNAME NAME="{}"/></CLASSPATH>"#,
                    class.name
                );
                class_xml(out, class);
                out.push_str("</VALUE.OBJECTWITHPATH>");
            }
        }
        IReturn::ObjectPaths(list) => {
            for path in list {
                out.push_str("<OBJECTPATH>");
                instance_path(out, path, origin);
                out.push_str("</OBJECTPATH>");
            }
        }
    }
}

/// A complete `METHODRESPONSE` message.
pub fn method_response(
    message_id: &str,
    name: &str,
    host: &str,
    namespace: &str,
    result: &Result<MethodOutput, CimError>,
) -> String {
    let origin = Origin { host, namespace };
    let mut body = format!(r#"<METHODRESPONSE NAME="{}">"#, escape(name));
    match result {
        Err(error) => error_xml(&mut body, error),
        Ok(output) => {
            let _ = write!(
                body,
                r#"<RETURNVALUE PARAMTYPE="uint32"><VALUE>{}</VALUE></RETURNVALUE>"#,
                output.return_value
            );
            for (param, value) in &output.outputs {
                match value {
                    OutValue::Reference(path) => {
                        let _ =
                            write!(body, r#"<PARAMVALUE NAME="{param}" PARAMTYPE="reference">"#);
                        value_reference(&mut body, path, origin);
                    }
                    OutValue::RefArray(paths) => {
                        let _ = write!(
                            body,
                            r#"<PARAMVALUE NAME="{param}" PARAMTYPE="reference"><VALUE.REFARRAY>"#
                        );
                        paths
                            .iter()
                            .for_each(|p| value_reference(&mut body, p, origin));
                        body.push_str("</VALUE.REFARRAY>");
                    }
                    OutValue::EmbeddedArray(instances) => {
                        let _ = write!(
                            body,
                            r#"<PARAMVALUE NAME="{param}" PARAMTYPE="string" EmbeddedObject="instance"><VALUE.ARRAY>"#
                        );
                        for instance in instances {
                            let mut inner = String::new();
                            instance_xml(&mut inner, instance, origin);
                            let _ = write!(body, "<VALUE>{}</VALUE>", escape(&inner));
                        }
                        body.push_str("</VALUE.ARRAY>");
                    }
                }
                body.push_str("</PARAMVALUE>");
            }
        }
    }
    body.push_str("</METHODRESPONSE>");
    envelope(message_id, &body)
}

/// An `ExportIndication` request (`SIMPLEEXPREQ`) carrying `indication`.
pub fn export_indication(
    message_id: &str,
    host: &str,
    namespace: &str,
    indication: &Instance,
) -> String {
    let origin = Origin { host, namespace };
    let mut body = String::from(
        r#"<EXPMETHODCALL NAME="ExportIndication"><EXPPARAMVALUE NAME="NewIndication">"#,
    );
    instance_xml(&mut body, indication, origin);
    body.push_str("</EXPPARAMVALUE></EXPMETHODCALL>");
    format!(
        r#"<?xml version="1.0" encoding="utf-8" ?><CIM CIMVERSION="2.0" DTDVERSION="2.0"><MESSAGE ID="{}" PROTOCOLVERSION="1.0"><SIMPLEEXPREQ>{body}</SIMPLEEXPREQ></MESSAGE></CIM>"#,
        escape(message_id)
    )
}

fn local_namespace(out: &mut String, namespace: &str) {
    out.push_str("<LOCALNAMESPACEPATH>");
    for part in namespace.split('/').filter(|p| !p.is_empty()) {
        let _ = write!(out, r#"<NAMESPACE NAME="{}"/>"#, escape(part));
    }
    out.push_str("</LOCALNAMESPACEPATH>");
}

fn instance_path(out: &mut String, path: &ObjectPath, origin: Origin<'_>) {
    let namespace = path.namespace.as_deref().unwrap_or(origin.namespace);
    let host = path.host.as_deref().unwrap_or(origin.host);
    let _ = write!(
        out,
        "<INSTANCEPATH><NAMESPACEPATH><HOST>{}</HOST>",
        escape(host)
    );
    local_namespace(out, namespace);
    out.push_str("</NAMESPACEPATH>");
    instance_name(out, path);
    out.push_str("</INSTANCEPATH>");
}

fn value_reference(out: &mut String, path: &ObjectPath, origin: Origin<'_>) {
    out.push_str("<VALUE.REFERENCE>");
    instance_path(out, path, origin);
    out.push_str("</VALUE.REFERENCE>");
}

pub(crate) fn instance_name(out: &mut String, path: &ObjectPath) {
    let _ = write!(out, r#"<INSTANCENAME CLASSNAME="{}">"#, escape(&path.class));
    for (name, value) in &path.keys {
        let _ = write!(out, r#"<KEYBINDING NAME="{}">"#, escape(name));
        match value {
            KeyValue::String(s) => {
                let _ = write!(
                    out,
                    r#"<KEYVALUE VALUETYPE="string">{}</KEYVALUE>"#,
                    escape(s)
                );
            }
            KeyValue::Number(n) => {
                let _ = write!(
                    out,
                    r#"<KEYVALUE VALUETYPE="numeric">{}</KEYVALUE>"#,
                    escape(n)
                );
            }
            KeyValue::Boolean(b) => {
                let text = if *b { "TRUE" } else { "FALSE" };
                let _ = write!(out, r#"<KEYVALUE VALUETYPE="boolean">{text}</KEYVALUE>"#);
            }
            KeyValue::Reference(p) => {
                out.push_str("<VALUE.REFERENCE>");
                instance_name(out, p);
                out.push_str("</VALUE.REFERENCE>");
            }
        }
        out.push_str("</KEYBINDING>");
    }
    out.push_str("</INSTANCENAME>");
}

pub(crate) fn instance_xml(out: &mut String, instance: &Instance, origin: Origin<'_>) {
    let _ = write!(out, r#"<INSTANCE CLASSNAME="{}">"#, escape(&instance.class));
    for p in &instance.properties {
        let name = escape(&p.name);
        if p.ty == CimType::Reference {
            let _ = write!(out, r#"<PROPERTY.REFERENCE NAME="{name}">"#);
            if let Some(CimValue::Scalar(Scalar::Reference(path))) = &p.value {
                value_reference(out, path, origin);
            }
            out.push_str("</PROPERTY.REFERENCE>");
            continue;
        }
        let embedded = if p.embedded {
            r#" EmbeddedObject="instance""#
        } else {
            ""
        };
        let element = if p.array {
            "PROPERTY.ARRAY"
        } else {
            "PROPERTY"
        };
        let _ = write!(
            out,
            r#"<{element} NAME="{name}" TYPE="{}"{embedded}>"#,
            p.ty
        );
        match &p.value {
            None => {}
            Some(CimValue::Scalar(s)) => scalar_xml(out, s, origin),
            Some(CimValue::Array(values)) => {
                out.push_str("<VALUE.ARRAY>");
                values.iter().for_each(|s| scalar_xml(out, s, origin));
                out.push_str("</VALUE.ARRAY>");
            }
        }
        let _ = write!(out, "</{element}>");
    }
    out.push_str("</INSTANCE>");
}

fn scalar_xml(out: &mut String, value: &Scalar, origin: Origin<'_>) {
    // Written in place: enumerations of thousands of instances spend their time here.
    out.push_str("<VALUE>");
    match value {
        Scalar::String(s) | Scalar::Datetime(s) => out.push_str(&escape(s)),
        Scalar::Integer(i) => {
            let _ = write!(out, "{i}");
        }
        Scalar::Boolean(b) => out.push_str(if *b { "TRUE" } else { "FALSE" }),
        Scalar::Instance(inner) => {
            let mut xml = String::new();
            instance_xml(&mut xml, inner, origin);
            out.push_str(&escape(&xml));
        }
        Scalar::Reference(path) => out.push_str(&escape(&path.to_string())),
    }
    out.push_str("</VALUE>");
}

fn qualifier(out: &mut String, name: &str, value: &str) {
    let _ = write!(
        out,
        r#"<QUALIFIER NAME="{name}" TYPE="string"><VALUE>{}</VALUE></QUALIFIER>"#,
        escape(value)
    );
}

fn flag(out: &mut String, name: &str) {
    let _ = write!(
        out,
        r#"<QUALIFIER NAME="{name}" TYPE="boolean"><VALUE>TRUE</VALUE></QUALIFIER>"#
    );
}

pub(crate) fn class_xml(out: &mut String, class: &ClassDecl) {
    let _ = write!(out, r#"<CLASS NAME="{}""#, class.name);
    if let Some(superclass) = class.superclass {
        let _ = write!(out, r#" SUPERCLASS="{superclass}""#);
    }
    out.push('>');
    if class.association {
        flag(out, "Association");
    }
    if class.indication {
        flag(out, "Indication");
    }
    qualifier(out, "Description", class.description);
    for p in &class.properties {
        property_decl(out, p, class.name);
    }
    for m in &class.methods {
        method_decl(out, m, class.name);
    }
    out.push_str("</CLASS>");
}

fn property_decl(out: &mut String, p: &PropertyDecl, origin: &str) {
    let (element, extra) = match (p.ty, p.array) {
        (CimType::Reference, _) => (
            "PROPERTY.REFERENCE",
            format!(
                r#" REFERENCECLASS="{}""#,
                p.ref_class.unwrap_or("CIM_ManagedElement")
            ),
        ),
        (ty, true) => ("PROPERTY.ARRAY", format!(r#" TYPE="{ty}""#)),
        (ty, false) => ("PROPERTY", format!(r#" TYPE="{ty}""#)),
    };
    let _ = write!(
        out,
        r#"<{element} NAME="{}"{extra} CLASSORIGIN="{origin}">"#,
        p.name
    );
    if p.key {
        flag(out, "Key");
    }
    if let Some(class) = p.embedded {
        qualifier(out, "EmbeddedInstance", class);
    }
    let _ = write!(out, "</{element}>");
}

fn method_decl(out: &mut String, m: &MethodDecl, origin: &str) {
    let _ = write!(
        out,
        r#"<METHOD NAME="{}" TYPE="uint32" CLASSORIGIN="{origin}">"#,
        m.name
    );
    for p in &m.params {
        param_decl(out, p);
    }
    out.push_str("</METHOD>");
}

fn param_decl(out: &mut String, p: &ParamDecl) {
    let (element, extra) = match (p.ty, p.array) {
        (CimType::Reference, false) => (
            "PARAMETER.REFERENCE",
            format!(
                r#" REFERENCECLASS="{}""#,
                p.ref_class.unwrap_or("CIM_ManagedElement")
            ),
        ),
        (CimType::Reference, true) => (
            "PARAMETER.REFARRAY",
            format!(
                r#" REFERENCECLASS="{}""#,
                p.ref_class.unwrap_or("CIM_ManagedElement")
            ),
        ),
        (ty, true) => ("PARAMETER.ARRAY", format!(r#" TYPE="{ty}""#)),
        (ty, false) => ("PARAMETER", format!(r#" TYPE="{ty}""#)),
    };
    let _ = write!(out, r#"<{element} NAME="{}"{extra}>"#, p.name);
    if p.input {
        flag(out, "IN");
    }
    if p.output {
        flag(out, "OUT");
    }
    if let Some(class) = p.embedded {
        qualifier(out, "EmbeddedInstance", class);
    }
    let _ = write!(out, "</{element}>");
}
