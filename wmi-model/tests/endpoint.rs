//! The HTTP side of the endpoint (DSP0200): protocol errors get an HTTP status and a `CIMError`
//! header, authentication is enforced, and a stalled or hostile client never holds up another.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use wmi_model::Provider;
use wmi_model::server::{Credentials, Endpoint, ServerConfig};

/// An endpoint on a free loopback port, served by its own runtime (dropped with the test).
struct Running {
    _store: tempfile::TempDir,
    _runtime: tokio::runtime::Runtime,
    addr: SocketAddr,
}

fn start(config: ServerConfig) -> Running {
    let (store, vmms) = common::service();
    let provider = Arc::new(Provider::new(vmms, "host"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let endpoint = runtime
        .block_on(Endpoint::bind(
            provider,
            ServerConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                ..config
            },
        ))
        .unwrap();
    let addr = endpoint.local_addr().unwrap();
    runtime.spawn(endpoint.run());
    Running {
        _store: store,
        _runtime: runtime,
        addr,
    }
}

/// Status line and headers (lower-cased names) and body of one raw HTTP exchange.
fn exchange(addr: SocketAddr, request: &str) -> (u16, Vec<(String, String)>, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    let code = status.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':').unwrap();
        let (name, value) = (name.to_ascii_lowercase(), value.trim().to_owned());
        if name == "content-length" {
            length = value.parse().unwrap();
        }
        headers.push((name, value));
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    (code, headers, String::from_utf8_lossy(&body).into_owned())
}

fn post(body: &str, extra: &str) -> String {
    format!(
        "POST /cimom HTTP/1.1\r\nHost: t\r\nContent-Type: application/xml; charset=\"utf-8\"\r\nCIMOperation: MethodCall\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

fn enumerate_names() -> String {
    common::wrap(&format!(
        r#"<IMETHODCALL NAME="EnumerateInstanceNames">{}<IPARAMVALUE NAME="ClassName"><CLASSNAME NAME="Msvm_ComputerSystem"/></IPARAMVALUE></IMETHODCALL>"#,
        common::NS
    ))
}

#[test]
fn malformed_xml_is_400_request_not_well_formed() {
    let server = start(ServerConfig::default());

    let (code, headers, _) = exchange(server.addr, &post("<CIM><MESSAGE></CIM>", ""));

    assert_eq!(code, 400);
    assert_eq!(
        header(&headers, "cimerror"),
        Some("request-not-well-formed")
    );
}

#[test]
fn well_formed_but_invalid_request_is_400_request_not_valid() {
    let server = start(ServerConfig::default());

    let (code, headers, _) = exchange(server.addr, &post("<NOTCIM/>", ""));

    assert_eq!(code, 400);
    assert_eq!(header(&headers, "cimerror"), Some("request-not-valid"));
}

#[test]
fn oversized_request_is_413() {
    let server = start(ServerConfig {
        max_request_bytes: 1024,
        ..ServerConfig::default()
    });
    let body = format!("<CIM>{}</CIM>", "x".repeat(4096));

    let (code, _, _) = exchange(server.addr, &post(&body, ""));

    assert_eq!(code, 413);
}

#[test]
fn get_is_405_and_other_paths_404() {
    let server = start(ServerConfig::default());

    let (get, headers, _) = exchange(
        server.addr,
        "GET /cimom HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    let (other, _, _) = exchange(
        server.addr,
        &post(&enumerate_names(), "").replace("/cimom", "/other"),
    );

    assert_eq!(get, 405);
    assert_eq!(header(&headers, "allow"), Some("POST"));
    assert_eq!(other, 404);
}

#[test]
fn wrong_content_type_is_406_header_mismatch() {
    let server = start(ServerConfig::default());
    let request = post(&enumerate_names(), "").replace("application/xml", "application/json");

    let (code, headers, _) = exchange(server.addr, &request);

    assert_eq!(code, 406);
    assert_eq!(header(&headers, "cimerror"), Some("header-mismatch"));
}

#[test]
fn valid_request_gets_200_with_cim_headers() {
    let server = start(ServerConfig::default());

    let (code, headers, body) = exchange(server.addr, &post(&enumerate_names(), ""));

    assert_eq!(code, 200);
    assert_eq!(header(&headers, "cimoperation"), Some("MethodResponse"));
    assert!(header(&headers, "content-type").is_some_and(|t| t.starts_with("application/xml")));
    assert!(header(&headers, "wbemserverresponsetime").is_some());
    assert!(
        body.contains(r#"<MESSAGE ID="7""#) && body.contains("<INSTANCENAME"),
        "{body}"
    );
}

#[test]
fn basic_auth_is_required_when_configured() {
    let server = start(ServerConfig {
        credentials: Credentials::parse("admin:pw"),
        ..ServerConfig::default()
    });
    // "admin:pw" and "admin:no" in base64.
    let good = "Authorization: Basic YWRtaW46cHc=\r\n";
    let bad = "Authorization: Basic YWRtaW46bm8=\r\n";

    let (missing, headers, _) = exchange(server.addr, &post(&enumerate_names(), ""));
    let (wrong, _, _) = exchange(server.addr, &post(&enumerate_names(), bad));
    let (right, _, _) = exchange(server.addr, &post(&enumerate_names(), good));

    assert_eq!(missing, 401);
    assert!(header(&headers, "www-authenticate").is_some_and(|h| h.starts_with("Basic")));
    assert_eq!(wrong, 401);
    assert_eq!(right, 200);
}

#[test]
fn stalled_client_does_not_hold_up_another() {
    let server = start(ServerConfig::default());
    let mut stalled = TcpStream::connect(server.addr).unwrap();
    let request = post(&enumerate_names(), "");
    stalled
        .write_all(&request.as_bytes()[..request.len() / 2])
        .unwrap();

    let (code, _, _) = exchange(server.addr, &post(&enumerate_names(), ""));

    assert_eq!(code, 200);
    drop(stalled);
}

#[test]
fn non_loopback_bind_without_tls_is_refused() {
    let (_store, vmms) = common::service();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let result = runtime.block_on(Endpoint::bind(
        Arc::new(Provider::new(vmms, "host")),
        ServerConfig {
            listen: "127.0.0.2:0".parse().unwrap(),
            credentials: Credentials::parse("a:b"),
            ..ServerConfig::default()
        },
    ));

    assert!(matches!(
        result,
        Err(wmi_model::server::ServerError::TlsRequired(_))
    ));
}
