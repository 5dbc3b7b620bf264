//! A 3-node (or n-node) nats-server cluster on loopback, for the tests of replicated streams:
//! killing, restarting and freezing single nodes, and asking who leads a stream. Kept apart from
//! [`crate::Nats`] because starting a cluster (ports reserved up front, waiting for a meta
//! leader) is its own piece of work that only the cluster and fault tests need.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use gateway::cli::dev::NatsProcess;
use tempfile::TempDir;

use crate::nats::{nats_server_bin, signal};
use crate::netns::{Host, Net};
use crate::wait::eventually;

/// A cluster of real nats-servers with JetStream on loopback: each node has an ephemeral client
/// port, a cluster (route) port reserved up front, its own temp store dir, and routes to every
/// node. `start` returns once the JetStream meta group has a leader and an R3 stream can be
/// created. Nodes can be killed (SIGKILL, data kept), restarted on the same ports, and frozen.
pub struct NatsCluster {
    nodes: Vec<ClusterNode>,
    name: String,
    routes: String,
    /// The network of namespaced nodes ([`NatsCluster::start_in`]); `None` on loopback.
    net: Option<Arc<Net>>,
}

struct ClusterNode {
    server_name: String,
    process: Option<NodeProcess>,
    port: u16,
    cluster_port: u16,
    dir: TempDir,
    /// The node's namespace, when it has one.
    host: Option<Host>,
}

/// A node's nats-server: on loopback (ephemeral port), or in its namespace (fixed ports on the
/// namespace's address; `ip netns exec` execs the server, so the child is the server itself).
enum NodeProcess {
    Loopback(NatsProcess),
    Namespaced(tokio::process::Child),
}

impl NodeProcess {
    async fn kill(&mut self) {
        match self {
            Self::Loopback(p) => p.kill().await,
            Self::Namespaced(c) => {
                let _ = c.kill().await;
            }
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Self::Loopback(p) => p.pid(),
            Self::Namespaced(c) => c.id(),
        }
    }
}

/// A namespaced node's client and cluster ports (each namespace has its own port space).
const NS_CLIENT_PORT: u16 = 4222;
const NS_CLUSTER_PORT: u16 = 6222;

impl NatsCluster {
    /// Starts `size` nodes and waits until the cluster can serve replicated JetStream streams.
    pub async fn start(size: usize) -> Self {
        gateway::install_crypto_provider();
        // Cluster ports must be known before the first node starts (each node routes to all).
        // They are reserved by binding and releasing; a port taken in between makes a node fail
        // to start, and then the whole cluster is tried again on new ports.
        let mut last_error = None;
        for _attempt in 0..3 {
            match Self::try_start(size).await {
                Ok(cluster) => {
                    cluster.wait_for_jetstream(Duration::from_secs(30)).await;
                    return cluster;
                }
                Err(e) => last_error = Some(e),
            }
        }
        panic!("nats cluster does not start: {last_error:?}");
    }

    async fn try_start(size: usize) -> Result<Self, gateway::cli::dev::NatsProcessError> {
        static CLUSTERS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "gw-test-{}-{}",
            std::process::id(),
            CLUSTERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let reserved: Vec<std::net::TcpListener> = (0..size)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("reserve a port"))
            .collect();
        let cluster_ports: Vec<u16> = reserved
            .iter()
            .map(|l| l.local_addr().expect("reserved address").port())
            .collect();
        drop(reserved);
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            nodes: Vec::with_capacity(size),
            name,
            routes,
            net: None,
        };
        // Start all nodes at once: each waits for its own client port only.
        let starts = cluster_ports.iter().enumerate().map(|(i, &cluster_port)| {
            let dir = tempfile::tempdir().expect("temp dir");
            let server_name = format!("n{i}");
            let args = cluster.node_args(&server_name, cluster_port);
            async move {
                let process =
                    NatsProcess::start(&nats_server_bin(), None, dir.path(), &args).await?;
                Ok::<_, gateway::cli::dev::NatsProcessError>(ClusterNode {
                    server_name,
                    port: process.port(),
                    process: Some(NodeProcess::Loopback(process)),
                    cluster_port,
                    dir,
                    host: None,
                })
            }
        });
        for node in futures::future::join_all(starts).await {
            cluster.nodes.push(node?);
        }
        Ok(cluster)
    }

    /// Starts `size` nodes, each in a namespace of its own on `net` (hosts `n0`, `n1`, ...), and
    /// waits until the cluster can serve replicated streams. The test process reaches them
    /// through the bridge; [`Net`]'s faults cut them apart.
    pub async fn start_in(net: Arc<Net>, size: usize) -> Self {
        gateway::install_crypto_provider();
        let hosts: Vec<Host> = (0..size).map(|i| net.host(&format!("n{i}"))).collect();
        let routes = hosts
            .iter()
            .map(|h| format!("nats://{}:{NS_CLUSTER_PORT}", h.ip))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            nodes: Vec::with_capacity(size),
            name: format!("gw-ns-{}", std::process::id()),
            routes,
            net: Some(net),
        };
        for (i, host) in hosts.into_iter().enumerate() {
            cluster.nodes.push(ClusterNode {
                server_name: format!("n{i}"),
                process: None,
                port: NS_CLIENT_PORT,
                cluster_port: NS_CLUSTER_PORT,
                dir: tempfile::tempdir().expect("temp dir"),
                host: Some(host),
            });
        }
        for i in 0..size {
            cluster.restart(i).await;
        }
        cluster.wait_for_jetstream(Duration::from_secs(30)).await;
        cluster
    }

    /// The namespace of a node started by [`NatsCluster::start_in`].
    pub fn host(&self, node: usize) -> &Host {
        self.nodes[node].host.as_ref().expect("a namespaced node")
    }

    /// The address a node listens on: its namespace's, or loopback.
    fn addr(&self, node: usize) -> Ipv4Addr {
        self.nodes[node]
            .host
            .as_ref()
            .map_or(Ipv4Addr::LOCALHOST, |h| h.ip)
    }

    fn node_args(&self, server_name: &str, cluster_port: u16) -> Vec<String> {
        let node = self.nodes.iter().position(|n| n.server_name == server_name);
        let addr = node.map_or(Ipv4Addr::LOCALHOST, |i| self.addr(i));
        vec![
            "--server_name".to_owned(),
            server_name.to_owned(),
            "--cluster_name".to_owned(),
            self.name.clone(),
            "--cluster".to_owned(),
            format!("nats://{addr}:{cluster_port}"),
            "--routes".to_owned(),
            self.routes.clone(),
        ]
    }

    /// Waits until every running node answers `$JS.API.INFO` and an R3 (or R`size`) stream can
    /// be created and deleted: the meta group has a leader and enough peers.
    pub async fn wait_for_jetstream(&self, timeout: Duration) {
        let replicas = self.nodes.len();
        for i in self.running() {
            let client = self.client(i).await;
            eventually(&format!("JetStream answers on node {i}"), timeout, || {
                let client = client.clone();
                async move {
                    // Without a meta leader there may be no answer at all: ask briefly.
                    let reply = tokio::time::timeout(
                        Duration::from_millis(500),
                        client.request("$JS.API.INFO", "".into()),
                    )
                    .await
                    .ok()?
                    .ok()?;
                    let info: serde_json::Value = serde_json::from_slice(&reply.payload).ok()?;
                    info.get("error").is_none().then_some(())
                }
            })
            .await;
        }
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(2))
            .build(self.client_any().await);
        let probe = format!("CLUSTER_PROBE_{}", uuid::Uuid::new_v4().simple());
        eventually("an R3 stream can be created", timeout, || {
            let js = js.clone();
            let probe = probe.clone();
            async move {
                js.get_or_create_stream(async_nats::jetstream::stream::Config {
                    name: probe.clone(),
                    subjects: vec![format!("{}.probe", probe.to_lowercase())],
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await
                .ok()
                .map(|_| ())
            }
        })
        .await;
        eventually("the probe stream is deleted", timeout, || {
            let js = js.clone();
            let probe = probe.clone();
            async move { js.delete_stream(&probe).await.ok().map(|_| ()) }
        })
        .await;
    }

    pub fn size(&self) -> usize {
        self.nodes.len()
    }

    /// Indexes of the nodes whose process runs.
    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].process.is_some())
            .collect()
    }

    /// The client URL of one node.
    pub fn url(&self, node: usize) -> String {
        format!("nats://{}:{}", self.addr(node), self.nodes[node].port)
    }

    /// Every node's client URL, in node order.
    pub fn urls(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.url(i)).collect()
    }

    /// Every node's client URL, starting with `first` and then in node order.
    pub fn urls_from(&self, first: usize) -> Vec<String> {
        let n = self.nodes.len();
        (0..n).map(|i| self.url((first + i) % n)).collect()
    }

    /// All client URLs, comma-separated (`nats://a,nats://b,nats://c`), starting with `first`.
    pub fn url_list_from(&self, first: usize) -> String {
        self.urls_from(first).join(",")
    }

    /// All client URLs, comma-separated, in node order.
    pub fn url_list(&self) -> String {
        self.url_list_from(0)
    }

    /// The `server_name` of a node (`n0`, `n1`, ...).
    pub fn server_name(&self, node: usize) -> &str {
        &self.nodes[node].server_name
    }

    /// The node with this `server_name`.
    pub fn node_named(&self, server_name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.server_name == server_name)
    }

    /// The server's log file of a node (kept across restarts, in its store dir).
    pub fn log_path(&self, node: usize) -> PathBuf {
        self.nodes[node].dir.path().join("nats-server.log")
    }

    /// A client connected to this node only (no reconnect to others).
    pub async fn client(&self, node: usize) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .ignore_discovered_servers()
            .connect(self.url(node))
            .await
            .expect("connect to cluster node")
    }

    /// A client that knows every node, tries them from `first` on, and reconnects to any.
    pub async fn client_from(&self, first: usize) -> async_nats::Client {
        async_nats::ConnectOptions::new()
            .retain_servers_order()
            .retry_on_initial_connect()
            .connect(self.urls_from(first))
            .await
            .expect("connect to cluster")
    }

    /// A client on whichever running node answers first, reconnecting to any.
    pub async fn client_any(&self) -> async_nats::Client {
        let first = *self.running().first().expect("a running node");
        self.client_from(first).await
    }

    /// JetStream through [`NatsCluster::client_from`].
    pub async fn jetstream_from(&self, first: usize) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client_from(first).await)
    }

    /// The node that leads a stream's Raft group now, if it has a leader.
    pub async fn stream_leader(&self, stream: &str) -> Option<usize> {
        let info = self.stream_info(stream).await?;
        let leader = info.cluster?.leader?;
        self.node_named(&leader)
    }

    /// Stream info, read from the stream leader through any running node.
    pub async fn stream_info(&self, stream: &str) -> Option<async_nats::jetstream::stream::Info> {
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(2))
            .build(self.client_any().await);
        js.get_stream_no_info(stream)
            .await
            .ok()?
            .get_info()
            .await
            .ok()
    }

    /// Waits until a stream has a leader and all `size - 1` followers are online and current.
    pub async fn wait_stream_healthy(&self, stream: &str, timeout: Duration) {
        let followers = self.nodes.len() - 1;
        eventually(
            &format!("stream {stream} healthy"),
            timeout,
            || async move {
                let cluster = self.stream_info(stream).await?.cluster?;
                cluster.leader.as_ref()?;
                let healthy = cluster.replicas.len() == followers
                    && cluster
                        .replicas
                        .iter()
                        .all(|p| p.current && !p.offline && p.lag.unwrap_or(0) == 0);
                healthy.then_some(())
            },
        )
        .await;
    }

    /// Kills a node (SIGKILL) and keeps its data.
    pub async fn kill(&mut self, node: usize) {
        if let Some(mut p) = self.nodes[node].process.take() {
            p.kill().await;
        }
    }

    /// Starts a killed node again with the same ports and data (kills it first if it runs).
    pub async fn restart(&mut self, node: usize) {
        self.kill(node).await;
        let args = self.node_args(&self.nodes[node].server_name, self.nodes[node].cluster_port);
        let process = match (&self.net, &self.nodes[node].host) {
            (Some(net), Some(host)) => {
                NodeProcess::Namespaced(self.start_namespaced(net, host, node, &args).await)
            }
            _ => {
                let n = &self.nodes[node];
                let process =
                    NatsProcess::start(&nats_server_bin(), Some(n.port), n.dir.path(), &args)
                        .await
                        .expect("cluster node restarts");
                NodeProcess::Loopback(process)
            }
        };
        self.nodes[node].process = Some(process);
    }

    /// Runs a node's nats-server in its namespace and waits until its client port answers.
    async fn start_namespaced(
        &self,
        net: &Net,
        host: &Host,
        node: usize,
        args: &[String],
    ) -> tokio::process::Child {
        let n = &self.nodes[node];
        let log = n.dir.path().join("nats-server.log");
        let mut child = net
            .command(host, nats_server_bin())
            .args(["-js", "-a", &host.ip.to_string(), "-p", &n.port.to_string()])
            .arg("-sd")
            .arg(n.dir.path())
            .arg("-l")
            .arg(&log)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start a namespaced nats-server");
        let addr = (host.ip, n.port);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("nats-server n{node} exited ({status}): {tail}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server n{node} does not listen on {}:{}",
                host.ip,
                n.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child
    }

    /// The process id of a node, while it runs.
    pub fn pid(&self, node: usize) -> Option<u32> {
        self.nodes[node].process.as_ref().and_then(NodeProcess::pid)
    }

    /// Freezes a node (SIGSTOP): its connections stay open, nothing is answered.
    pub fn pause(&self, node: usize) {
        signal(self.pid(node).expect("node running"), "-STOP");
    }

    /// Thaws a frozen node (SIGCONT).
    pub fn resume(&self, node: usize) {
        signal(self.pid(node).expect("node running"), "-CONT");
    }
}
