//! Delivering indications: vmm-core events → indications → `ExportIndication` POSTs, in order,
//! one queue per listener so a slow listener delays only itself.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::cimxml::export_indication;
use crate::provider::Provider;
use crate::schema::VIRTUALIZATION_NAMESPACE;

/// How long one delivery may take before it is abandoned.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Indications queued per listener before new ones are dropped.
const QUEUE_DEPTH: usize = 1024;

/// Starts a thread that turns the service's events into indications for the current
/// subscriptions and a task per listener on `runtime` that posts them.
pub fn spawn_indication_delivery(
    provider: Arc<Provider>,
    runtime: tokio::runtime::Handle,
) -> std::io::Result<()> {
    let events = provider.service().subscribe();
    std::thread::Builder::new()
        .name("cim-indications".into())
        .spawn(move || {
            let mut queues: HashMap<String, mpsc::Sender<String>> = HashMap::new();
            let ids = AtomicU64::new(1);
            for event in events {
                for indication in provider.indications_for(&event) {
                    let urls = provider.subscriptions().destinations_for(&indication);
                    if urls.is_empty() {
                        continue;
                    }
                    let id = ids.fetch_add(1, Ordering::Relaxed).to_string();
                    let body = export_indication(
                        &id,
                        provider.host(),
                        VIRTUALIZATION_NAMESPACE,
                        &indication,
                    );
                    for url in urls {
                        let queue = queues.entry(url.clone()).or_insert_with(|| {
                            let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
                            runtime.spawn(deliver(url.clone(), rx));
                            tx
                        });
                        if queue.try_send(body.clone()).is_err() {
                            tracing::warn!(%url, "cim: listener queue full; indication dropped");
                        }
                    }
                }
            }
        })?;
    Ok(())
}

async fn deliver(url: String, mut queue: mpsc::Receiver<String>) {
    while let Some(body) = queue.recv().await {
        match tokio::time::timeout(DELIVERY_TIMEOUT, post(&url, &body)).await {
            Ok(Ok(status)) if (200..300).contains(&status) => {}
            Ok(Ok(status)) => tracing::warn!(%url, status, "cim: listener refused an indication"),
            Ok(Err(error)) => tracing::warn!(%url, %error, "cim: cannot deliver an indication"),
            Err(_) => tracing::warn!(%url, "cim: indication delivery timed out"),
        }
    }
}

/// One `ExportIndication` POST over a fresh connection; returns the HTTP status.
async fn post(url: &str, body: &str) -> std::io::Result<u16> {
    let invalid = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_owned());
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| invalid("not an http URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let address = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let mut stream = TcpStream::connect(address).await?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/xml; charset=\"utf-8\"\r\nContent-Length: {}\r\nCIMExport: MethodRequest\r\nCIMExportMethod: ExportIndication\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    while !response.windows(2).any(|w| w == b"\r\n") && response.len() < 8192 {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&response);
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("no HTTP status line"))
}
