//! The CIM-XML endpoint's costs with 1,000 defined VMs: EnumerateInstances of
//! Msvm_ComputerSystem as server time (parse + provider + XML, what `WBEMServerResponseTime`
//! reports) and as a loopback HTTP round trip, next to the baseline of reading the same VMs from
//! vmm-core (`list_vms`); and GetInstance operations per second over one keep-alive connection.
//!
//! The service is vmm-core with a launcher that starts no guest: the VMs are defined, not run,
//! so what is measured is the provider and the endpoint, not KVM.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, Throughput};
use vmm_core::{
    EventSink, LaunchMode, VirtualSystemManagementService, VmConfig, VmId, Worker, WorkerError,
    WorkerLauncher, WorkerStatus,
};
use wmi_model::Provider;
use wmi_model::cimxml::parse_request;
use wmi_model::server::{Endpoint, ServerConfig};

const VMS: usize = 1000;

#[derive(Debug)]
struct NoGuest;

impl Worker for NoGuest {
    fn pid(&self) -> u32 {
        std::process::id()
    }
    fn status(&self) -> WorkerStatus {
        WorkerStatus::Running
    }
    fn pause(&self) -> Result<(), WorkerError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), WorkerError> {
        Ok(())
    }
    fn save(&self, _: &Path, _: &Path) -> Result<(), WorkerError> {
        Ok(())
    }
    fn reset(&self) -> Result<(), WorkerError> {
        Ok(())
    }
    fn turn_off(&self) -> Result<(), WorkerError> {
        Ok(())
    }
}

#[derive(Debug)]
struct Launcher;

impl WorkerLauncher for Launcher {
    fn launch(
        &self,
        _: &VmConfig,
        _: LaunchMode,
        _: EventSink,
    ) -> Result<Box<dyn Worker>, WorkerError> {
        Ok(Box::new(NoGuest))
    }
    fn reattach(&self, _: VmId, _: EventSink) -> Result<Option<Box<dyn Worker>>, WorkerError> {
        Ok(None)
    }
}

const NS: &str = r#"<LOCALNAMESPACEPATH><NAMESPACE NAME="root"/><NAMESPACE NAME="virtualization"/><NAMESPACE NAME="v2"/></LOCALNAMESPACEPATH>"#;

fn wrap(body: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="utf-8" ?><CIM CIMVERSION="2.0" DTDVERSION="2.0"><MESSAGE ID="1001" PROTOCOLVERSION="1.0"><SIMPLEREQ>{body}</SIMPLEREQ></MESSAGE></CIM>"#
    )
}

fn enumerate_body() -> String {
    wrap(&format!(
        r#"<IMETHODCALL NAME="EnumerateInstances">{NS}<IPARAMVALUE NAME="ClassName"><CLASSNAME NAME="Msvm_ComputerSystem"/></IPARAMVALUE></IMETHODCALL>"#
    ))
}

fn get_body(id: VmId) -> String {
    wrap(&format!(
        r#"<IMETHODCALL NAME="GetInstance">{NS}<IPARAMVALUE NAME="InstanceName"><INSTANCENAME CLASSNAME="Msvm_ComputerSystem"><KEYBINDING NAME="CreationClassName"><KEYVALUE VALUETYPE="string">Msvm_ComputerSystem</KEYVALUE></KEYBINDING><KEYBINDING NAME="Name"><KEYVALUE VALUETYPE="string">{id}</KEYVALUE></KEYBINDING></INSTANCENAME></IPARAMVALUE></IMETHODCALL>"#
    ))
}

/// A keep-alive CIM-XML client over plain HTTP/1.1.
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    fn call(&mut self, method: &str, body: &str) -> usize {
        write!(
            self.writer,
            "POST /cimom HTTP/1.1\r\nHost: bench\r\nContent-Type: application/xml; charset=\"utf-8\"\r\nCIMOperation: MethodCall\r\nCIMMethod: {method}\r\nCIMObject: root/virtualization/v2\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut length = 0;
        let mut line = String::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse().unwrap();
            }
        }
        let mut response = vec![0; length];
        self.reader.read_exact(&mut response).unwrap();
        assert!(!response.windows(6).any(|w| w == b"<ERROR"));
        length
    }
}

fn benches(c: &mut Criterion, measuring: bool) {
    let store = tempfile::tempdir().unwrap();
    let vmms = VirtualSystemManagementService::open(store.path(), Arc::new(Launcher)).unwrap();
    let ids: Vec<VmId> = (0..VMS)
        .map(|i| {
            vmms.define_system(VmConfig::new(format!("vm{i:04}")))
                .unwrap()
        })
        .collect();
    let provider = Arc::new(Provider::new(vmms.clone(), "bench"));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let endpoint = runtime
        .block_on(Endpoint::bind(
            Arc::clone(&provider),
            ServerConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                ..ServerConfig::default()
            },
        ))
        .unwrap();
    let addr = endpoint.local_addr().unwrap();
    runtime.spawn(endpoint.run());

    let enumerate = enumerate_body();
    let mut group = c.benchmark_group("cim_enumerate_1000_vms");
    group.sample_size(30);
    group.bench_function("baseline_vmm_core_list_vms", |b| {
        b.iter(|| assert_eq!(vmms.list_vms().len(), VMS));
    });
    group.bench_function("server_time_parse_provider_xml", |b| {
        b.iter(|| {
            let request = parse_request(&enumerate).unwrap();
            provider.handle(&request).len()
        });
    });
    if measuring {
        report_cpu_time(&provider, &enumerate);
    }
    let mut client = Client::connect(addr);
    group.bench_function("http_round_trip", |b| {
        b.iter(|| client.call("EnumerateInstances", &enumerate));
    });
    group.finish();

    let get = get_body(ids[VMS / 2]);
    let mut group = c.benchmark_group("cim_keepalive");
    group.throughput(Throughput::Elements(1));
    let mut client = Client::connect(addr);
    group.bench_function("get_instance_one_connection", |b| {
        b.iter(|| client.call("GetInstance", &get));
    });
    group.finish();
}

/// This thread's CPU time: what the server spends, whatever else the machine runs.
fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for clock_gettime.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Prints the server's CPU time per EnumerateInstances: on a loaded machine wall time measures
/// the scheduler as much as the code.
fn report_cpu_time(provider: &Provider, body: &str) {
    const ROUNDS: u32 = 20;
    let start = thread_cpu_time();
    let mut bytes = 0;
    for _ in 0..ROUNDS {
        let request = parse_request(body).unwrap();
        bytes = provider.handle(&request).len();
    }
    let per = (thread_cpu_time() - start) / ROUNDS;
    println!(
        "cim_enumerate_1000_vms/server_cpu_time: {:.2} ms per request ({bytes} bytes of CIM-XML)",
        per.as_secs_f64() * 1e3
    );
}

fn main() {
    // `cargo bench` passes --bench; test runners list (--list) or smoke-test the benches without
    // it: then there is nothing to set up (1,000 VMs) and the one-shot CPU figure is not printed.
    let measuring = std::env::args().any(|a| a == "--bench");
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let mut criterion = Criterion::default().configure_from_args();
    benches(&mut criterion, measuring);
    criterion.final_summary();
}
