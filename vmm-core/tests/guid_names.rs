//! A VM name that parses as a GUID would be read as another VM's id by every client that takes
//! "a name or a GUID": such names are refused when given, and tolerated when already stored.

mod common;

use common::{ThreadLauncher, open};
use vmm_core::{ConfigError, Error, OperationalStatus, VmConfig, VmId};

#[test]
fn define_system_refuses_a_name_that_is_another_vms_guid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let alpha = vmms.define_system(VmConfig::new("alpha")).expect("define");

    let result = vmms.define_system(VmConfig::new(alpha.to_string()));

    assert!(matches!(
        result,
        Err(Error::InvalidConfig(ConfigError::NameIsGuid))
    ));
    assert_eq!(vmms.list_vms().len(), 1);
}

#[test]
fn modify_system_settings_refuses_renaming_to_a_guid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let vmms = open(dir.path(), &launcher);
    let config = VmConfig::new("beta");
    let beta = vmms.define_system(config.clone()).expect("define");

    let result = vmms.modify_system_settings(VmConfig {
        name: VmId::new_random().to_string().to_lowercase(),
        ..config
    });

    assert!(matches!(
        result,
        Err(Error::InvalidConfig(ConfigError::NameIsGuid))
    ));
    assert_eq!(vmms.get_vm(beta).expect("vm").name, "beta");
}

#[test]
fn stored_vm_named_like_a_guid_loads_healthy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let launcher = ThreadLauncher::default();
    let config = VmConfig::new("legacy");
    let id = {
        let vmms = open(dir.path(), &launcher);
        vmms.define_system(config.clone()).expect("define")
    };
    // A store written before the rule: the name was accepted then.
    let legacy = VmConfig {
        name: VmId::new_random().to_string(),
        ..config
    };
    let path = dir.path().join(format!("vms/{id}/config.json"));
    std::fs::write(&path, serde_json::to_vec(&legacy).expect("encode")).expect("rewrite");

    let vmms = open(dir.path(), &launcher);
    let vm = vmms.get_vm(id).expect("vm");

    assert_eq!(vm.name, legacy.name);
    assert_eq!(vm.operational_status, OperationalStatus::Ok);
}
