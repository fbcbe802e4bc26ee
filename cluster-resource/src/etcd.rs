//! A blocking etcd client that survives endpoints going down.
//!
//! etcd-client's balanced channel fails a call routed to a listed endpoint that is down, so this
//! wrapper talks to one endpoint at a time: a call that fails (or does not answer within the
//! request timeout) drops that connection and is retried on the next endpoint, round robin,
//! until every endpoint has been tried twice. The async client runs on a small runtime of its
//! own; callers (the daemon, vmm-core's threads, the OCF agent) stay synchronous.

use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

use crate::error::{ClusterError, Result};

/// Timeouts of the etcd connection.
#[derive(Debug, Clone, Copy)]
pub struct EtcdTimeouts {
    /// Connecting to one endpoint.
    pub connect: Duration,
    /// One request on one endpoint.
    pub request: Duration,
}

impl Default for EtcdTimeouts {
    fn default() -> Self {
        EtcdTimeouts {
            connect: Duration::from_millis(300),
            request: Duration::from_millis(700),
        }
    }
}

/// One endpoint's health: its leader's id and raft index, or why it did not answer.
pub type EndpointHealth = std::result::Result<(u64, u64), String>;

/// A connection to an etcd cluster with endpoint failover.
pub struct Etcd {
    runtime: tokio::runtime::Runtime,
    endpoints: Vec<String>,
    timeouts: EtcdTimeouts,
    /// The endpoint in use and its client.
    current: Mutex<(usize, Option<Client>)>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints)
            .field("timeouts", &self.timeouts)
            .finish_non_exhaustive()
    }
}

impl Etcd {
    /// Parses `endpoints` (comma-separated `host:port` or `http://host:port`); connects lazily.
    pub fn new(endpoints: &str, timeouts: EtcdTimeouts) -> Result<Self> {
        let endpoints: Vec<String> = endpoints
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| {
                if e.contains("://") {
                    e.to_owned()
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        if endpoints.is_empty() {
            return Err(ClusterError::Invalid {
                what: "etcd endpoints",
                why: "none given".into(),
            });
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd")
            .enable_all()
            .build()
            .map_err(|source| ClusterError::Start {
                what: "the etcd runtime",
                source,
            })?;
        Ok(Etcd {
            runtime,
            endpoints,
            timeouts,
            current: Mutex::new((0, None)),
        })
    }

    /// The endpoints, as given.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Runs `call` on a connected client, moving to the next endpoint on failure.
    pub fn call<T, F, Fut>(&self, call: F) -> Result<T>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let attempts = self.endpoints.len() * 2;
        let mut last = String::new();
        for _ in 0..attempts {
            let (index, client) = match self.client() {
                Ok(found) => found,
                Err(error) => {
                    last = error;
                    self.rotate(None);
                    continue;
                }
            };
            let outcome = self.runtime.block_on(async {
                tokio::time::timeout(self.timeouts.request, call(client)).await
            });
            match outcome {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(error)) => last = format!("{}: {error}", self.endpoints[index]),
                Err(_) => last = format!("{}: no answer in time", self.endpoints[index]),
            }
            self.rotate(Some(index));
        }
        Err(ClusterError::EtcdUnreachable {
            endpoints: self.endpoints.join(","),
            last,
        })
    }

    /// Asks each endpoint for its status: (endpoint, Ok(leader id, raft index) or the error).
    pub fn health(&self) -> Vec<(String, EndpointHealth)> {
        self.endpoints
            .iter()
            .map(|endpoint| {
                let result = self.runtime.block_on(async {
                    let client = tokio::time::timeout(
                        self.timeouts.connect,
                        Client::connect([endpoint.as_str()], Some(self.options())),
                    )
                    .await
                    .map_err(|_| "no connection in time".to_owned())?
                    .map_err(|e| e.to_string())?;
                    let mut client = client;
                    let status = tokio::time::timeout(self.timeouts.request, client.status())
                        .await
                        .map_err(|_| "no answer in time".to_owned())?
                        .map_err(|e| e.to_string())?;
                    Ok((status.leader(), status.raft_index()))
                });
                (endpoint.clone(), result)
            })
            .collect()
    }

    fn options(&self) -> ConnectOptions {
        ConnectOptions::new()
            .with_connect_timeout(self.timeouts.connect)
            .with_timeout(self.timeouts.request)
    }

    /// The client in use, connecting to the current endpoint if there is none.
    fn client(&self) -> std::result::Result<(usize, Client), String> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let index = current.0;
        if let Some(client) = &current.1 {
            return Ok((index, client.clone()));
        }
        let endpoint = &self.endpoints[index];
        let connected = self.runtime.block_on(async {
            tokio::time::timeout(
                self.timeouts.connect,
                Client::connect([endpoint.as_str()], Some(self.options())),
            )
            .await
        });
        match connected {
            Ok(Ok(client)) => {
                current.1 = Some(client.clone());
                Ok((index, client))
            }
            Ok(Err(error)) => Err(format!("{endpoint}: {error}")),
            Err(_) => Err(format!("{endpoint}: no connection in time")),
        }
    }

    /// Drops the client of endpoint `failed` (or the current one) and moves to the next.
    fn rotate(&self, failed: Option<usize>) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if failed.is_none_or(|f| f == current.0) {
            current.0 = (current.0 + 1) % self.endpoints.len();
            current.1 = None;
        }
    }
}
