//! Class declarations: what `GetClass` returns and what method calls are checked against.

use crate::value::CimType;

/// A property declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropertyDecl {
    /// Name.
    pub name: &'static str,
    /// Type.
    pub ty: CimType,
    /// Whether it is an array.
    pub array: bool,
    /// `Key` qualifier.
    pub key: bool,
    /// For references: the class referred to.
    pub ref_class: Option<&'static str>,
    /// For embedded instances: the `EmbeddedInstance` class.
    pub embedded: Option<&'static str>,
}

/// A method parameter declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamDecl {
    /// Name.
    pub name: &'static str,
    /// Type.
    pub ty: CimType,
    /// Whether it is an array.
    pub array: bool,
    /// `IN` qualifier.
    pub input: bool,
    /// `OUT` qualifier.
    pub output: bool,
    /// For references: the class referred to.
    pub ref_class: Option<&'static str>,
    /// For embedded instances: the `EmbeddedInstance` class.
    pub embedded: Option<&'static str>,
}

/// A method declaration (all return `uint32`, as Hyper-V's do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodDecl {
    /// Name.
    pub name: &'static str,
    /// Parameters in order.
    pub params: Vec<ParamDecl>,
}

impl MethodDecl {
    /// A parameter by name (any case).
    pub fn param(&self, name: &str) -> Option<&ParamDecl> {
        self.params
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(name))
    }
}

/// A class declaration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassDecl {
    /// Name.
    pub name: &'static str,
    /// Direct superclass.
    pub superclass: Option<&'static str>,
    /// Every ancestor, nearest first (for deep enumeration, ResultClass and ISA).
    pub ancestors: &'static [&'static str],
    /// `Association` qualifier.
    pub association: bool,
    /// `Indication` qualifier.
    pub indication: bool,
    /// `Description` qualifier.
    pub description: &'static str,
    /// Properties.
    pub properties: Vec<PropertyDecl>,
    /// Methods.
    pub methods: Vec<MethodDecl>,
}

impl ClassDecl {
    /// Names of the key properties, in declaration order.
    pub fn keys(&self) -> Vec<&'static str> {
        self.properties
            .iter()
            .filter(|p| p.key)
            .map(|p| p.name)
            .collect()
    }

    /// A property by name (any case).
    pub fn property(&self, name: &str) -> Option<&PropertyDecl> {
        self.properties
            .iter()
            .find(|p| p.name.eq_ignore_ascii_case(name))
    }

    /// A method by name (any case).
    pub fn method(&self, name: &str) -> Option<&MethodDecl> {
        self.methods
            .iter()
            .find(|m| m.name.eq_ignore_ascii_case(name))
    }

    /// Whether this class is `class` or derives from it (any case).
    pub fn is_a(&self, class: &str) -> bool {
        self.name.eq_ignore_ascii_case(class)
            || self.ancestors.iter().any(|a| a.eq_ignore_ascii_case(class))
    }
}

/// A scalar property.
pub(crate) const fn prop(name: &'static str, ty: CimType) -> PropertyDecl {
    PropertyDecl {
        name,
        ty,
        array: false,
        key: false,
        ref_class: None,
        embedded: None,
    }
}

/// A key property (string).
pub(crate) const fn key(name: &'static str) -> PropertyDecl {
    PropertyDecl {
        key: true,
        ..prop(name, CimType::String)
    }
}

/// An array property.
pub(crate) const fn array(name: &'static str, ty: CimType) -> PropertyDecl {
    PropertyDecl {
        array: true,
        ..prop(name, ty)
    }
}

/// A key reference property (association ends).
pub(crate) const fn key_ref(name: &'static str, class: &'static str) -> PropertyDecl {
    PropertyDecl {
        key: true,
        ref_class: Some(class),
        ..prop(name, CimType::Reference)
    }
}

/// An embedded-instance string property.
pub(crate) const fn embedded_prop(name: &'static str, class: &'static str) -> PropertyDecl {
    PropertyDecl {
        embedded: Some(class),
        ..prop(name, CimType::String)
    }
}

/// An input parameter.
pub(crate) const fn input(name: &'static str, ty: CimType) -> ParamDecl {
    ParamDecl {
        name,
        ty,
        array: false,
        input: true,
        output: false,
        ref_class: None,
        embedded: None,
    }
}

/// An input reference parameter.
pub(crate) const fn input_ref(name: &'static str, class: &'static str) -> ParamDecl {
    ParamDecl {
        ref_class: Some(class),
        ..input(name, CimType::Reference)
    }
}

/// An input embedded-instance string parameter (`array` for `string[]`).
pub(crate) const fn input_embedded(
    name: &'static str,
    class: &'static str,
    array: bool,
) -> ParamDecl {
    ParamDecl {
        embedded: Some(class),
        array,
        ..input(name, CimType::String)
    }
}

/// An output reference parameter (`array` for `REF[]`).
pub(crate) const fn output_ref(name: &'static str, class: &'static str, array: bool) -> ParamDecl {
    ParamDecl {
        name,
        ty: CimType::Reference,
        array,
        input: false,
        output: true,
        ref_class: Some(class),
        embedded: None,
    }
}
