//! Indications: the subscription objects of `root/interop` (CIM_IndicationFilter,
//! CIM_ListenerDestinationCIMXML, CIM_IndicationSubscription), and turning vmm-core's events
//! into `CIM_InstModification` / `CIM_InstCreation` / `CIM_InstDeletion` indications.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use vmm_core::{Event, EventKind};

use crate::error::{CimError, CimResult, CimStatus};
use crate::instance::Instance;
use crate::model::{CimObject, ComputerSystem, ConcreteJob, SnapshotSettingData};
use crate::path::ObjectPath;
use crate::provider::Provider;
use crate::schema::{Namespace, Schema};
use crate::value::{CimType, CimValue, Scalar};
use crate::wql::{self, Query, Select};

/// The most subscription objects of each kind (a bound on what clients can make us keep).
pub const MAX_SUBSCRIPTION_OBJECTS: usize = 256;

const FILTER: &str = "CIM_IndicationFilter";
const DESTINATION: &str = "CIM_ListenerDestinationCIMXML";
const SUBSCRIPTION: &str = "CIM_IndicationSubscription";

#[derive(Debug, Clone)]
struct Filter {
    path: ObjectPath,
    instance: Instance,
    query: Select,
}

#[derive(Debug, Clone)]
struct Destination {
    path: ObjectPath,
    instance: Instance,
    url: String,
}

#[derive(Debug, Default)]
struct Table {
    filters: Vec<Filter>,
    destinations: Vec<Destination>,
    subscriptions: Vec<(ObjectPath, Instance)>,
}

/// The subscription objects clients created. They live as long as the daemon (like a WBEM
/// server's transient subscriptions).
#[derive(Debug, Default)]
pub struct Subscriptions {
    table: Mutex<Table>,
}

fn bad(message: impl Into<String>) -> CimError {
    CimError::new(CimStatus::InvalidParameter, message)
}

fn keys(class: &str) -> Vec<&'static str> {
    Schema::get()
        .class(Namespace::Interop, class)
        .map(|c| c.keys())
        .unwrap_or_default()
}

/// Fills in the four CIM_System-style keys a client may leave out.
fn with_system_keys(mut instance: Instance, class: &'static str, host: &str) -> Instance {
    let name = instance
        .get_str("Name")
        .map(str::to_owned)
        .unwrap_or_else(|| format!("vmms:{}", uuid::Uuid::new_v4()));
    instance.properties.retain(|p| {
        ![
            "SystemCreationClassName",
            "SystemName",
            "CreationClassName",
            "Name",
        ]
        .iter()
        .any(|k| k.eq_ignore_ascii_case(&p.name))
    });
    let mut filled = Instance::new(class)
        .string("SystemCreationClassName", Some("Msvm_ComputerSystem"))
        .string("SystemName", Some(host))
        .string("CreationClassName", Some(class))
        .string("Name", Some(name));
    filled.properties.append(&mut instance.properties);
    filled
}

impl Subscriptions {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // Every update is a single push or retain; a panic elsewhere leaves the table whole.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `CreateInstance` of a filter, destination or subscription; returns its path.
    pub fn create(&self, instance: &Instance, host: &str) -> CimResult<ObjectPath> {
        let schema = Schema::get();
        let decl = schema
            .class(Namespace::Interop, &instance.class)
            .ok_or_else(|| {
                CimError::new(
                    CimStatus::InvalidClass,
                    format!("cannot create instances of {}", instance.class),
                )
            })?;
        let mut table = self.lock();
        match decl.name {
            FILTER => {
                let language = instance.get_str("QueryLanguage").unwrap_or("WQL");
                if !language.eq_ignore_ascii_case("WQL") {
                    return Err(CimError::new(
                        CimStatus::QueryLanguageNotSupported,
                        format!("query language {language} is not supported (WQL is)"),
                    ));
                }
                let text = instance
                    .get_str("Query")
                    .ok_or_else(|| bad("Query is required"))?;
                let query = match wql::parse(text) {
                    Ok(Query::Select(select)) => select,
                    Ok(_) => {
                        return Err(CimError::new(
                            CimStatus::InvalidQuery,
                            "an indication filter needs a SELECT query",
                        ));
                    }
                    Err(e) => {
                        return Err(CimError::new(
                            CimStatus::InvalidQuery,
                            format!("{} (position {})", e.message, e.position),
                        ));
                    }
                };
                if table.filters.len() >= MAX_SUBSCRIPTION_OBJECTS {
                    return Err(CimError::new(
                        CimStatus::ServerLimitsExceeded,
                        "too many filters",
                    ));
                }
                let instance = with_system_keys(instance.clone(), FILTER, host);
                let path = instance.path(&keys(FILTER));
                if table.filters.iter().any(|f| f.path.matches(&path)) {
                    return Err(CimError::new(
                        CimStatus::AlreadyExists,
                        format!("{path} exists"),
                    ));
                }
                table.filters.push(Filter {
                    path: path.clone(),
                    instance,
                    query,
                });
                Ok(path)
            }
            DESTINATION => {
                let url = instance
                    .get_str("Destination")
                    .ok_or_else(|| bad("Destination is required"))?
                    .to_owned();
                if !url.starts_with("http://") {
                    return Err(CimError::new(
                        CimStatus::NotSupported,
                        "only http:// listener destinations are supported",
                    ));
                }
                if table.destinations.len() >= MAX_SUBSCRIPTION_OBJECTS {
                    return Err(CimError::new(
                        CimStatus::ServerLimitsExceeded,
                        "too many destinations",
                    ));
                }
                let instance = with_system_keys(instance.clone(), DESTINATION, host);
                let path = instance.path(&keys(DESTINATION));
                if table.destinations.iter().any(|d| d.path.matches(&path)) {
                    return Err(CimError::new(
                        CimStatus::AlreadyExists,
                        format!("{path} exists"),
                    ));
                }
                table.destinations.push(Destination {
                    path: path.clone(),
                    instance,
                    url,
                });
                Ok(path)
            }
            SUBSCRIPTION => {
                let reference = |role: &str| match instance.get(role) {
                    Some(CimValue::Scalar(Scalar::Reference(p))) => Ok(p.clone()),
                    Some(CimValue::Scalar(Scalar::String(s))) => {
                        ObjectPath::parse(s).map_err(|e| bad(e.to_string()))
                    }
                    _ => Err(bad(format!("{role} is required"))),
                };
                let filter = reference("Filter")?;
                let handler = reference("Handler")?;
                if !table.filters.iter().any(|f| f.path.matches(&filter)) {
                    return Err(CimError::new(
                        CimStatus::NotFound,
                        format!("no filter {filter}"),
                    ));
                }
                if !table.destinations.iter().any(|d| d.path.matches(&handler)) {
                    return Err(CimError::new(
                        CimStatus::NotFound,
                        format!("no handler {handler}"),
                    ));
                }
                if table.subscriptions.len() >= MAX_SUBSCRIPTION_OBJECTS {
                    return Err(CimError::new(
                        CimStatus::ServerLimitsExceeded,
                        "too many subscriptions",
                    ));
                }
                let stored = Instance::new(SUBSCRIPTION)
                    .reference("Filter", filter)
                    .reference("Handler", handler)
                    .integer("SubscriptionState", CimType::Uint16, Some(2u8));
                let path = stored.path(&keys(SUBSCRIPTION));
                if table.subscriptions.iter().any(|(p, _)| p.matches(&path)) {
                    return Err(CimError::new(
                        CimStatus::AlreadyExists,
                        format!("{path} exists"),
                    ));
                }
                table.subscriptions.push((path.clone(), stored));
                Ok(path)
            }
            other => Err(CimError::new(
                CimStatus::NotSupported,
                format!("cannot create instances of {other}"),
            )),
        }
    }

    /// `DeleteInstance`; deleting a filter or destination also deletes its subscriptions.
    pub fn delete(&self, path: &ObjectPath) -> CimResult<()> {
        let mut table = self.lock();
        let before = table.filters.len() + table.destinations.len() + table.subscriptions.len();
        table.filters.retain(|f| !f.path.matches(path));
        table.destinations.retain(|d| !d.path.matches(path));
        table.subscriptions.retain(|(p, _)| !p.matches(path));
        let after = table.filters.len() + table.destinations.len() + table.subscriptions.len();
        if before == after {
            return Err(CimError::new(
                CimStatus::NotFound,
                format!("no instance {path}"),
            ));
        }
        let Table {
            filters,
            destinations,
            subscriptions,
        } = &mut *table;
        subscriptions.retain(|(_, s)| {
            let filter = reference(s, "Filter");
            let handler = reference(s, "Handler");
            filter.is_some_and(|f| filters.iter().any(|x| x.path.matches(f)))
                && handler.is_some_and(|h| destinations.iter().any(|x| x.path.matches(h)))
        });
        Ok(())
    }

    /// Instances of `class` (or its subclasses) in `root/interop`.
    pub fn enumerate(&self, class: &str) -> Vec<(ObjectPath, Instance)> {
        let schema = Schema::get();
        let wants = |name: &str| {
            schema
                .class(Namespace::Interop, name)
                .is_some_and(|c| c.is_a(class))
        };
        let table = self.lock();
        let mut out = Vec::new();
        if wants(FILTER) {
            out.extend(
                table
                    .filters
                    .iter()
                    .map(|f| (f.path.clone(), f.instance.clone())),
            );
        }
        if wants(DESTINATION) {
            out.extend(
                table
                    .destinations
                    .iter()
                    .map(|d| (d.path.clone(), d.instance.clone())),
            );
        }
        if wants(SUBSCRIPTION) {
            out.extend(table.subscriptions.iter().cloned());
        }
        out
    }

    /// One subscription object by path.
    pub fn get(&self, path: &ObjectPath) -> Option<Instance> {
        self.enumerate(&path.class)
            .into_iter()
            .find(|(p, _)| p.matches(path))
            .map(|(_, i)| i)
    }

    /// The listener URLs that should receive `indication`: one per subscription whose filter
    /// selects it.
    pub fn destinations_for(&self, indication: &Instance) -> Vec<String> {
        let table = self.lock();
        let schema = Schema::get();
        let class_matches = |from: &str| {
            schema
                .class(Namespace::Virtualization, &indication.class)
                .is_some_and(|c| c.is_a(from))
        };
        let mut urls = Vec::new();
        for (_, subscription) in &table.subscriptions {
            let (Some(filter), Some(handler)) = (
                reference(subscription, "Filter"),
                reference(subscription, "Handler"),
            ) else {
                continue;
            };
            let Some(filter) = table.filters.iter().find(|f| f.path.matches(filter)) else {
                continue;
            };
            let Some(destination) = table.destinations.iter().find(|d| d.path.matches(handler))
            else {
                continue;
            };
            if class_matches(&filter.query.class)
                && filter
                    .query
                    .condition
                    .as_ref()
                    .is_none_or(|c| c.matches(indication))
            {
                urls.push(destination.url.clone());
            }
        }
        urls
    }
}

fn reference<'a>(instance: &'a Instance, role: &str) -> Option<&'a ObjectPath> {
    match instance.get(role) {
        Some(CimValue::Scalar(Scalar::Reference(p))) => Some(p),
        _ => None,
    }
}

fn indication(
    class: &str,
    source: Instance,
    previous: Option<Instance>,
    path: &ObjectPath,
    host: &str,
    time: SystemTime,
) -> Instance {
    Instance::new(class)
        .string(
            "IndicationIdentifier",
            Some(uuid::Uuid::new_v4().to_string()),
        )
        .timestamp("IndicationTime", Some(time))
        .embedded("SourceInstance", Some(source))
        .embedded("PreviousInstance", previous)
        .string("SourceInstanceModelPath", Some(path.to_string()))
        .string("SourceInstanceHost", Some(host))
}

/// Sets an integer property of `instance` (for building PreviousInstance).
fn with_integer(mut instance: Instance, name: &str, value: u16) -> Instance {
    if let Some(p) = instance.properties.iter_mut().find(|p| p.name == name) {
        p.value = Some(CimValue::int(value));
    }
    instance
}

impl Provider {
    /// The indications one vmm-core event becomes (none for events with no CIM counterpart).
    pub fn indications_for(&self, event: &Event) -> Vec<Instance> {
        let path = ComputerSystem::path_of(event.vm);
        let current = || {
            self.vmms
                .get_vm(event.vm)
                .ok()
                .map(|vm| ComputerSystem::from(&vm).to_instance())
        };
        match &event.kind {
            EventKind::StateChanged {
                previous,
                current: now,
            } => current()
                .map(|source| {
                    // The event names the state it reports; the VM may have moved on since.
                    let source = with_integer(source, "EnabledState", now.code());
                    let before = with_integer(source.clone(), "EnabledState", previous.code());
                    indication(
                        "CIM_InstModification",
                        source,
                        Some(before),
                        &path,
                        &self.host,
                        event.time,
                    )
                })
                .into_iter()
                .collect(),
            EventKind::HealthChanged {
                previous,
                current: now,
            } => current()
                .map(|source| {
                    let source = with_integer(source, "HealthState", now.code());
                    let before = with_integer(source.clone(), "HealthState", previous.code());
                    indication(
                        "CIM_InstModification",
                        source,
                        Some(before),
                        &path,
                        &self.host,
                        event.time,
                    )
                })
                .into_iter()
                .collect(),
            EventKind::JobCompleted { job, .. } => self
                .vmms
                .job(*job)
                .ok()
                .map(|job| {
                    let job = ConcreteJob(job);
                    indication(
                        "CIM_InstModification",
                        job.to_instance(),
                        None,
                        &job.path(),
                        &self.host,
                        event.time,
                    )
                })
                .into_iter()
                .collect(),
            EventKind::Defined => current()
                .map(|source| {
                    indication(
                        "CIM_InstCreation",
                        source,
                        None,
                        &path,
                        &self.host,
                        event.time,
                    )
                })
                .into_iter()
                .collect(),
            EventKind::Destroyed => {
                let source = Instance::new("Msvm_ComputerSystem")
                    .string("CreationClassName", Some("Msvm_ComputerSystem"))
                    .string("Name", Some(event.vm.to_string()));
                vec![indication(
                    "CIM_InstDeletion",
                    source,
                    None,
                    &path,
                    &self.host,
                    event.time,
                )]
            }
            EventKind::CheckpointCreated { checkpoint } => {
                let view = self.view();
                view.checkpoints(self)
                    .iter()
                    .find(|s| s.checkpoint.id == *checkpoint)
                    .map(|snapshot| {
                        indication(
                            "CIM_InstCreation",
                            snapshot.to_instance(),
                            None,
                            &snapshot.path(),
                            &self.host,
                            event.time,
                        )
                    })
                    .into_iter()
                    .collect()
            }
            EventKind::CheckpointsDeleted { checkpoints } => checkpoints
                .iter()
                .map(|id| {
                    let path = SnapshotSettingData::path_of(*id);
                    let source = Instance::new("Msvm_VirtualSystemSettingData")
                        .string("InstanceID", Some(SnapshotSettingData::instance_id(*id)));
                    indication(
                        "CIM_InstDeletion",
                        source,
                        None,
                        &path,
                        &self.host,
                        event.time,
                    )
                })
                .collect(),
            // Applying changes the VM's settings and state, which their own events report.
            _ => Vec::new(),
        }
    }
}
