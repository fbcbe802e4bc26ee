//! The listener over raw TCP: real sockets, real backends, bytes checked end to end.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdp_listener::pcb::encode_v2;
use rdp_listener::{ConsoleRegistry, Listener, ListenerConfig, Refusal, Route, RouteRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use uuid::Uuid;

/// VMs by GUID, each with a TCP backend.
struct Backends(HashMap<Uuid, SocketAddr>);

impl ConsoleRegistry for Backends {
    fn route(&self, request: &RouteRequest<'_>) -> Result<Route, Refusal> {
        let vm = request.target.vm;
        let address = self.0.get(&vm).ok_or(Refusal::UnknownVm(vm))?;
        Ok(Route::Tcp {
            address: *address,
            forward_pcb: false,
        })
    }
}

/// A backend that greets with its name, then echoes.
async fn backend(name: &'static str) -> SocketAddr {
    let socket = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    let address = socket.local_addr().expect("backend address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = socket.accept().await {
            tokio::spawn(async move {
                let _ = stream.write_all(name.as_bytes()).await;
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    address
}

struct Running {
    address: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
    counts: rdp_listener::ConnectionCounts,
}

async fn start(config: ListenerConfig, registry: Backends) -> Running {
    let listener = Listener::bind(ListenerConfig {
        address: "127.0.0.1:0".parse().expect("address"),
        ..config
    })
    .await
    .expect("bind listener");
    let address = listener.local_address().expect("listener address");
    let counts = listener.counts();
    let (stop, stopped) = oneshot::channel();
    let done = tokio::spawn(listener.run(Arc::new(registry), async {
        let _ = stopped.await;
    }));
    Running {
        address,
        stop: Some(stop),
        done,
        counts,
    }
}

async fn read_exactly(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut buf))
        .await
        .expect("read in time")
        .expect("read");
    buf
}

/// Waits until the peer closes; returns how long that took.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(limit, stream.read(&mut buf)).await {
            Err(_) => panic!("connection still open after {limit:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => {}
        }
    }
}

async fn two_vms() -> (Uuid, Uuid, Backends) {
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let map = HashMap::from([(a, backend("vm-a").await), (b, backend("vm-b").await)]);
    (a, b, Backends(map))
}

#[tokio::test]
async fn each_pcb_reaches_its_own_vm_backend_with_following_bytes_untouched() {
    let (a, b, registry) = two_vms().await;
    let running = start(ListenerConfig::default(), registry).await;

    for (vm, name) in [(a, "vm-a"), (b, "vm-b"), (a, "vm-a")] {
        let mut client = TcpStream::connect(running.address).await.expect("connect");
        // The PCB and the first client bytes in one write, as FreeRDP's TLS hello often is.
        let mut wire = encode_v2(&format!("{{{}}}", vm.to_string().to_uppercase()));
        let payload: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        wire.extend_from_slice(&payload);
        client.write_all(&wire).await.expect("send");

        assert_eq!(read_exactly(&mut client, name.len()).await, name.as_bytes());
        assert_eq!(read_exactly(&mut client, payload.len()).await, payload);
    }
}

#[tokio::test]
async fn unknown_guid_is_closed() {
    let (_, _, registry) = two_vms().await;
    let running = start(ListenerConfig::default(), registry).await;
    let mut client = TcpStream::connect(running.address).await.expect("connect");

    client
        .write_all(&encode_v2(&Uuid::new_v4().to_string()))
        .await
        .expect("send");

    closed_within(&mut client, Duration::from_secs(10)).await;
}

#[tokio::test]
async fn silent_client_is_dropped_at_the_pcb_deadline() {
    let (_, _, registry) = two_vms().await;
    let deadline = Duration::from_millis(400);
    let config = ListenerConfig {
        pcb_deadline: deadline,
        ..ListenerConfig::default()
    };
    let running = start(config, registry).await;
    let mut client = TcpStream::connect(running.address).await.expect("connect");

    let took = closed_within(&mut client, Duration::from_secs(10)).await;

    assert!(
        took >= deadline - Duration::from_millis(50),
        "closed after {took:?}"
    );
}

#[tokio::test]
async fn tpkt_without_pcb_is_refused_unless_a_default_vm_is_set() {
    let (a, _, registry) = two_vms().await;
    let x224 = [
        0x03, 0x00, 0x00, 0x13, 0x0e, 0xe0, 0, 0, 0, 0, 0, 1, 0, 8, 0, 3, 0, 0, 0,
    ];
    let running = start(ListenerConfig::default(), registry).await;
    let mut refused = TcpStream::connect(running.address).await.expect("connect");
    refused.write_all(&x224).await.expect("send");
    closed_within(&mut refused, Duration::from_secs(10)).await;

    let registry = Backends(HashMap::from([(a, backend("vm-a").await)]));
    let config = ListenerConfig {
        default_vm: Some(a),
        ..ListenerConfig::default()
    };
    let defaulted = start(config, registry).await;
    let mut client = TcpStream::connect(defaulted.address)
        .await
        .expect("connect");
    client.write_all(&x224).await.expect("send");

    assert_eq!(read_exactly(&mut client, 4).await, b"vm-a");
    assert_eq!(read_exactly(&mut client, x224.len()).await, x224);
}

#[tokio::test]
async fn per_vm_limit_refuses_the_extra_session_and_frees_the_slot_on_close() {
    let (a, _, registry) = two_vms().await;
    let config = ListenerConfig {
        max_per_vm: 1,
        ..ListenerConfig::default()
    };
    let running = start(config, registry).await;
    let mut first = TcpStream::connect(running.address).await.expect("connect");
    first
        .write_all(&encode_v2(&a.to_string()))
        .await
        .expect("send");
    assert_eq!(read_exactly(&mut first, 4).await, b"vm-a");
    assert_eq!(running.counts.for_vm(a), 1);

    let mut second = TcpStream::connect(running.address).await.expect("connect");
    second
        .write_all(&encode_v2(&a.to_string()))
        .await
        .expect("send");
    closed_within(&mut second, Duration::from_secs(10)).await;

    drop(first);
    let started = Instant::now();
    while running.counts.for_vm(a) != 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "slot never freed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut third = TcpStream::connect(running.address).await.expect("connect");
    third
        .write_all(&encode_v2(&a.to_string()))
        .await
        .expect("send");
    assert_eq!(read_exactly(&mut third, 4).await, b"vm-a");
}

#[tokio::test]
async fn non_loopback_address_needs_opt_in() {
    let config = ListenerConfig {
        address: "0.0.0.0:0".parse().expect("address"),
        ..ListenerConfig::default()
    };

    let error = Listener::bind(config).await.unwrap_err();

    assert!(matches!(
        error,
        rdp_listener::ListenerError::RemoteNotAllowed(_)
    ));
}

#[tokio::test]
async fn shutdown_closes_live_sessions_and_stops_accepting() {
    let (a, _, registry) = two_vms().await;
    let mut running = start(ListenerConfig::default(), registry).await;
    let mut client = TcpStream::connect(running.address).await.expect("connect");
    client
        .write_all(&encode_v2(&a.to_string()))
        .await
        .expect("send");
    assert_eq!(read_exactly(&mut client, 4).await, b"vm-a");

    let _ = running.stop.take().map(|stop| stop.send(()));

    closed_within(&mut client, Duration::from_secs(10)).await;
    tokio::time::timeout(Duration::from_secs(10), &mut running.done)
        .await
        .expect("listener ended")
        .expect("listener task");
    assert!(TcpStream::connect(running.address).await.is_err());
}
