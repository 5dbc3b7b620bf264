//! Network namespaces for the partition faults: each host (a nats-server node, a gateway, a
//! worker) runs in a namespace of its own, joined to the others by a veth pair on one Linux
//! bridge; the test process, in the root namespace, reaches every host through the bridge's own
//! address. Every address is inside a private /24 made for the run, so nothing listens beyond it.
//!
//! The faults are the kernel's, not simulated:
//! - a **cut** between two hosts is a `blackhole` route for the other's address in each one:
//!   packets vanish silently, so open TCP connections hang until their timeouts, as in a real
//!   partition (Jepsen's `partition` nemesis cuts links the same way, with iptables);
//! - **isolating** a host takes its bridge port down (nothing in or out, clients included);
//! - **loss** drops a share of a host's packets at random in both directions (nftables
//!   `numgen random`, in the host's namespace);
//! - a **slow link** is a token bucket (`tc tbf`) on a host's egress: its packets queue behind
//!   a low rate, up to a latency bound, and are dropped beyond it.
//!
//! This machine's kernel has no `sch_netem` (`CONFIG_NET_SCH_NETEM` is not set), so fixed
//! per-packet delay and reordering cannot be injected; loss (TCP retransmissions) and a slow link
//! are the closest the kernel offers.
//!
//! Needs root (`ip netns`, veth, bridges), `ip` and `tc` (iproute2) and `nft` (nftables, from
//! `scripts/install-fault-tools`). Namespaces and the bridge are deleted on drop; those of a
//! test process that died without dropping are swept by the next [`Net::create`].

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

/// Namespaces and bridges of this suite start with this (and carry the creating process's id).
const PREFIX: &str = "gwn";

/// A private network of hosts: a bridge in the root namespace and a /24 for the run.
pub struct Net {
    /// `gwn<pid>x<n>`: the bridge's name, and the prefix of every namespace and veth.
    id: String,
    subnet: [u8; 3],
    hosts: Mutex<Vec<Host>>,
    /// Cuts in force: (from host's namespace, the blackholed address).
    cuts: Mutex<Vec<(String, Ipv4Addr)>>,
}

/// One host of a [`Net`]: a network namespace with one address.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    /// The namespace's name (`ip netns exec <ns> ...`).
    pub ns: String,
    pub ip: Ipv4Addr,
    /// The bridge side of the host's veth pair (root namespace).
    outer: String,
    /// The host side of the veth pair (in the namespace).
    inner: String,
}

/// Runs a command, panicking with its stderr when it fails.
fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a command, ignoring failure (cleanup of what may already be gone).
fn run_quietly(program: &str, args: &[&str]) {
    let _ = Command::new(program).args(args).output();
}

impl Net {
    /// Makes the bridge and the subnet of a new network (no hosts yet).
    pub fn create() -> Self {
        static NETS: AtomicU32 = AtomicU32::new(0);
        sweep_stale();
        let pid = std::process::id();
        let n = NETS.fetch_add(1, Ordering::Relaxed);
        // Interface names are at most 15 bytes: "gwn" + pid (up to 7) + "x" + n, and a veth adds
        // "o" or "i" and the host index: room for one digit of n and two of the index.
        let id = format!("{PREFIX}{pid}x{n}");
        // 10.<200..249>.<0..249>: distinct per process and network, away from common ranges.
        let subnet = [
            10,
            200 + ((pid / 250) % 50) as u8,
            ((pid + n * 7) % 250) as u8,
        ];
        // Bridged traffic skips the host's iptables: where a host has br_netfilter loaded and a
        // forwarding policy of DROP (Docker sets one), the hosts would not reach each other.
        run(
            "ip",
            &[
                "link",
                "add",
                &id,
                "type",
                "bridge",
                "nf_call_iptables",
                "0",
                "nf_call_ip6tables",
                "0",
                "nf_call_arptables",
                "0",
            ],
        );
        let net = Self {
            id,
            subnet,
            hosts: Mutex::default(),
            cuts: Mutex::default(),
        };
        let gateway = format!("{}/24", net.address(254));
        run("ip", &["addr", "add", &gateway, "dev", &net.id]);
        run("ip", &["link", "set", &net.id, "up"]);
        net
    }

    fn address(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], last)
    }

    /// Adds a host named `name`: its namespace, its veth pair on the bridge, its address.
    pub fn host(&self, name: &str) -> Host {
        let mut hosts = self.hosts.lock().unwrap();
        let index = hosts.len();
        assert!(index < 200, "at most 200 hosts");
        let host = Host {
            name: name.to_owned(),
            ns: format!("{}-{name}", self.id),
            ip: self.address(index as u8 + 1),
            outer: format!("{}o{index}", self.id),
            inner: format!("{}i{index}", self.id),
        };
        run("ip", &["netns", "add", &host.ns]);
        run(
            "ip",
            &[
                "link",
                "add",
                &host.inner,
                "type",
                "veth",
                "peer",
                "name",
                &host.outer,
            ],
        );
        run("ip", &["link", "set", &host.outer, "master", &self.id]);
        run("ip", &["link", "set", &host.outer, "up"]);
        run("ip", &["link", "set", &host.inner, "netns", &host.ns]);
        let cidr = format!("{}/24", host.ip);
        run(
            "ip",
            &["-n", &host.ns, "addr", "add", &cidr, "dev", &host.inner],
        );
        run("ip", &["-n", &host.ns, "link", "set", &host.inner, "up"]);
        run("ip", &["-n", &host.ns, "link", "set", "lo", "up"]);
        hosts.push(host.clone());
        host
    }

    /// A command that runs `program` inside `host`'s namespace.
    pub fn command(
        &self,
        host: &Host,
        program: impl AsRef<std::ffi::OsStr>,
    ) -> tokio::process::Command {
        prefixed(&self.prefix(host), program)
    }

    /// The arguments that run a program inside `host`'s namespace (`ip netns exec <ns>`), for a
    /// harness that takes a command prefix.
    pub fn prefix(&self, host: &Host) -> Vec<String> {
        vec![
            "ip".to_owned(),
            "netns".to_owned(),
            "exec".to_owned(),
            host.ns.clone(),
        ]
    }

    /// Cuts `a` and `b` apart, both ways: each drops what it sends to the other.
    pub fn cut(&self, a: &Host, b: &Host) {
        self.cut_one_way(a, b.ip);
        self.cut_one_way(b, a.ip);
    }

    fn cut_one_way(&self, from: &Host, to: Ipv4Addr) {
        let mut cuts = self.cuts.lock().unwrap();
        if cuts.iter().any(|(ns, ip)| *ns == from.ns && *ip == to) {
            return;
        }
        let dest = format!("{to}/32");
        run("ip", &["-n", &from.ns, "route", "add", "blackhole", &dest]);
        cuts.push((from.ns.clone(), to));
    }

    /// Takes `host`'s link down: nothing in or out, for everyone.
    pub fn isolate(&self, host: &Host) {
        run("ip", &["link", "set", &host.outer, "down"]);
    }

    /// Brings `host`'s link back up.
    pub fn reconnect(&self, host: &Host) {
        run("ip", &["link", "set", &host.outer, "up"]);
    }

    /// Drops `percent`% of `host`'s packets at random, in and out.
    pub fn lossy(&self, host: &Host, percent: u8) {
        self.clear_loss(host);
        let rules = format!(
            "table inet chaos {{\n\
             chain input {{ type filter hook input priority 0; policy accept; numgen random mod 100 < {percent} drop; }}\n\
             chain output {{ type filter hook output priority 0; policy accept; numgen random mod 100 < {percent} drop; }}\n\
             }}\n"
        );
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), rules).expect("write nft rules");
        let path = file.path().display().to_string();
        run("ip", &["netns", "exec", &host.ns, "nft", "-f", &path]);
    }

    fn clear_loss(&self, host: &Host) {
        run_quietly(
            "ip",
            &[
                "netns", "exec", &host.ns, "nft", "delete", "table", "inet", "chaos",
            ],
        );
    }

    /// Limits `host`'s egress to `kbit` kbit/s; packets queue up to `latency_ms` and are dropped
    /// beyond.
    pub fn slow(&self, host: &Host, kbit: u32, latency_ms: u32) {
        self.clear_slow(host);
        let (rate, latency) = (format!("{kbit}kbit"), format!("{latency_ms}ms"));
        let root = ["-n", &host.ns, "qdisc", "add", "dev", &host.inner, "root"];
        let tbf = ["tbf", "rate", &rate, "burst", "16kb", "latency", &latency];
        run("tc", &[&root[..], &tbf[..]].concat());
    }

    fn clear_slow(&self, host: &Host) {
        run_quietly(
            "tc",
            &["-n", &host.ns, "qdisc", "del", "dev", &host.inner, "root"],
        );
    }

    /// Ends every fault: cuts removed, links up, no loss, no slow link.
    pub fn heal(&self) {
        for (ns, ip) in self.cuts.lock().unwrap().drain(..) {
            let dest = format!("{ip}/32");
            run_quietly("ip", &["-n", &ns, "route", "del", "blackhole", &dest]);
        }
        for host in self.hosts.lock().unwrap().iter() {
            self.reconnect(host);
            self.clear_loss(host);
            self.clear_slow(host);
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for host in self.hosts.lock().unwrap().iter() {
            run_quietly("ip", &["netns", "del", &host.ns]);
            run_quietly("ip", &["link", "del", &host.outer]);
        }
        run_quietly("ip", &["link", "del", &self.id]);
    }
}

/// A command that runs `program` under `prefix` (`ip netns exec <ns>`, say), or alone when
/// `prefix` is empty.
pub fn prefixed(
    prefix: &[String],
    program: impl AsRef<std::ffi::OsStr>,
) -> tokio::process::Command {
    match prefix.split_first() {
        Some((first, rest)) => {
            let mut command = tokio::process::Command::new(first);
            command.args(rest).arg(program);
            command
        }
        None => tokio::process::Command::new(program),
    }
}

/// Deletes the namespaces and bridges of suite processes that are gone (a test killed before
/// its drop ran).
fn sweep_stale() {
    let alive = |name: &str| {
        let digits: String = name[PREFIX.len()..]
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits
            .parse::<u32>()
            .is_ok_and(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists())
    };
    let stdout = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    for line in stdout(&["netns", "list"]).lines() {
        let ns = line.split_whitespace().next().unwrap_or_default();
        if ns.starts_with(PREFIX) && !alive(ns) {
            // Its servers and workers outlived a test killed without its drops: deleting the
            // namespace alone would leave them running, holding it.
            for pid in stdout(&["netns", "pids", ns]).split_whitespace() {
                run_quietly("kill", &["-KILL", pid]);
            }
            run_quietly("ip", &["netns", "del", ns]);
        }
    }
    // Bridges, and bridge ports left behind. `-o` lines read "<index>: <name>[@peer]: ...".
    for line in stdout(&["-o", "link", "show"]).lines() {
        let Some(name) = line.split(": ").nth(1) else {
            continue;
        };
        let name = name.split('@').next().unwrap_or(name);
        if name.starts_with(PREFIX) && !alive(name) {
            run_quietly("ip", &["link", "del", name]);
        }
    }
}
