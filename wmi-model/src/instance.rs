//! CIM instances: a class name and typed, possibly null, properties.

use std::time::{Duration, SystemTime};

use crate::path::{KeyValue, ObjectPath};
use crate::value::{CimType, CimValue, Scalar, datetime, interval};

/// One property of an instance, with its CIM type.
#[derive(Debug, Clone, PartialEq)]
pub struct Property {
    /// The property name.
    pub name: String,
    /// Its CIM type.
    pub ty: CimType,
    /// Whether it is an array.
    pub array: bool,
    /// Whether a string property carries an embedded instance (`EmbeddedObject="instance"`).
    pub embedded: bool,
    /// The value; `None` is CIM NULL.
    pub value: Option<CimValue>,
}

/// A CIM instance.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Instance {
    /// The class name.
    pub class: String,
    /// Properties in declaration order.
    pub properties: Vec<Property>,
}

impl Instance {
    /// An instance of `class` with no properties yet.
    pub fn new(class: impl Into<String>) -> Self {
        Instance {
            class: class.into(),
            properties: Vec::new(),
        }
    }

    /// A property by name (any case).
    pub fn property(&self, name: &str) -> Option<&Property> {
        self.properties
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(name))
    }

    /// A property's value by name (any case); `None` when absent or NULL.
    pub fn get(&self, name: &str) -> Option<&CimValue> {
        self.property(name).and_then(|p| p.value.as_ref())
    }

    /// A string property's value.
    pub fn get_str(&self, name: &str) -> Option<&str> {
        self.get(name).and_then(CimValue::as_str)
    }

    /// An integer property's value.
    pub fn get_int(&self, name: &str) -> Option<i128> {
        self.get(name).and_then(CimValue::as_int)
    }

    /// The instance path built from the given key property names.
    pub fn path(&self, keys: &[&str]) -> ObjectPath {
        ObjectPath {
            host: None,
            namespace: None,
            class: self.class.clone(),
            keys: keys
                .iter()
                .filter_map(|k| {
                    let value = match self.get(k)? {
                        CimValue::Scalar(Scalar::String(s)) => KeyValue::String(s.clone()),
                        CimValue::Scalar(Scalar::Integer(i)) => KeyValue::Number(i.to_string()),
                        CimValue::Scalar(Scalar::Boolean(b)) => KeyValue::Boolean(*b),
                        CimValue::Scalar(Scalar::Reference(p)) => {
                            KeyValue::Reference(Box::new(p.clone()))
                        }
                        _ => return None,
                    };
                    Some(((*k).to_owned(), value))
                })
                .collect(),
        }
    }

    /// Keeps only the named properties (a `PropertyList` / SELECT list); names match any case.
    pub fn retain(&mut self, names: &[String]) {
        self.properties
            .retain(|p| names.iter().any(|n| n.eq_ignore_ascii_case(&p.name)));
    }

    fn push(mut self, name: &str, ty: CimType, array: bool, value: Option<CimValue>) -> Self {
        self.properties.push(Property {
            name: name.to_owned(),
            ty,
            array,
            embedded: false,
            value,
        });
        self
    }

    /// Adds a string property (NULL when `None`).
    pub fn string(self, name: &str, value: Option<impl Into<String>>) -> Self {
        self.push(name, CimType::String, false, value.map(CimValue::string))
    }

    /// Adds a string array property.
    pub fn strings(self, name: &str, values: Vec<String>) -> Self {
        let array = values.into_iter().map(Scalar::String).collect();
        self.push(name, CimType::String, true, Some(CimValue::Array(array)))
    }

    /// Adds an integer property of type `ty` (NULL when `None`).
    pub fn integer(self, name: &str, ty: CimType, value: Option<impl Into<i128>>) -> Self {
        self.push(name, ty, false, value.map(CimValue::int))
    }

    /// Adds an integer array property of type `ty`.
    pub fn integers(self, name: &str, ty: CimType, values: &[i128]) -> Self {
        let array = values.iter().copied().map(Scalar::Integer).collect();
        self.push(name, ty, true, Some(CimValue::Array(array)))
    }

    /// Adds a boolean property.
    pub fn boolean(self, name: &str, value: Option<bool>) -> Self {
        self.push(name, CimType::Boolean, false, value.map(CimValue::boolean))
    }

    /// Adds a datetime timestamp property.
    pub fn timestamp(self, name: &str, value: Option<SystemTime>) -> Self {
        let value = value.map(|t| CimValue::Scalar(Scalar::Datetime(datetime(t))));
        self.push(name, CimType::Datetime, false, value)
    }

    /// Adds a datetime interval property.
    pub fn interval(self, name: &str, value: Duration) -> Self {
        let value = Some(CimValue::Scalar(Scalar::Datetime(interval(value))));
        self.push(name, CimType::Datetime, false, value)
    }

    /// Adds a reference property.
    pub fn reference(self, name: &str, value: ObjectPath) -> Self {
        self.push(
            name,
            CimType::Reference,
            false,
            Some(CimValue::reference(value)),
        )
    }

    /// Adds an embedded-instance property (a string carrying an `INSTANCE`).
    pub fn embedded(mut self, name: &str, value: Option<Instance>) -> Self {
        self.properties.push(Property {
            name: name.to_owned(),
            ty: CimType::String,
            array: false,
            embedded: true,
            value: value.map(|i| CimValue::Scalar(Scalar::Instance(Box::new(i)))),
        });
        self
    }
}
