//! The pre-connection PDU parser against real client bytes and hostile input.

use proptest::prelude::*;
use rdp_listener::pcb::{ConsoleTarget, PCB_MAX_SIZE, PcbError, PreconnectionPdu, encode_v2};

const GUID: &str = "6d2c3b1a-0f4e-4c8b-9a7d-112233445566";

/// What FreeRDP 2.x sends for `/vmconnect:<GUID>` (captured layout: cbSize 94 = 0x5E, Flags 0,
/// Version 2, Id 0, cchPCB 38 = 0x26: the 36-character GUID and two UTF-16 NULs).
fn freerdp_vmconnect_bytes() -> Vec<u8> {
    let mut bytes = vec![
        0x5e, 0x00, 0x00, 0x00, // cbSize 94
        0x00, 0x00, 0x00, 0x00, // Flags
        0x02, 0x00, 0x00, 0x00, // Version 2
        0x00, 0x00, 0x00, 0x00, // Id
        0x26, 0x00, // cchPCB 38
    ];
    for b in GUID.bytes() {
        bytes.extend_from_slice(&[b, 0x00]);
    }
    bytes.extend_from_slice(&[0, 0, 0, 0]);
    assert_eq!(bytes.len(), 94);
    bytes
}

#[test]
fn freerdp_vmconnect_pdu_names_the_vm_and_leaves_the_tls_hello_untouched() {
    let mut wire = freerdp_vmconnect_bytes();
    let client_hello = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01];
    wire.extend_from_slice(&client_hello);

    let (pdu, rest) = PreconnectionPdu::decode(&wire).expect("valid pdu");

    assert_eq!(pdu.size, 94);
    assert_eq!(pdu.version, 2);
    assert_eq!(pdu.id, 0);
    assert_eq!(pdu.blob.as_deref(), Some(GUID));
    assert_eq!(rest, client_hello);
    let target = ConsoleTarget::parse(pdu.blob.as_deref().unwrap_or_default()).expect("guid");
    assert_eq!(target.vm.to_string(), GUID);
    assert_eq!(target.enhanced_mode(), None);
}

#[test]
fn v1_pdu_has_no_string() {
    let mut wire = vec![16, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0];
    wire.extend_from_slice(&[0x03, 0x00]);

    let (pdu, rest) = PreconnectionPdu::decode(&wire).expect("v1");

    assert_eq!((pdu.size, pdu.version, pdu.id), (16, 1, 7));
    assert_eq!(pdu.blob, None);
    assert_eq!(rest, [0x03, 0x00]);
}

#[test]
fn v2_with_empty_string_has_no_target() {
    let wire = [18, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0];

    let (pdu, rest) = PreconnectionPdu::decode(&wire).expect("empty v2");

    assert_eq!(pdu.blob, None);
    assert!(rest.is_empty());
}

#[test]
fn size_17_and_below_16_are_refused() {
    for size in [0u8, 4, 15, 17] {
        let mut wire = vec![size, 0, 0, 0];
        wire.resize(32, 0);
        assert_eq!(
            PreconnectionPdu::decode(&wire).unwrap_err(),
            PcbError::BadSize(u32::from(size)),
            "cbSize {size}"
        );
    }
}

#[test]
fn huge_size_is_refused_without_waiting_for_the_bytes() {
    let wire = [0xff, 0xff, 0xff, 0x7f];

    let error = PreconnectionPdu::decode(&wire).unwrap_err();

    assert_eq!(error, PcbError::TooLarge(0x7fff_ffff));
    let just_over = ((PCB_MAX_SIZE + 1) as u32).to_le_bytes();
    assert!(matches!(
        PreconnectionPdu::decode(&just_over),
        Err(PcbError::TooLarge(_))
    ));
}

#[test]
fn truncated_pdu_asks_for_exactly_cbsize_bytes() {
    let wire = freerdp_vmconnect_bytes();
    for cut in 0..wire.len() {
        let error = PreconnectionPdu::decode(&wire[..cut]).unwrap_err();
        let needed = if cut < 4 { 4 } else { 94 };
        assert_eq!(
            error,
            PcbError::Incomplete { needed, have: cut },
            "cut {cut}"
        );
    }
}

#[test]
fn string_longer_than_cbsize_is_refused() {
    let mut wire = encode_v2("abc");
    wire[16] = 40; // cchPCB 40 in a 26-byte PDU

    assert!(matches!(
        PreconnectionPdu::decode(&wire),
        Err(PcbError::StringOverrun { cch: 40, .. })
    ));
}

#[test]
fn unpaired_surrogate_is_refused() {
    let mut wire = encode_v2("ab");
    wire[18] = 0x00;
    wire[19] = 0xd8; // lone high surrogate

    assert_eq!(
        PreconnectionPdu::decode(&wire).unwrap_err(),
        PcbError::NotUtf16
    );
}

#[test]
fn target_accepts_braces_any_case_and_options() {
    let upper = format!("{{{}}};EnhancedMode=1", GUID.to_uppercase());

    let target = ConsoleTarget::parse(&upper).expect("braced upper-case guid");

    assert_eq!(target.vm.to_string(), GUID);
    assert_eq!(target.enhanced_mode(), Some(true));
    let basic = ConsoleTarget::parse(&format!("{GUID};enhancedmode=0;Extra")).expect("options");
    assert_eq!(basic.enhanced_mode(), Some(false));
    assert_eq!(basic.options[1], ("Extra".to_owned(), String::new()));
}

#[test]
fn target_refuses_what_is_not_a_hyphenated_guid() {
    for bad in [
        "",
        "web1",
        "6d2c3b1a0f4e4c8b9a7d112233445566",
        "{6d2c3b1a-0f4e-4c8b-9a7d-112233445566",
        "urn:uuid:6d2c3b1a-0f4e-4c8b-9a7d-112233445566",
        "6d2c3b1a-0f4e-4c8b-9a7d-11223344556g",
    ] {
        assert!(ConsoleTarget::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn hyper_v_sizes_match_the_reference() {
    assert_eq!(encode_v2(GUID).len(), 92);
    assert_eq!(encode_v2(&format!("{GUID};EnhancedMode=1")).len(), 122);
}

proptest! {
    #[test]
    fn decode_never_panics_and_never_reads_past_cbsize(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        match PreconnectionPdu::decode(&bytes) {
            Ok((pdu, rest)) => {
                prop_assert_eq!(pdu.size + rest.len(), bytes.len());
                prop_assert_eq!(rest, &bytes[pdu.size..]);
            }
            Err(PcbError::Incomplete { needed, have }) => prop_assert!(needed > have),
            Err(_) => {}
        }
    }

    #[test]
    fn encoded_blob_round_trips_with_any_trailing_bytes(
        blob in "[^\u{0}]{0,60}",
        trailing in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut wire = encode_v2(&blob);
        let size = wire.len();
        wire.extend_from_slice(&trailing);
        let (pdu, rest) = PreconnectionPdu::decode(&wire).expect("own encoding");
        prop_assert_eq!(pdu.size, size);
        prop_assert_eq!(pdu.blob.unwrap_or_default(), blob);
        prop_assert_eq!(rest, trailing.as_slice());
    }

    #[test]
    fn target_parse_never_panics(text in ".{0,80}") {
        let _ = ConsoleTarget::parse(&text);
    }
}
