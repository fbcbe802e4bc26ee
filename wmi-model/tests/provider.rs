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
    assert_eq!(names, ["Msvm_VirtualSystemSettingData"]);
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
