//! Property tests: the WQL, object-path and CIM-XML parsers, and the provider behind them, never
//! panic on any input — random text, token soup, or valid requests with bytes cut and spliced.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::OnceLock;

use proptest::prelude::*;
use vmm_core::VmConfig;
use wmi_model::cimxml::{parse_instance, parse_request};
use wmi_model::wql;
use wmi_model::{ObjectPath, Provider};

mod common;

fn provider() -> &'static Provider {
    static PROVIDER: OnceLock<(tempfile::TempDir, Provider)> = OnceLock::new();
    &PROVIDER
        .get_or_init(|| {
            let (dir, vmms) = common::service();
            vmms.define_system(VmConfig::new("fuzz")).expect("define");
            (dir, Provider::new(vmms, "host"))
        })
        .1
}

use common::NS;

fn requests() -> Vec<String> {
    let wrap = |body: String| {
        format!(
            r#"<?xml version="1.0" encoding="utf-8" ?><CIM CIMVERSION="2.0" DTDVERSION="2.0"><MESSAGE ID="7" PROTOCOLVERSION="1.0"><SIMPLEREQ>{body}</SIMPLEREQ></MESSAGE></CIM>"#
        )
    };
    vec![
        wrap(format!(
            r#"<IMETHODCALL NAME="EnumerateInstances">{NS}<IPARAMVALUE NAME="ClassName"><CLASSNAME NAME="Msvm_ComputerSystem"/></IPARAMVALUE><IPARAMVALUE NAME="PropertyList"><VALUE.ARRAY><VALUE>Name</VALUE></VALUE.ARRAY></IPARAMVALUE></IMETHODCALL>"#
        )),
        wrap(format!(
            r#"<IMETHODCALL NAME="ExecQuery">{NS}<IPARAMVALUE NAME="QueryLanguage"><VALUE>WQL</VALUE></IPARAMVALUE><IPARAMVALUE NAME="Query"><VALUE>SELECT * FROM Msvm_ComputerSystem WHERE ElementName LIKE 'f%'</VALUE></IPARAMVALUE></IMETHODCALL>"#
        )),
        wrap(format!(
            r#"<IMETHODCALL NAME="GetInstance">{NS}<IPARAMVALUE NAME="InstanceName"><INSTANCENAME CLASSNAME="Msvm_VirtualSystemManagementService"><KEYBINDING NAME="CreationClassName"><KEYVALUE VALUETYPE="string">Msvm_VirtualSystemManagementService</KEYVALUE></KEYBINDING><KEYBINDING NAME="Name"><KEYVALUE VALUETYPE="string">vmms</KEYVALUE></KEYBINDING><KEYBINDING NAME="SystemCreationClassName"><KEYVALUE VALUETYPE="string">Msvm_ComputerSystem</KEYVALUE></KEYBINDING><KEYBINDING NAME="SystemName"><KEYVALUE VALUETYPE="string">host</KEYVALUE></KEYBINDING></INSTANCENAME></IPARAMVALUE></IMETHODCALL>"#
        )),
        wrap(format!(
            r#"<METHODCALL NAME="DefineSystem"><LOCALCLASSPATH>{NS}<CLASSNAME NAME="Msvm_VirtualSystemManagementService"/></LOCALCLASSPATH><PARAMVALUE NAME="SystemSettings" PARAMTYPE="string" EmbeddedObject="instance"><VALUE>&lt;INSTANCE CLASSNAME="Msvm_VirtualSystemSettingData"&gt;&lt;PROPERTY NAME="ElementName" TYPE="string"&gt;&lt;VALUE&gt;x&lt;/VALUE&gt;&lt;/PROPERTY&gt;&lt;/INSTANCE&gt;</VALUE></PARAMVALUE></METHODCALL>"#
        )),
    ]
}

const WQL_TOKENS: &[&str] = &[
    "SELECT",
    "select",
    "*",
    "FROM",
    "WHERE",
    "AND",
    "OR",
    "NOT",
    "IS",
    "NULL",
    "LIKE",
    "ISA",
    "ASSOCIATORS",
    "REFERENCES",
    "OF",
    "{Msvm_ComputerSystem.Name='x'}",
    "{",
    "}",
    "AssocClass",
    "ResultClass",
    "ClassDefsOnly",
    "=",
    "<>",
    "!=",
    "<",
    ">=",
    "(",
    ")",
    ",",
    ".",
    "'a'",
    "\"b\"",
    "'",
    "\"",
    "12",
    "-3",
    "1.5e3",
    "Msvm_ComputerSystem",
    "EnabledState",
    "Name",
    "TRUE",
    "\\",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn wql_parser_never_panics_on_any_text(text in ".{0,200}") {
        let _ = wql::parse(&text);
    }

    #[test]
    fn wql_parser_never_panics_on_token_soup(tokens in proptest::collection::vec(proptest::sample::select(WQL_TOKENS), 0..24)) {
        let text = tokens.join(" ");
        if let Err(error) = wql::parse(&text) {
            prop_assert!(error.position <= text.chars().count());
        }
    }

    #[test]
    fn object_path_parser_never_panics(text in ".{0,120}") {
        let _ = ObjectPath::parse(&text);
    }

    #[test]
    fn cimxml_parser_never_panics_on_any_text(text in ".{0,300}") {
        let _ = parse_request(&text);
        let _ = parse_instance(&text);
    }

    #[test]
    fn cut_and_spliced_requests_never_panic_the_provider(
        which in 0..4usize,
        cut in 0..2000usize,
        len in 0..40usize,
        insert in "[<>&;\"'/=A-Za-z ]{0,12}",
    ) {
        let original = &requests()[which];
        let start = cut.min(original.len());
        let end = (start + len).min(original.len());
        if original.is_char_boundary(start) && original.is_char_boundary(end) {
            let mutated = format!("{}{}{}", &original[..start], insert, &original[end..]);
            if let Ok(request) = parse_request(&mutated) {
                let response = provider().handle(&request);
                prop_assert!(response.starts_with("<?xml"));
            }
        }
    }
}

#[test]
fn unmodified_requests_are_answered() {
    for text in requests() {
        let request = parse_request(&text).expect("valid request");

        let response = provider().handle(&request);

        assert!(!response.contains("<ERROR"), "{response}");
    }
}
