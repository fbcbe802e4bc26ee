//! The provider's query answers that pywbem cannot show (it reads only instances from ExecQuery).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use vmm_core::VmConfig;
use wmi_model::Provider;
use wmi_model::cimxml::IReturn;
use wmi_model::schema::Namespace;

#[test]
fn associators_of_with_classdefsonly_returns_the_associated_classes() {
    let (_store, vmms) = common::service();
    let id = vmms.define_system(VmConfig::new("defs")).unwrap();
    let provider = Provider::new(vmms, "host");
    let query = format!(
        "ASSOCIATORS OF {{Msvm_ComputerSystem.CreationClassName=\"Msvm_ComputerSystem\",Name=\"{id}\"}} WHERE ClassDefsOnly"
    );

    let answer = provider
        .exec_query(Namespace::Virtualization, &query)
        .unwrap();

    let IReturn::ClassesWithPath(classes) = answer else {
        panic!("classes expected, got {answer:?}");
    };
    let names: Vec<&str> = classes.iter().map(|c| c.name).collect();
    // The VM's settings (Msvm_SettingsDefineState) and its boot loader (Msvm_SystemBIOS).
    assert_eq!(names, ["Msvm_VirtualSystemSettingData", "Msvm_BIOSElement"]);
}

#[test]
fn select_with_where_filters_on_live_state() {
    let (_store, vmms) = common::service();
    vmms.define_system(VmConfig::new("alpha")).unwrap();
    vmms.define_system(VmConfig::new("beta")).unwrap();
    let provider = Provider::new(vmms, "host");

    let answer = provider
        .exec_query(
            Namespace::Virtualization,
            "select ElementName from msvm_computersystem where Caption = \"Virtual Machine\" and not ElementName like 'b%'",
        )
        .unwrap();

    let IReturn::ObjectsWithPath(list) = answer else {
        panic!("instances expected");
    };
    let names: Vec<&str> = list
        .iter()
        .map(|(_, i)| i.get_str("ElementName").unwrap())
        .collect();
    assert_eq!(names, ["alpha"]);
    assert_eq!(list[0].1.properties.len(), 1, "only the selected property");
}

fn subscribe(provider: &Provider, query: &str) {
    use wmi_model::{CimType, Instance};
    let subscriptions = provider.subscriptions();
    let filter = subscriptions
        .create(
            &Instance::new("CIM_IndicationFilter")
                .string("Query", Some(query))
                .string("QueryLanguage", Some("WQL")),
            "host",
        )
        .unwrap();
    let handler = subscriptions
        .create(
            &Instance::new("CIM_ListenerDestinationCIMXML")
                .string("Destination", Some("http://127.0.0.1:9/listener")),
            "host",
        )
        .unwrap();
    subscriptions
        .create(
            &Instance::new("CIM_IndicationSubscription")
                .reference("Filter", filter)
                .reference("Handler", handler)
                .integer("SubscriptionState", CimType::Uint16, Some(2u8)),
            "host",
        )
        .unwrap();
}

#[test]
fn job_completion_reaches_a_filter_on_concrete_jobs_only() {
    use std::time::Duration;
    use vmm_core::{Event, EventKind, RequestedState};
    let (_store, vmms) = common::service();
    let id = vmms.define_system(VmConfig::new("jobs")).unwrap();
    let (_, job) = vmms
        .request_state_change(id, RequestedState::Start)
        .unwrap();
    let job = vmms
        .wait_for_job(job.unwrap(), Duration::from_secs(10))
        .unwrap();
    let provider = Provider::new(vmms, "host");
    subscribe(
        &provider,
        "SELECT * FROM CIM_InstModification WHERE SourceInstance ISA 'CIM_ConcreteJob' AND SourceInstance.JobState = 7",
    );
    let completed = Event {
        vm: id,
        time: std::time::SystemTime::now(),
        kind: EventKind::JobCompleted {
            job: job.id,
            state: job.state,
        },
    };
    let state_change = Event {
        kind: EventKind::StateChanged {
            previous: vmm_core::EnabledState::Off,
            current: vmm_core::EnabledState::Starting,
        },
        ..completed.clone()
    };

    let for_job: Vec<_> = provider.indications_for(&completed);
    let for_state: Vec<_> = provider.indications_for(&state_change);

    assert_eq!(for_job.len(), 1);
    assert_eq!(
        provider.subscriptions().destinations_for(&for_job[0]),
        ["http://127.0.0.1:9/listener"]
    );
    assert!(
        provider
            .subscriptions()
            .destinations_for(&for_state[0])
            .is_empty()
    );
}

#[test]
fn stopped_vm_has_no_shutdown_component_and_a_stale_one_gets_invalid_state() {
    use wmi_model::cimxml::{Arg, ArgValue};
    use wmi_model::model::ShutdownComponent;
    let (_store, vmms) = common::service();
    let id = vmms.define_system(VmConfig::new("off")).unwrap();
    let provider = Provider::new(vmms, "host");
    let arg = |value: &str| Arg {
        paramtype: None,
        unknown_type: None,
        embedded: false,
        value: ArgValue::Value(value.into()),
    };

    let components = provider
        .exec_query(
            Namespace::Virtualization,
            "select * from Msvm_ShutdownComponent",
        )
        .unwrap();
    let output = provider
        .invoke(
            Namespace::Virtualization,
            &ShutdownComponent::path_of(id),
            "InitiateShutdown",
            &[
                ("Force".into(), arg("true")),
                ("Reason".into(), arg("test")),
            ],
        )
        .unwrap();

    let IReturn::ObjectsWithPath(list) = components else {
        panic!("instances expected, got {components:?}");
    };
    assert!(list.is_empty(), "a component for an Off VM: {list:?}");
    assert_eq!(output.return_value, 32775);
    assert!(output.outputs.is_empty(), "no job for a refused shutdown");
}
