//! The class model of `root/virtualization/v2` (and the subscription classes of `root/interop`):
//! declarations with their keys, methods and parameters.

mod classes;
mod decl;
mod devices;
mod network;

use std::sync::LazyLock;

pub use decl::{ClassDecl, MethodDecl, ParamDecl, PropertyDecl};

/// The virtualization namespace.
pub const VIRTUALIZATION_NAMESPACE: &str = "root/virtualization/v2";
/// The interop namespace (indication filters, destinations, subscriptions).
pub const INTEROP_NAMESPACE: &str = "root/interop";

/// Which namespace a class lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Namespace {
    /// `root/virtualization/v2`.
    Virtualization,
    /// `root/interop`.
    Interop,
}

impl Namespace {
    /// Recognises a namespace name written with `/` or `\`, any case, with or without a leading
    /// separator.
    pub fn parse(name: &str) -> Option<Self> {
        let normal = name.trim_matches(['/', '\\']).replace('\\', "/");
        if normal.eq_ignore_ascii_case(VIRTUALIZATION_NAMESPACE) {
            Some(Namespace::Virtualization)
        } else if normal.eq_ignore_ascii_case(INTEROP_NAMESPACE)
            || normal.eq_ignore_ascii_case("interop")
        {
            Some(Namespace::Interop)
        } else {
            None
        }
    }

    /// The canonical name.
    pub const fn name(self) -> &'static str {
        match self {
            Namespace::Virtualization => VIRTUALIZATION_NAMESPACE,
            Namespace::Interop => INTEROP_NAMESPACE,
        }
    }
}

/// Every declared class, by namespace.
#[derive(Debug)]
pub struct Schema {
    virtualization: Vec<ClassDecl>,
    interop: Vec<ClassDecl>,
}

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| Schema {
    virtualization: classes::virtualization()
        .into_iter()
        .chain(network::classes())
        .chain(devices::classes())
        .collect(),
    interop: classes::interop(),
});

impl Schema {
    /// The model's schema.
    pub fn get() -> &'static Schema {
        &SCHEMA
    }

    /// The classes of `namespace`.
    pub fn classes(&self, namespace: Namespace) -> &[ClassDecl] {
        match namespace {
            Namespace::Virtualization => &self.virtualization,
            Namespace::Interop => &self.interop,
        }
    }

    /// One class by name (any case).
    pub fn class(&self, namespace: Namespace, name: &str) -> Option<&ClassDecl> {
        self.classes(namespace)
            .iter()
            .find(|c| c.name.eq_ignore_ascii_case(name))
    }

    /// Whether `name` is a class of `namespace` or one of its classes' ancestors (so that
    /// `EnumerateInstances CIM_ComputerSystem` is a valid request).
    pub fn knows(&self, namespace: Namespace, name: &str) -> bool {
        self.classes(namespace).iter().any(|c| c.is_a(name))
    }
}
