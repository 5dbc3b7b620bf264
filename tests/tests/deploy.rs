//! `deploy/` against the real binary, so the manifests cannot drift from its flags.
//!
//! The kustomizations are rendered with the project's kubectl (`.venv`, scripts/install-tools),
//! and the gateway containers in them run as local processes: the built `gateway` binary with
//! each container's args and env only, its ConfigMap volumes written to a temp dir, NATS pointed
//! at a local nats-server and every listen address moved to an ephemeral loopback port. Their
//! probes must answer, the admin port must serve `/metrics`, and a request on every configured
//! route must complete end to end through the worker Deployment's dispatcher and a local app
//! standing in for the worker app. An env var the binary does not know (clap ignores it
//! silently) fails here too, and so do containers that are not locked down.
//!
//! Rendering: `kubectl patch --local -k DIR --type merge -p {} -o json` prints exactly what
//! `kubectl kustomize DIR` renders, as JSON (an empty merge patch, applied locally: no API
//! server is asked), so the tests need no YAML parser.
//!
//! What stays different from a cluster: one local nats-server instead of the three-node cluster,
//! so `GATEWAY_STREAM_REPLICAS` is run as 1 (the static test checks it equals the cluster's size).

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use gateway_tests::*;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_gateway-under-test");
/// The image name the manifests give the gateway (deploy/Dockerfile's image).
const GATEWAY_IMAGE: &str = "nats-http-gateway";
/// Env vars a gateway container may carry besides the binary's own flags.
const OTHER_ENV: &[&str] = &["RUST_LOG"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The project's kubectl: `KUBECTL`, else the one scripts/install-tools put in `.venv`.
fn kubectl() -> PathBuf {
    if let Some(bin) = std::env::var_os("KUBECTL") {
        return bin.into();
    }
    ["../.venv/bin/kubectl", "../.venv/target/bin/kubectl"]
        .iter()
        .map(|p| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(p))
        .find(|p| p.exists())
        .expect("kubectl not found in .venv: run scripts/install-tools (scripts/test does), or set KUBECTL")
}

/// Every kustomization under deploy/ (its folder name).
fn kustomizations() -> Vec<String> {
    let mut dirs: Vec<String> = std::fs::read_dir(root().join("deploy"))
        .expect("read deploy/")
        .map(|e| e.expect("deploy/ entry").path())
        .filter(|p| p.join("kustomization.yaml").exists())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no kustomization under deploy/");
    dirs
}

/// The objects a kustomization renders to.
fn render(kustomization: &str) -> Vec<Value> {
    let dir = root().join("deploy").join(kustomization);
    let out = std::process::Command::new(kubectl())
        .args([
            "patch", "--local", "--type", "merge", "-p", "{}", "-o", "json", "-k",
        ])
        .arg(&dir)
        .env("KUBECONFIG", "/dev/null")
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run kubectl ({}): {e}; run scripts/install-tools",
                kubectl().display()
            )
        });
    assert!(
        out.status.success(),
        "kubectl cannot render {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let objects = serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<Value>()
        .collect::<Result<Vec<_>, _>>()
        .expect("kubectl prints JSON objects");
    assert!(!objects.is_empty(), "{kustomization} renders nothing");
    objects
}

fn text<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

fn items<'a>(v: &'a Value, pointer: &str) -> &'a [Value] {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn name(v: &Value) -> &str {
    text(v, "/metadata/name")
        .or_else(|| text(v, "/name"))
        .unwrap_or("?")
}

fn find<'a>(objects: &'a [Value], kind: &str, object: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| text(o, "/kind") == Some(kind) && name(o) == object)
        .unwrap_or_else(|| panic!("no {kind} {object:?} in the rendered objects"))
}

/// Seconds of a duration written as `20s` or `2m` (what the manifests use).
fn seconds(duration: &str) -> u64 {
    let (n, unit) = duration.split_at(duration.len() - 1);
    let n: u64 = n
        .parse()
        .unwrap_or_else(|_| panic!("duration {duration:?}"));
    match unit {
        "s" => n,
        "m" => n * 60,
        _ => panic!("duration {duration:?}: use s or m"),
    }
}

/// A pod template of a workload.
struct Pod<'a> {
    workload: String,
    template: &'a Value,
    objects: &'a [Value],
}

impl<'a> Pod<'a> {
    fn spec(&self) -> &'a Value {
        &self.template["spec"]
    }

    /// Every container, init containers (native sidecars) first, with whether it is one.
    fn containers(&self) -> Vec<(&'a Value, bool)> {
        let init = items(self.spec(), "/initContainers")
            .iter()
            .map(|c| (c, true));
        let main = items(self.spec(), "/containers").iter().map(|c| (c, false));
        init.chain(main).collect()
    }

    fn labels(&self) -> &'a serde_json::Map<String, Value> {
        self.template["metadata"]["labels"]
            .as_object()
            .expect("pod labels")
    }
}

fn pods(objects: &[Value]) -> Vec<Pod<'_>> {
    objects
        .iter()
        .filter_map(|o| {
            let template = match text(o, "/kind")? {
                "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
                    o.pointer("/spec/template")?
                }
                "CronJob" => o.pointer("/spec/jobTemplate/spec/template")?,
                _ => return None,
            };
            Some(Pod {
                workload: format!("{} {}", text(o, "/kind")?, name(o)),
                template,
                objects,
            })
        })
        .collect()
}

fn is_gateway(container: &Value) -> bool {
    text(container, "/image").is_some_and(|i| i.contains(GATEWAY_IMAGE))
}

/// The gateway subcommand a gateway container runs (its only argument: settings come from env).
fn subcommand(container: &Value) -> &str {
    let args: Vec<&str> = items(container, "/args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        args.len(),
        1,
        "gateway container {:?}: args must be just the subcommand (settings go in env), got {args:?}",
        name(container)
    );
    args[0]
}

/// A container's env as (name, value); gateway containers take plain values only.
fn env(container: &Value) -> Vec<(String, String)> {
    items(container, "/env")
        .iter()
        .map(|e| {
            let value = text(e, "/value").unwrap_or_else(|| {
                panic!(
                    "container {:?}: env {} has no plain value",
                    name(container),
                    name(e)
                )
            });
            (name(e).to_owned(), value.to_owned())
        })
        .collect()
}

fn env_value<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// A named or numbered container port, as a number.
fn port_number(container: &Value, port: &Value) -> u16 {
    if let Some(n) = port.as_u64() {
        return u16::try_from(n).expect("port number");
    }
    let wanted = port.as_str().expect("port is a number or a name");
    items(container, "/ports")
        .iter()
        .find(|p| text(p, "/name") == Some(wanted))
        .and_then(|p| p["containerPort"].as_u64())
        .map(|n| u16::try_from(n).expect("port number"))
        .unwrap_or_else(|| {
            panic!(
                "container {:?} has no port named {wanted:?}",
                name(container)
            )
        })
}

/// The `[env: NAME=…]` names in `gateway <subcommand> --help`.
fn help_env_names(subcommand: &str) -> BTreeSet<String> {
    let out = std::process::Command::new(GATEWAY_BIN)
        .args([subcommand, "--help"])
        .output()
        .expect("run gateway --help");
    assert!(out.status.success(), "gateway {subcommand} --help fails");
    let help = String::from_utf8(out.stdout).expect("UTF-8 help");
    help.split("[env: ")
        .skip(1)
        .map(|rest| {
            rest.split(['=', ']'])
                .next()
                .expect("env name")
                .trim()
                .to_owned()
        })
        .collect()
}

/// A gateway container running as a local process. Killed when dropped.
struct Local {
    label: String,
    child: Child,
    /// Listen env var (`GATEWAY_LISTEN`, …) → where the process listens.
    listens: HashMap<String, SocketAddr>,
    /// Container port → where the process listens.
    ports: HashMap<u16, SocketAddr>,
    /// Mount path → the local folder with the ConfigMap's files.
    mounts: Vec<(String, PathBuf)>,
    /// stderr lines that were not JSON (the manifests ask for JSON logs).
    not_json: Arc<Mutex<Vec<String>>>,
}

impl Local {
    /// The local file for a path inside the container.
    fn local_path(&self, container_path: &str) -> PathBuf {
        self.mounts
            .iter()
            .find_map(|(mount, dir)| {
                container_path
                    .strip_prefix(mount.as_str())
                    .map(|rest| dir.join(rest.trim_start_matches('/')))
            })
            .unwrap_or_else(|| panic!("{container_path} is on no mounted volume"))
    }

    fn url(&self, listen_env: &str, path: &str) -> String {
        let addr = self
            .listens
            .get(listen_env)
            .unwrap_or_else(|| panic!("{}: {listen_env} is not set in the manifest", self.label));
        format!("http://{addr}{path}")
    }

    fn port_url(&self, container_port: u16, path: &str) -> String {
        let addr = self.ports.get(&container_port).unwrap_or_else(|| {
            panic!(
                "{}: nothing listens on container port {container_port} (no *_LISTEN env binds it)",
                self.label
            )
        });
        format!("http://{addr}{path}")
    }

    /// SIGTERM, then the process must exit cleanly within `within`.
    async fn terminate(mut self, within: Duration) {
        let pid = self.child.id().expect("running");
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        let exit = tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} still runs {within:?} after SIGTERM", self.label))
            .expect("wait");
        assert!(
            exit.success(),
            "{} exited with {exit} after SIGTERM",
            self.label
        );
    }
}

/// Runs one gateway container of `pod` as a local process: its args and its env only, with
/// ConfigMap volumes in `dir`, `GATEWAY_NATS_URL` = `nats_url`, listen addresses on ephemeral
/// loopback ports, and `GATEWAY_DISPATCH_UPSTREAM` = `upstream` (which must be a port of
/// another container of the same pod in the manifest).
async fn launch(
    pod: &Pod<'_>,
    container: &Value,
    dir: &Path,
    nats_url: &str,
    upstream: Option<&str>,
) -> Local {
    let label = format!("{} / {}", pod.workload, name(container));
    assert!(is_gateway(container), "{label} is not a gateway container");
    // The image's ENTRYPOINT is /gateway (deploy/Dockerfile); a command would replace it.
    let command: Vec<&str> = items(container, "/command")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        command.is_empty() || command == ["/gateway"],
        "{label}: command {command:?} is not the image's /gateway"
    );
    let subcommand = subcommand(container);

    let mut mounts = Vec::new();
    for mount in items(container, "/volumeMounts") {
        let volume = items(pod.spec(), "/volumes")
            .iter()
            .find(|v| name(v) == name(mount))
            .unwrap_or_else(|| panic!("{label}: no volume {:?}", name(mount)));
        let config_map = text(volume, "/configMap/name")
            .unwrap_or_else(|| panic!("{label}: volume {:?} is not a ConfigMap", name(volume)));
        let config_map = find(pod.objects, "ConfigMap", config_map);
        let local = dir.join(name(container)).join(name(volume));
        std::fs::create_dir_all(&local).expect("volume dir");
        for (file, content) in config_map["data"].as_object().expect("ConfigMap data") {
            std::fs::write(local.join(file), content.as_str().expect("text data"))
                .expect("write ConfigMap file");
        }
        mounts.push((
            text(mount, "/mountPath").expect("mountPath").to_owned(),
            local,
        ));
    }

    let mut listen_ports = HashMap::new();
    let mut vars = Vec::new();
    for (key, value) in env(container) {
        let local = if key.ends_with("_LISTEN") {
            let port = value
                .strip_prefix("0.0.0.0:")
                .and_then(|p| p.parse::<u16>().ok())
                .unwrap_or_else(|| panic!("{label}: {key}={value} is not 0.0.0.0:PORT"));
            listen_ports.insert(key.clone(), port);
            "127.0.0.1:0".to_owned()
        } else if key == "GATEWAY_NATS_URL" {
            nats_url.to_owned()
        } else if key == "GATEWAY_STREAM_REPLICAS" {
            // One local server; the static test ties the manifest's value to the cluster's size.
            "1".to_owned()
        } else if key == "GATEWAY_DISPATCH_UPSTREAM" {
            let port: u16 = value
                .strip_prefix("http://127.0.0.1:")
                .and_then(|p| p.trim_end_matches('/').parse().ok())
                .unwrap_or_else(|| panic!("{label}: {key}={value} is not http://127.0.0.1:PORT"));
            let served = pod.containers().into_iter().any(|(c, _)| {
                !std::ptr::eq(c, container)
                    && items(c, "/ports")
                        .iter()
                        .any(|p| p["containerPort"].as_u64() == Some(u64::from(port)))
            });
            assert!(
                served,
                "{label}: {key} port {port} is no other container's port in the pod"
            );
            upstream.expect("an upstream for the dispatcher").to_owned()
        } else if let Some((mount, local)) = mounts
            .iter()
            .find(|(mount, _)| value.starts_with(mount.as_str()))
        {
            let rest = value[mount.len()..].trim_start_matches('/');
            local.join(rest).display().to_string()
        } else {
            value
        };
        vars.push((key, local));
    }

    let mut child = Command::new(GATEWAY_BIN)
        .arg(subcommand)
        .env_clear()
        .envs(vars)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the gateway binary");

    // The process logs where each listener is bound: `listen` and `admin_listen` fields.
    let (found, mut addresses) = mpsc::unbounded_channel::<(String, SocketAddr)>();
    let not_json = Arc::new(Mutex::new(Vec::new()));
    let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
    let (prefix, bad) = (label.clone(), not_json.clone());
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[{prefix}] {line}");
            let Ok(record) = serde_json::from_str::<Value>(&line) else {
                bad.lock().unwrap().push(line);
                continue;
            };
            if let Some(fields) = record["fields"].as_object() {
                for (field, value) in fields {
                    if let Some(addr) = value.as_str().and_then(|v| v.parse().ok()) {
                        let _ = found.send((field.clone(), addr));
                    }
                }
            }
        }
    });
    let mut listens = HashMap::new();
    let mut ports = HashMap::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while listens.len() < listen_ports.len() {
            let (field, addr) = addresses
                .recv()
                .await
                .unwrap_or_else(|| panic!("{label} exited before listening"));
            // GATEWAY_ADMIN_LISTEN is logged as `admin_listen`.
            let key = format!("GATEWAY_{}", field.to_ascii_uppercase());
            if let Some(&port) = listen_ports.get(&key) {
                listens.insert(key, addr);
                ports.insert(port, addr);
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{label} did not log where it listens for all of {:?}",
            listen_ports.keys()
        )
    });
    for port in items(container, "/ports") {
        let port = port_number(container, &port["containerPort"]);
        assert!(
            ports.contains_key(&port),
            "{label}: container port {port} is declared, but no *_LISTEN env binds it"
        );
    }
    Local {
        label,
        child,
        listens,
        ports,
        mounts,
        not_json,
    }
}

/// Every HTTP (and TCP) probe of `container` answers on the local process.
async fn check_probes(container: &Value, local: &Local) {
    let http = http();
    for kind in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let Some(probe) = container.get(kind) else {
            continue;
        };
        if let Some(get) = probe.get("httpGet") {
            let port = port_number(container, &get["port"]);
            let url = local.port_url(port, text(get, "/path").unwrap_or("/"));
            eventually(
                &format!("{}: {kind} {url} answers 200", local.label),
                Duration::from_secs(20),
                || {
                    let (http, url) = (http.clone(), url.clone());
                    async move {
                        let r = http.get(&url).send().await.ok()?;
                        (r.status() == 200).then_some(())
                    }
                },
            )
            .await;
        } else if let Some(tcp) = probe.get("tcpSocket") {
            let port = port_number(container, &tcp["port"]);
            let url = local.port_url(port, "");
            let addr = url.trim_start_matches("http://");
            tokio::net::TcpStream::connect(addr)
                .await
                .unwrap_or_else(|e| panic!("{}: {kind} {addr}: {e}", local.label));
        } else {
            panic!(
                "{}: {kind} is neither httpGet nor tcpSocket (the image has no shell)",
                local.label
            );
        }
    }
}

/// What Prometheus gets from a pod, following its `prometheus.io/*` annotations.
async fn scrape(pod: &Pod<'_>, local: &Local) -> String {
    let annotations = &pod.template["metadata"]["annotations"];
    assert_eq!(
        text(annotations, "/prometheus.io~1scrape"),
        Some("true"),
        "{}: prometheus.io/scrape",
        local.label
    );
    let port: u16 = text(annotations, "/prometheus.io~1port")
        .expect("prometheus.io/port annotation")
        .parse()
        .expect("a port number");
    let path = text(annotations, "/prometheus.io~1path").unwrap_or("/metrics");
    let url = local.port_url(port, path);
    let response = http().get(&url).send().await.expect("scrape");
    assert_eq!(response.status(), 200, "{}: {url}", local.label);
    response.text().await.expect("metrics text")
}

/// The worker app's stand-in: answers any request with 201 and what it received.
async fn echo(method: Method, uri: Uri, headers: HeaderMap, body: String) -> impl IntoResponse {
    let operation = headers
        .get("gw-operation-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    (
        StatusCode::CREATED,
        axum::Json(serde_json::json!({
            "method": method.as_str(),
            "path": uri.path(),
            "operation_id": operation,
            "body": body,
        })),
    )
}

async fn start_worker_app() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new().fallback(echo);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

/// The one gateway container of `pods` that runs `subcommand`.
fn the_container<'p, 'a>(pods: &'p [Pod<'a>], subcommand_name: &str) -> (&'p Pod<'a>, &'a Value) {
    let found: Vec<_> = pods
        .iter()
        .flat_map(|p| p.containers().into_iter().map(move |(c, _)| (p, c)))
        .filter(|(_, c)| is_gateway(c) && subcommand(c) == subcommand_name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one `gateway {subcommand_name}` container"
    );
    found[0]
}

/// Runs an overlay's gateway and the worker's dispatcher from their manifests, checks their
/// probes and the admin port, and sends a request on every configured route end to end.
async fn overlay_runs_end_to_end(overlay: &str) {
    let nats = Nats::start().await;
    let objects = render(overlay);
    let pods = pods(&objects);
    let dir = tempfile::tempdir().expect("temp dir");

    let (gw_pod, gw_container) = the_container(&pods, "serve");
    let gateway = launch(gw_pod, gw_container, dir.path(), &nats.url(), None).await;
    let (worker_pod, dispatch_container) = the_container(&pods, "dispatch");
    let app = start_worker_app().await;
    let dispatcher = launch(
        worker_pod,
        dispatch_container,
        dir.path(),
        &nats.url(),
        Some(&app),
    )
    .await;
    check_probes(gw_container, &gateway).await;
    check_probes(dispatch_container, &dispatcher).await;

    // The dispatcher serves exactly the routes of the gateway's routes file.
    let gw_env = env(gw_container);
    let routes_file =
        gateway.local_path(env_value(&gw_env, "GATEWAY_CONFIG").expect("GATEWAY_CONFIG"));
    let routes = gateway::config::load_routes(&routes_file).expect("the routes file is valid");
    let route_names: BTreeSet<&str> = routes.iter().map(|r| r.name.as_str()).collect();
    let dispatch_env = env(dispatch_container);
    let dispatched: BTreeSet<&str> = env_value(&dispatch_env, "GATEWAY_DISPATCH_ROUTES")
        .expect("GATEWAY_DISPATCH_ROUTES")
        .split(',')
        .collect();
    assert_eq!(
        dispatched, route_names,
        "the dispatcher must serve every route"
    );

    // A request on every route completes: gateway → JetStream → dispatcher → app → result.
    let http = http();
    for route in &routes {
        let path = route
            .path
            .split('/')
            .map(|s| if s.starts_with('{') { "demo" } else { s })
            .collect::<Vec<_>>()
            .join("/");
        let method = Method::from_bytes(route.method.to_ascii_uppercase().as_bytes()).unwrap();
        let body = format!(r#"{{"route":"{}"}}"#, route.name);
        let r = http
            .request(method.clone(), gateway.url("GATEWAY_LISTEN", &path))
            .header("content-type", "application/json")
            .header("idempotency-key", format!("\"deploy-{}\"", route.name))
            .body(body.clone())
            .send()
            .await
            .expect("submit");
        assert_eq!(r.status(), 202, "{} {path}", route.method);
        let id = json(r).await["id"].as_str().unwrap().to_owned();
        let base = gateway.url("GATEWAY_LISTEN", "");
        let statuses = poll_until_terminal(&base, &id, Duration::from_secs(30)).await;
        assert_eq!(
            statuses.last().unwrap(),
            "succeeded",
            "route {}",
            route.name
        );
        let result = http
            .get(gateway.url("GATEWAY_LISTEN", &format!("/operations/{id}/result")))
            .send()
            .await
            .unwrap();
        assert_eq!(result.status(), 201);
        let echoed = json(result).await;
        assert_eq!(echoed["method"], method.as_str());
        assert_eq!(echoed["path"], path);
        assert_eq!(echoed["operation_id"], id);
        assert_eq!(echoed["body"], body);
    }

    // Prometheus scrapes what the pods' annotations say, and finds each process's metrics.
    for (pod, local, metric) in [
        (gw_pod, &gateway, "gateway_http_requests_total"),
        (worker_pod, &dispatcher, "gateway_dispatch_replies_total"),
    ] {
        let metrics = scrape(pod, local).await;
        assert!(
            metrics.contains(metric),
            "{}: no {metric} in:\n{metrics}",
            local.label
        );
    }

    for local in [&gateway, &dispatcher] {
        let bad = local.not_json.lock().unwrap().clone();
        assert!(
            bad.is_empty(),
            "{}: log lines that are not JSON: {bad:?}",
            local.label
        );
    }

    // SIGTERM drains and exits within the pod's grace period.
    let grace = gw_pod.spec()["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap_or(30);
    gateway.terminate(Duration::from_secs(grace)).await;
    dispatcher.terminate(Duration::from_secs(grace)).await;
}

/// deploy/sidecar: the app's native-sidecar gateway and the worker's dispatcher, as processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_overlay_runs_end_to_end() {
    overlay_runs_end_to_end("sidecar").await;
}

/// deploy/standalone: the gateway Deployment and the worker's dispatcher, as processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_overlay_runs_end_to_end() {
    overlay_runs_end_to_end("standalone").await;
}

/// Every env var of every gateway container is a flag of its subcommand (`--help` lists it):
/// clap ignores unknown variables, so a typo or a removed flag would otherwise go unnoticed.
#[test]
fn every_gateway_env_var_is_a_flag() {
    let mut help = HashMap::new();
    for kustomization in kustomizations() {
        let objects = render(&kustomization);
        for pod in pods(&objects) {
            for (container, _) in pod.containers() {
                if !is_gateway(container) {
                    continue;
                }
                let sub = subcommand(container).to_owned();
                let known = help
                    .entry(sub.clone())
                    .or_insert_with(|| help_env_names(&sub));
                for (key, _) in env(container) {
                    assert!(
                        known.contains(&key) || OTHER_ENV.contains(&key.as_str()),
                        "deploy/{kustomization}: {} / {}: {key} is not a flag of `gateway {sub}` \
                         (its --help lists {known:?})",
                        pod.workload,
                        name(container)
                    );
                }
            }
        }
    }
}

/// What kubectl's schemas cannot check: every container is locked down and sized, gateway
/// containers are probed, native sidecars are sidecars, shutdown fits the grace period, and the
/// objects that refer to each other agree (Services, PDBs, HPAs, the NATS cluster).
#[test]
fn manifests_are_locked_down_and_consistent() {
    let nats = render("nats");
    let nats_replicas = find(&nats, "StatefulSet", "nats")["spec"]["replicas"]
        .as_u64()
        .expect("NATS replicas");
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile
            .lines()
            .any(|l| l.trim() == r#"ENTRYPOINT ["/gateway"]"#),
        "deploy/Dockerfile's ENTRYPOINT must stay /gateway: the manifests give only args"
    );

    for kustomization in kustomizations() {
        let objects = render(&kustomization);
        let pods = pods(&objects);
        for pod in &pods {
            let at = format!("deploy/{kustomization}: {}", pod.workload);
            let spec = pod.spec();
            assert_eq!(
                spec["automountServiceAccountToken"], false,
                "{at}: no API token"
            );
            let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
            for (c, init) in pod.containers() {
                let at = format!("{at} / {}", name(c));
                let sc = &c["securityContext"];
                assert_eq!(sc["runAsNonRoot"], true, "{at}: runAsNonRoot");
                assert_eq!(
                    sc["readOnlyRootFilesystem"], true,
                    "{at}: readOnlyRootFilesystem"
                );
                assert_eq!(
                    sc["allowPrivilegeEscalation"], false,
                    "{at}: allowPrivilegeEscalation"
                );
                assert_eq!(
                    sc["capabilities"]["drop"],
                    serde_json::json!(["ALL"]),
                    "{at}: drop ALL"
                );
                assert_eq!(
                    text(sc, "/seccompProfile/type"),
                    Some("RuntimeDefault"),
                    "{at}: seccomp"
                );
                for bound in ["requests", "limits"] {
                    for resource in ["cpu", "memory"] {
                        assert!(
                            c["resources"][bound].get(resource).is_some(),
                            "{at}: resources.{bound}.{resource}"
                        );
                    }
                }
                if !is_gateway(c) {
                    continue;
                }
                let env = env(c);
                if init {
                    assert_eq!(
                        text(c, "/restartPolicy"),
                        Some("Always"),
                        "{at}: a gateway init container is a native sidecar"
                    );
                    assert_eq!(
                        env_value(&env, "GATEWAY_WORKER_THREADS"),
                        Some("1"),
                        "{at}: a sidecar runs one runtime thread"
                    );
                }
                if let Some(url) = env_value(&env, "GATEWAY_NATS_URL") {
                    let service = url
                        .strip_prefix("nats://")
                        .and_then(|s| s.split(':').next())
                        .expect("nats://HOST:PORT");
                    find(&nats, "Service", service);
                }
                assert_eq!(
                    text(c, "/livenessProbe/httpGet/path"),
                    Some("/livez"),
                    "{at}: liveness"
                );
                let admin = env_value(&env, "GATEWAY_ADMIN_LISTEN")
                    .unwrap_or_else(|| panic!("{at}: GATEWAY_ADMIN_LISTEN (metrics)"));
                let scrape = text(
                    &pod.template["metadata"],
                    "/annotations/prometheus.io~1port",
                );
                assert_eq!(
                    scrape,
                    admin.rsplit(':').next(),
                    "{at}: Prometheus scrapes the admin port"
                );
                if subcommand(c) != "serve" {
                    continue;
                }
                assert_eq!(
                    text(c, "/readinessProbe/httpGet/path"),
                    Some("/readyz"),
                    "{at}: readiness"
                );
                assert_eq!(
                    env_value(&env, "GATEWAY_STREAM_REPLICAS").map(str::parse::<u64>),
                    Some(Ok(nats_replicas)),
                    "{at}: one stream replica per NATS node"
                );
                let drain = env_value(&env, "GATEWAY_SHUTDOWN_GRACE").map_or(20, seconds);
                let pre_stop = c
                    .pointer("/lifecycle/preStop/sleep/seconds")
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                assert!(
                    pre_stop + drain < grace,
                    "{at}: preStop {pre_stop}s + GATEWAY_SHUTDOWN_GRACE {drain}s must fit in \
                     terminationGracePeriodSeconds {grace}"
                );
            }
        }

        // Objects that select pods or name workloads find them.
        for o in &objects {
            let at = format!(
                "deploy/{kustomization}: {} {}",
                text(o, "/kind").unwrap(),
                name(o)
            );
            let selector = match text(o, "/kind") {
                Some("Service") => o.pointer("/spec/selector"),
                Some("PodDisruptionBudget") => o.pointer("/spec/selector/matchLabels"),
                _ => None,
            };
            if let Some(selector) = selector.and_then(Value::as_object) {
                let selected: Vec<&Pod<'_>> = pods
                    .iter()
                    .filter(|p| selector.iter().all(|(k, v)| p.labels().get(k) == Some(v)))
                    .collect();
                assert!(!selected.is_empty(), "{at} selects no pod");
                for port in items(o, "/spec/ports") {
                    if let Some(target) = text(port, "/targetPort") {
                        assert!(
                            selected
                                .iter()
                                .any(|p| p.containers().iter().any(|(c, _)| items(c, "/ports")
                                    .iter()
                                    .any(|cp| text(cp, "/name") == Some(target)))),
                            "{at}: no selected container has a port named {target:?}"
                        );
                    }
                }
            }
            if text(o, "/kind") == Some("HorizontalPodAutoscaler") {
                let target = find(
                    &objects,
                    text(o, "/spec/scaleTargetRef/kind").unwrap(),
                    text(o, "/spec/scaleTargetRef/name").unwrap(),
                );
                assert!(
                    o["spec"]["minReplicas"].as_u64() >= Some(2),
                    "{at}: minReplicas"
                );
                assert!(
                    target["spec"]["replicas"].as_u64() >= Some(2),
                    "{at}: the target starts with 2 replicas"
                );
            }
        }
    }
}

/// deploy/nats: nats-server accepts the rendered config, which has one route per node, fsyncs
/// every write (the durability profile in deploy/README.md), and is what the container reads.
#[test]
fn nats_cluster_config_is_valid() {
    let objects = render("nats");
    let set = find(&objects, "StatefulSet", "nats");
    let replicas = set["spec"]["replicas"].as_u64().unwrap();
    let pod = &pods(&objects)[0];
    let (container, _) = pod.containers()[0];
    let args: Vec<&str> = items(container, "/args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let config_path = args
        .windows(2)
        .find(|w| w[0] == "--config")
        .map(|w| w[1])
        .expect("--config PATH");
    let (mount_dir, file) = config_path.rsplit_once('/').unwrap();
    let mount = items(container, "/volumeMounts")
        .iter()
        .find(|m| text(m, "/mountPath") == Some(mount_dir))
        .expect("the config path is on a mounted volume");
    let volume = items(pod.spec(), "/volumes")
        .iter()
        .find(|v| name(v) == name(mount))
        .unwrap();
    let config_map = find(
        &objects,
        "ConfigMap",
        text(volume, "/configMap/name").unwrap(),
    );
    let config = text(config_map, &format!("/data/{file}")).expect("the config file");

    assert!(
        config.contains("sync_interval: always"),
        "fsync before every ack"
    );
    for node in 0..replicas {
        assert!(
            config.contains(&format!("nats://nats-{node}.nats-headless:6222")),
            "a route to node {node}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file);
    std::fs::write(&path, config).unwrap();
    let out = std::process::Command::new(nats_server_bin())
        .arg("-c")
        .arg(&path)
        .arg("-t")
        .env("POD_NAME", "nats-0")
        .output()
        .expect("run nats-server -t");
    assert!(
        out.status.success(),
        "nats-server rejects deploy/nats's config: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
