//! From a parsed CIM-XML [`Request`] to the response document.

use super::Provider;
use super::assoc::AssocFilter;
use crate::cimxml::{Call, IParam, IReturn, Request, imethod_response, method_response};
use crate::error::{CimError, CimResult, CimStatus};
use crate::instance::Instance;
use crate::path::ObjectPath;
use crate::schema::{ClassDecl, Namespace, Schema};
use crate::wql::{self, Query};

/// An intrinsic call's parameters by name.
struct IParams<'a>(&'a [(String, IParam)]);

impl IParams<'_> {
    fn get(&self, name: &str) -> Option<&IParam> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    fn class_name(&self, name: &str) -> CimResult<Option<String>> {
        match self.get(name) {
            None | Some(IParam::Null) => Ok(None),
            Some(IParam::ClassName(c)) => Ok(Some(c.clone())),
            Some(IParam::Value(v)) => Ok(Some(v.clone())),
            Some(_) => Err(bad(format!("{name} must be a class name"))),
        }
    }

    fn required_class(&self, name: &str) -> CimResult<String> {
        self.class_name(name)?
            .ok_or_else(|| bad(format!("{name} is required")))
    }

    fn instance_name(&self, name: &str) -> CimResult<ObjectPath> {
        match self.get(name) {
            Some(IParam::InstanceName(p)) => Ok(p.clone()),
            Some(IParam::ClassName(c)) => Ok(ObjectPath {
                class: c.clone(),
                ..ObjectPath::default()
            }),
            _ => Err(bad(format!("{name} must be an instance name"))),
        }
    }

    fn string(&self, name: &str) -> Option<String> {
        match self.get(name) {
            Some(IParam::Value(v)) => Some(v.clone()),
            Some(IParam::ClassName(c)) => Some(c.clone()),
            _ => None,
        }
    }

    fn boolean(&self, name: &str, default: bool) -> bool {
        match self.get(name) {
            Some(IParam::Value(v)) => v.trim().eq_ignore_ascii_case("true"),
            _ => default,
        }
    }

    fn property_list(&self) -> Option<Vec<String>> {
        match self.get("PropertyList") {
            Some(IParam::ValueArray(list)) => Some(list.clone()),
            _ => None,
        }
    }
}

fn bad(message: impl Into<String>) -> CimError {
    CimError::new(CimStatus::InvalidParameter, message)
}

fn namespace(name: &str) -> CimResult<Namespace> {
    Namespace::parse(name).ok_or_else(|| {
        CimError::new(
            CimStatus::InvalidNamespace,
            format!("namespace {name} does not exist"),
        )
    })
}

fn apply_property_list(
    list: Vec<(ObjectPath, Instance)>,
    properties: Option<&[String]>,
) -> Vec<(ObjectPath, Instance)> {
    match properties {
        None => list,
        Some(names) => list
            .into_iter()
            .map(|(path, mut instance)| {
                instance.retain(names);
                (path, instance)
            })
            .collect(),
    }
}

impl Provider {
    /// Answers one request with a complete CIM-XML response document.
    pub fn handle(&self, request: &Request) -> String {
        match &request.call {
            Call::Intrinsic {
                namespace: ns,
                name,
                params,
            } => {
                let result =
                    namespace(ns).and_then(|ns| self.intrinsic(ns, name, &IParams(params)));
                imethod_response(&request.message_id, name, &self.host, ns, &result)
            }
            Call::Extrinsic {
                target,
                method,
                params,
            } => {
                let ns = target.namespace.clone().unwrap_or_default();
                let result = namespace(&ns).and_then(|n| self.invoke(n, target, method, params));
                method_response(&request.message_id, method, &self.host, &ns, &result)
            }
        }
    }

    fn intrinsic(&self, ns: Namespace, name: &str, p: &IParams<'_>) -> CimResult<IReturn> {
        let schema = Schema::get();
        match name {
            "EnumerateInstances" => {
                let class = p.required_class("ClassName")?;
                let list = self.enumerate(ns, &class, &self.view())?;
                Ok(IReturn::NamedInstances(apply_property_list(
                    list,
                    p.property_list().as_deref(),
                )))
            }
            "EnumerateInstanceNames" => {
                let class = p.required_class("ClassName")?;
                let list = self.enumerate(ns, &class, &self.view())?;
                Ok(IReturn::InstanceNames(
                    list.into_iter().map(|(path, _)| path).collect(),
                ))
            }
            "GetInstance" => {
                let path = p.instance_name("InstanceName")?;
                let mut instance = self.get(ns, &path)?;
                if let Some(list) = p.property_list() {
                    instance.retain(&list);
                }
                Ok(IReturn::Instance(instance))
            }
            "GetClass" => {
                let class = p.required_class("ClassName")?;
                let decl = self.class(ns, &class).map_err(|_| {
                    CimError::new(CimStatus::NotFound, format!("class {class} does not exist"))
                })?;
                Ok(IReturn::Classes(vec![decl]))
            }
            "EnumerateClassNames" | "EnumerateClasses" => {
                let class = p.class_name("ClassName")?;
                let deep = p.boolean("DeepInheritance", false);
                let decls = schema.classes(ns);
                if let Some(c) = &class
                    && !schema.knows(ns, c)
                {
                    return Err(CimError::new(
                        CimStatus::InvalidClass,
                        format!("class {c} does not exist"),
                    ));
                }
                let declared = |name: &str| decls.iter().any(|d| d.name.eq_ignore_ascii_case(name));
                let selected: Vec<&'static ClassDecl> = decls
                    .iter()
                    .filter(|d| match (&class, deep) {
                        (None, true) => true,
                        (None, false) => d.superclass.is_none_or(|s| !declared(s)),
                        (Some(c), true) => d.is_a(c) && !d.name.eq_ignore_ascii_case(c),
                        (Some(c), false) => {
                            d.superclass.is_some_and(|s| s.eq_ignore_ascii_case(c))
                                || (!declared(c) && d.is_a(c) && !d.name.eq_ignore_ascii_case(c))
                        }
                    })
                    .collect();
                Ok(if name == "EnumerateClasses" {
                    IReturn::Classes(selected)
                } else {
                    IReturn::ClassNames(selected.iter().map(|d| d.name).collect())
                })
            }
            "ExecQuery" => {
                let language = p.string("QueryLanguage").unwrap_or_default();
                if !language.eq_ignore_ascii_case("WQL") {
                    return Err(CimError::new(
                        CimStatus::QueryLanguageNotSupported,
                        format!("query language {language} is not supported (WQL is)"),
                    ));
                }
                let query = p.string("Query").ok_or_else(|| bad("Query is required"))?;
                self.exec_query(ns, &query)
            }
            "Associators" | "AssociatorNames" | "References" | "ReferenceNames" => {
                if ns != Namespace::Virtualization {
                    return Ok(IReturn::ObjectsWithPath(Vec::new()));
                }
                let object = p.instance_name("ObjectName")?;
                let references = name.starts_with("Reference");
                let filter = AssocFilter {
                    assoc_class: if references {
                        p.class_name("ResultClass")?
                    } else {
                        p.class_name("AssocClass")?
                    },
                    result_class: if references {
                        None
                    } else {
                        p.class_name("ResultClass")?
                    },
                    role: p.string("Role"),
                    result_role: if references {
                        None
                    } else {
                        p.string("ResultRole")
                    },
                    required_qualifier: None,
                };
                if object.keys.is_empty() {
                    // Class-level association queries: not modelled.
                    return Err(CimError::new(
                        CimStatus::NotSupported,
                        "association traversal from a class is not supported",
                    ));
                }
                let list = if references {
                    self.references(&object, &filter)?
                } else {
                    self.associators(&object, &filter)?
                };
                Ok(if name.ends_with("Names") {
                    IReturn::ObjectPaths(list.into_iter().map(|(path, _)| path).collect())
                } else {
                    IReturn::ObjectsWithPath(apply_property_list(
                        list,
                        p.property_list().as_deref(),
                    ))
                })
            }
            "CreateInstance" => {
                let Some(IParam::Instance(instance)) = p.get("NewInstance") else {
                    return Err(bad("NewInstance is required"));
                };
                if ns != Namespace::Interop {
                    return Err(CimError::new(
                        CimStatus::NotSupported,
                        "instances of this namespace are created by methods (DefineSystem)",
                    ));
                }
                let path = self.subscriptions.create(instance, &self.host)?;
                Ok(IReturn::InstanceNames(vec![path]))
            }
            "DeleteInstance" => {
                let path = p.instance_name("InstanceName")?;
                if ns != Namespace::Interop {
                    return Err(CimError::new(
                        CimStatus::NotSupported,
                        "instances of this namespace are destroyed by methods (DestroySystem)",
                    ));
                }
                self.subscriptions.delete(&path)?;
                Ok(IReturn::Nothing)
            }
            other
                if other.starts_with("Open")
                    || other.starts_with("Pull")
                    || other == "CloseEnumeration"
                    || other == "EnumerationCount" =>
            {
                Err(CimError::new(
                    CimStatus::NotSupported,
                    format!("{other} is not supported; use the non-pull operations"),
                ))
            }
            other => Err(CimError::new(
                CimStatus::NotSupported,
                format!("operation {other} is not supported"),
            )),
        }
    }

    /// `ExecQuery` with WQL.
    pub fn exec_query(&self, ns: Namespace, text: &str) -> CimResult<IReturn> {
        let query = wql::parse(text).map_err(|e| {
            CimError::new(
                CimStatus::InvalidQuery,
                format!("{} (position {}): {text}", e.message, e.position),
            )
        })?;
        match query {
            Query::Select(select) => {
                if let (Some(names), Some(decl)) =
                    (&select.properties, Schema::get().class(ns, &select.class))
                    && let Some(unknown) = names.iter().find(|n| decl.property(n).is_none())
                {
                    return Err(CimError::new(
                        CimStatus::InvalidQuery,
                        format!("class {} has no property {unknown}", decl.name),
                    ));
                }
                let list = self
                    .enumerate(ns, &select.class, &self.view())?
                    .into_iter()
                    .filter(|(_, i)| select.condition.as_ref().is_none_or(|c| c.matches(i)))
                    .collect();
                Ok(IReturn::ObjectsWithPath(apply_property_list(
                    list,
                    select.properties.as_deref(),
                )))
            }
            Query::Associators(assoc) | Query::References(assoc)
                if ns != Namespace::Virtualization =>
            {
                let _ = assoc;
                Ok(IReturn::ObjectsWithPath(Vec::new()))
            }
            Query::Associators(assoc) => {
                let filter = AssocFilter {
                    assoc_class: assoc.assoc_class.clone(),
                    result_class: assoc.result_class.clone(),
                    role: assoc.role.clone(),
                    result_role: assoc.result_role.clone(),
                    required_qualifier: assoc
                        .required_qualifier
                        .clone()
                        .or(assoc.required_assoc_qualifier.clone()),
                };
                let list = self.associators(&assoc.object, &filter)?;
                self.assoc_result(list, assoc.class_defs_only, assoc.keys_only)
            }
            Query::References(assoc) => {
                let filter = AssocFilter {
                    assoc_class: assoc.result_class.clone().or(assoc.assoc_class.clone()),
                    role: assoc.role.clone(),
                    required_qualifier: assoc.required_qualifier.clone(),
                    ..AssocFilter::default()
                };
                let list = self.references(&assoc.object, &filter)?;
                self.assoc_result(list, assoc.class_defs_only, assoc.keys_only)
            }
        }
    }

    fn assoc_result(
        &self,
        list: Vec<(ObjectPath, Instance)>,
        class_defs_only: bool,
        keys_only: bool,
    ) -> CimResult<IReturn> {
        if class_defs_only {
            let schema = Schema::get();
            let mut classes: Vec<&'static ClassDecl> = Vec::new();
            for (_, instance) in &list {
                if let Some(decl) = schema.class(Namespace::Virtualization, &instance.class)
                    && !classes.iter().any(|c| c.name == decl.name)
                {
                    classes.push(decl);
                }
            }
            return Ok(IReturn::ClassesWithPath(classes));
        }
        if keys_only {
            return Ok(IReturn::ObjectsWithPath(
                list.into_iter()
                    .map(|(path, mut instance)| {
                        let keys: Vec<String> = path.keys.iter().map(|(k, _)| k.clone()).collect();
                        instance.retain(&keys);
                        (path, instance)
                    })
                    .collect(),
            ));
        }
        Ok(IReturn::ObjectsWithPath(list))
    }
}
