//! Ownership and fencing tokens on a real etcd (one member, started and stopped by the test).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster_resource::ownership::{self, Keys};
use cluster_resource::{ClusterError, ClusterNode, ClusterOptions, Etcd, EtcdTimeouts, NodeLease};
use vmm_core::{ClusterCoordinator, VmId};

struct EtcdMember {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for EtcdMember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

/// One etcd member, or `None` (the test skips) when etcd is not installed.
fn etcd() -> Option<EtcdMember> {
    if Command::new("etcd").arg("--version").output().is_err() {
        eprintln!("skipped: etcd is not installed (Debian etcd-server)");
        return None;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let (client, peer) = (port(), port());
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .args(["--name", "m0", "--data-dir"])
        .arg(dir.path().join("m0"))
        .args([
            "--listen-client-urls",
            &client_url,
            "--advertise-client-urls",
            &client_url,
        ])
        .args([
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
        ])
        .args(["--initial-cluster", &format!("m0={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start etcd");
    let member = EtcdMember {
        child,
        endpoint: format!("127.0.0.1:{client}"),
        _dir: dir,
    };
    let etcd = Etcd::new(&member.endpoint, EtcdTimeouts::default()).expect("client");
    let deadline = Instant::now() + Duration::from_secs(30);
    while etcd.health().iter().any(|(_, h)| h.is_err()) {
        assert!(Instant::now() < deadline, "etcd did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(member)
}

fn lease(endpoint: &str, name: &str) -> (Arc<Etcd>, Arc<NodeLease>) {
    let etcd = Arc::new(Etcd::new(endpoint, EtcdTimeouts::default()).expect("client"));
    let lease = NodeLease::register(
        Arc::clone(&etcd),
        Keys::default(),
        name,
        Duration::from_secs(3),
    )
    .expect("lease");
    (etcd, lease)
}

#[test]
fn one_campaign_wins_and_the_loser_sees_the_winner() {
    let Some(member) = etcd() else { return };
    let (etcd, a) = lease(&member.endpoint, "a");
    let (_, b) = lease(&member.endpoint, "b");
    let vm = VmId::new_random();
    let keys = Keys::default();

    let first = ownership::campaign(&etcd, &keys, vm, "a", a.id()).expect("campaign a");
    let second = ownership::campaign(&etcd, &keys, vm, "b", b.id()).expect("campaign b");

    assert_eq!(first.node, "a");
    assert_eq!(second, first, "b sees a's ownership and token");
}

#[test]
fn a_stale_fencing_token_is_refused_after_the_lease_is_gone() {
    let Some(member) = etcd() else { return };
    let (etcd, a) = lease(&member.endpoint, "a");
    let (_, b) = lease(&member.endpoint, "b");
    let vm = VmId::new_random();
    let keys = Keys::default();
    let old = ownership::campaign(&etcd, &keys, vm, "a", a.id()).expect("a owns");

    // a's lease goes (as when it expires); b takes the VM over with a newer token.
    a.revoke();
    let new = ownership::campaign(&etcd, &keys, vm, "b", b.id()).expect("b owns");
    let stale = ownership::guarded(&etcd, &keys, vm, old.token, Vec::new());

    assert_eq!(new.node, "b");
    assert!(new.token > old.token, "tokens increase");
    assert!(matches!(stale, Err(ClusterError::OwnershipLost(v)) if v == vm));
    assert!(ownership::guarded(&etcd, &keys, vm, new.token, Vec::new()).is_ok());
}

#[test]
fn coordinator_refuses_writes_about_a_vm_another_node_owns() {
    let Some(member) = etcd() else { return };
    let store = tempfile::tempdir().expect("store");
    let options = |node: &str| ClusterOptions {
        endpoints: member.endpoint.clone(),
        node: node.into(),
        ttl: Duration::from_secs(3),
        prefix: "/vmms".into(),
    };
    let a = ClusterNode::join(&options("a"), store.path().join("vms")).expect("join a");
    let b = ClusterNode::join(&options("b"), store.path().join("vms")).expect("join b");
    let vm = VmId::new_random();
    std::fs::create_dir_all(store.path().join("vms").join(vm.to_string())).expect("vm dir");

    let token = a.acquire(vm).expect("a owns");
    a.write_fence(vm, token).expect("fence");

    assert!(a.guard_write(vm).is_ok());
    assert!(
        b.guard_write(vm)
            .is_err_and(|e| e.contains("owned by node a"))
    );
    assert!(matches!(
        b.acquire(vm),
        Err(ClusterError::OwnedElsewhere { .. })
    ));
    let fence =
        std::fs::read_to_string(store.path().join("vms").join(vm.to_string()).join("fence"))
            .expect("fence file");
    assert_eq!(fence, token.to_string());
}

#[test]
fn endpoints_that_are_down_are_skipped() {
    let Some(member) = etcd() else { return };
    // The first endpoint listed refuses connections; calls move on to the live one.
    let dead = format!("127.0.0.1:{}", port());
    let etcd = Etcd::new(
        &format!("{dead},{}", member.endpoint),
        EtcdTimeouts::default(),
    )
    .expect("client");

    let written = ownership::write(&etcd, "/vmms/test", "x");
    let read = ownership::read(&etcd, "/vmms/test").expect("read");

    assert!(written.is_ok());
    assert_eq!(read.as_deref(), Some("x"));
}
