//! The single-port RDP listener's cost: connection set-up through the listener (PCB read,
//! route, backend connect) against connecting straight to the backend, and splice throughput on
//! loopback against the direct path.

#![allow(missing_docs)] // criterion_group! makes an undocumented pub fn

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rdp_listener::pcb::encode_v2;
use rdp_listener::{ConsoleRegistry, Listener, ListenerConfig, Refusal, Route, RouteRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Table(HashMap<uuid::Uuid, SocketAddr>);

impl ConsoleRegistry for Table {
    fn route(&self, request: &RouteRequest<'_>) -> Result<Route, Refusal> {
        let vm = request.target.vm;
        let address = *self.0.get(&vm).ok_or(Refusal::UnknownVm(vm))?;
        Ok(Route::Tcp {
            address,
            forward_pcb: false,
        })
    }
}

/// An echo backend and the listener in front of it, on a runtime of their own.
fn servers(runtime: &tokio::runtime::Runtime, vm: uuid::Uuid) -> (SocketAddr, SocketAddr) {
    runtime.block_on(async {
        let backend = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let backend_address = backend.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = backend.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = stream.read(&mut buf).await {
                        if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let config = ListenerConfig {
            address: "127.0.0.1:0".parse().expect("address"),
            max_connections: 4096,
            max_per_vm: 4096,
            ..ListenerConfig::default()
        };
        let listener = Listener::bind(config).await.expect("bind listener");
        let listener_address = listener.local_address().expect("address");
        let registry = Arc::new(Table(HashMap::from([(vm, backend_address)])));
        tokio::spawn(listener.run(registry, std::future::pending()));
        (backend_address, listener_address)
    })
}

/// Connect, (PCB), one byte there and back.
fn round_trip(address: SocketAddr, pcb: Option<&[u8]>) {
    let mut stream = TcpStream::connect(address).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    if let Some(pcb) = pcb {
        stream.write_all(pcb).expect("pcb");
    }
    stream.write_all(&[0x16]).expect("first byte");
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).expect("echo");
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let vm = uuid::Uuid::new_v4();
    let (backend, listener) = servers(&runtime, vm);
    let pcb = encode_v2(&vm.to_string());

    let mut setup = c.benchmark_group("rdp_connection_setup");
    setup.bench_function("direct", |b| b.iter(|| round_trip(backend, None)));
    setup.bench_function("via_listener", |b| {
        b.iter(|| round_trip(listener, Some(&pcb)));
    });
    setup.finish();

    const CHUNK: usize = 256 * 1024;
    const CHUNKS: usize = 16;
    let mut splice = c.benchmark_group("rdp_splice_echo_4MiB");
    splice.throughput(Throughput::Bytes((CHUNK * CHUNKS) as u64));
    splice.sample_size(20);
    let payload = vec![0xa5u8; CHUNK];
    for (name, address, pcb) in [
        ("direct", backend, None),
        ("via_listener", listener, Some(pcb.as_slice())),
    ] {
        let mut stream = TcpStream::connect(address).expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        if let Some(pcb) = pcb {
            stream.write_all(pcb).expect("pcb");
        }
        let mut reader = stream.try_clone().expect("clone");
        let mut back = vec![0u8; CHUNK];
        splice.bench_function(name, |b| {
            b.iter(|| {
                thread_scope_echo(&mut stream, &mut reader, &payload, &mut back, CHUNKS);
            });
        });
    }
    splice.finish();
}

/// Writes `chunks` payloads while reading the echo on another thread (so neither side blocks on
/// a full socket buffer).
fn thread_scope_echo(
    writer: &mut TcpStream,
    reader: &mut TcpStream,
    payload: &[u8],
    back: &mut [u8],
    chunks: usize,
) {
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for _ in 0..chunks {
                reader.read_exact(back).expect("echo");
            }
        });
        for _ in 0..chunks {
            writer.write_all(payload).expect("send");
        }
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
