//! Checking and converting a method call's `PARAMVALUE`s against the method's declaration.

use std::collections::HashMap;

use crate::cimxml::{Arg, ArgValue, parse_instance};
use crate::error::{CimError, CimResult, CimStatus};
use crate::instance::Instance;
use crate::path::ObjectPath;
use crate::schema::{MethodDecl, ParamDecl};
use crate::value::CimType;

/// A parameter value converted to its declared type.
#[derive(Debug, Clone, PartialEq)]
pub enum TypedArg {
    /// NULL.
    Null,
    /// An integer.
    Integer(i128),
    /// A string.
    String(String),
    /// A boolean.
    Boolean(bool),
    /// A reference.
    Reference(ObjectPath),
    /// An embedded instance.
    Instance(Instance),
    /// An array of integers.
    Integers(Vec<i128>),
    /// An array of strings.
    Strings(Vec<String>),
    /// An array of references.
    References(Vec<ObjectPath>),
    /// An array of embedded instances.
    Instances(Vec<Instance>),
}

/// A method call's input parameters, checked against the declaration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Args(HashMap<String, TypedArg>);

fn bad(message: impl Into<String>) -> CimError {
    CimError::new(CimStatus::InvalidParameter, message)
}

impl Args {
    /// Converts `params` by `method`'s declaration: unknown names, output-only parameters,
    /// wrong `PARAMTYPE`s and unconvertible values are `CIM_ERR_INVALID_PARAMETER`.
    pub fn check(method: &MethodDecl, params: &[(String, Arg)]) -> CimResult<Self> {
        let mut out = HashMap::new();
        for (name, arg) in params {
            let decl = method
                .param(name)
                .filter(|p| p.input)
                .ok_or_else(|| bad(format!("{} has no input parameter {name}", method.name)))?;
            out.insert(decl.name.to_ascii_lowercase(), convert(decl, arg)?);
        }
        Ok(Args(out))
    }

    /// A parameter's value; NULL when not given.
    pub fn get(&self, name: &str) -> &TypedArg {
        self.0
            .get(&name.to_ascii_lowercase())
            .unwrap_or(&TypedArg::Null)
    }
}

fn convert(decl: &ParamDecl, arg: &Arg) -> CimResult<TypedArg> {
    if let Some(sent) = &arg.unknown_type {
        return Err(bad(format!(
            "{}: incorrect data type {sent} (declared {})",
            decl.name, decl.ty
        )));
    }
    if let Some(sent) = arg.paramtype {
        let compatible = sent == decl.ty
            || (sent.is_integer() && decl.ty.is_integer())
            // Embedded instances travel as strings with EmbeddedObject.
            || (sent == CimType::String && decl.ty == CimType::Datetime);
        if !compatible {
            return Err(bad(format!(
                "{}: incorrect data type {sent} (declared {})",
                decl.name, decl.ty
            )));
        }
    }
    let value = match (&arg.value, decl.array) {
        (ArgValue::Null, _) => TypedArg::Null,
        (ArgValue::Value(text), false) => scalar(decl, text)?,
        (ArgValue::Array(items), true) => {
            let converted = items
                .iter()
                .map(|t| scalar(decl, t))
                .collect::<CimResult<Vec<_>>>()?;
            collect(decl, converted)?
        }
        (ArgValue::Reference(path), false) if decl.ty == CimType::Reference => {
            TypedArg::Reference(path.clone())
        }
        (ArgValue::RefArray(paths), true) if decl.ty == CimType::Reference => {
            TypedArg::References(paths.clone())
        }
        // A single value where an array is declared: an array of one (as WMI accepts).
        (ArgValue::Value(text), true) => collect(decl, vec![scalar(decl, text)?])?,
        (ArgValue::Reference(path), true) if decl.ty == CimType::Reference => {
            TypedArg::References(vec![path.clone()])
        }
        _ => {
            return Err(bad(format!(
                "{}: incorrect data type (declared {}{})",
                decl.name,
                decl.ty,
                if decl.array { "[]" } else { "" }
            )));
        }
    };
    Ok(value)
}

fn scalar(decl: &ParamDecl, text: &str) -> CimResult<TypedArg> {
    let wrong = || {
        bad(format!(
            "{}: '{text}' is not a valid {}",
            decl.name, decl.ty
        ))
    };
    Ok(match decl.ty {
        t if t.is_integer() => {
            let value: i128 = text.trim().parse().map_err(|_| wrong())?;
            let (low, high) = t.range().ok_or_else(wrong)?;
            if value < low || value > high {
                return Err(wrong());
            }
            TypedArg::Integer(value)
        }
        CimType::Boolean => match text.trim() {
            t if t.eq_ignore_ascii_case("true") => TypedArg::Boolean(true),
            t if t.eq_ignore_ascii_case("false") => TypedArg::Boolean(false),
            _ => return Err(wrong()),
        },
        CimType::Reference => TypedArg::Reference(ObjectPath::parse(text).map_err(|_| wrong())?),
        CimType::String if decl.embedded.is_some() => {
            if text.trim().is_empty() {
                TypedArg::Null
            } else {
                TypedArg::Instance(
                    parse_instance(text).map_err(|e| {
                        bad(format!("{}: not an embedded instance: {e}", decl.name))
                    })?,
                )
            }
        }
        _ => TypedArg::String(text.to_owned()),
    })
}

fn collect(decl: &ParamDecl, items: Vec<TypedArg>) -> CimResult<TypedArg> {
    let mismatch = || bad(format!("{}: mixed array", decl.name));
    Ok(match decl.ty {
        t if t.is_integer() => TypedArg::Integers(
            items
                .into_iter()
                .map(|i| match i {
                    TypedArg::Integer(v) => Ok(v),
                    _ => Err(mismatch()),
                })
                .collect::<CimResult<_>>()?,
        ),
        CimType::Reference => TypedArg::References(
            items
                .into_iter()
                .map(|i| match i {
                    TypedArg::Reference(p) => Ok(p),
                    _ => Err(mismatch()),
                })
                .collect::<CimResult<_>>()?,
        ),
        CimType::String if decl.embedded.is_some() => TypedArg::Instances(
            items
                .into_iter()
                .filter(|i| *i != TypedArg::Null)
                .map(|i| match i {
                    TypedArg::Instance(p) => Ok(p),
                    _ => Err(mismatch()),
                })
                .collect::<CimResult<_>>()?,
        ),
        _ => TypedArg::Strings(
            items
                .into_iter()
                .map(|i| match i {
                    TypedArg::String(s) => Ok(s),
                    _ => Err(mismatch()),
                })
                .collect::<CimResult<_>>()?,
        ),
    })
}
