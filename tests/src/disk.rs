//! A small disk for the full-disk nemesis: a tmpfs mounted on a temp dir (root only), a ballast
//! file that takes all but a few KiB of it, and a nats-server whose store lives there, started
//! from a configuration file so that its JetStream can be restarted in place.
//!
//! What nats-server 2.15.1 does on a full disk (verified on tmpfs): a stream whose write fails
//! with `ENOSPC` logs "Critical write error", leaves the publisher without an answer (a timeout
//! at the client) and stays failed, even once space is back, until JetStream restarts; JetStream
//! itself stays enabled and `/healthz` answers 503. Nothing acknowledged is lost. A restart of
//! JetStream needs no process restart: a configuration reload (SIGHUP) with `enabled: false`,
//! then one without ([`DiskNats::restart_jetstream`]). Without `max_file_store`, JetStream's own
//! limit is 75% of the space free when it starts; reaching that is the definite refusal 10023
//! ("insufficient resources"), which the gateway answers `507`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use crate::nats::{nats_server_bin, signal};
use crate::wait::eventually;

/// The source name of this suite's tmpfs mounts, followed by the mounting process's id.
const SOURCE: &str = "gwdisk";

/// Unmounts the tmpfs of suite processes that are gone.
fn sweep_stale() {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for line in mounts.lines() {
        let mut fields = line.split_whitespace();
        let (Some(source), Some(target)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some(pid) = source.strip_prefix(SOURCE) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::process::Command::new("umount")
                .args(["-l", target])
                .status();
        }
    }
}

/// A tmpfs of a fixed size, unmounted on drop.
pub struct SmallDisk {
    dir: TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `mib` MiB on a new temp dir. Its source is named after this process
    /// (`gwdisk<pid>`), so that a later run unmounts it if this one was killed before its drop.
    pub fn mount(mib: u64) -> Self {
        sweep_stale();
        let dir = tempfile::tempdir().expect("temp dir");
        let size = format!("size={mib}m");
        let path = dir.path().display().to_string();
        let source = format!("{SOURCE}{}", std::process::id());
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &size, &source, &path])
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a tmpfs on {path} (needs root)");
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn ballast(&self) -> PathBuf {
        self.dir.path().join("ballast")
    }

    /// Bytes free now (`stat -f`: available blocks times the block size).
    pub fn free_bytes(&self) -> u64 {
        let out = std::process::Command::new("stat")
            .args(["-f", "-c", "%a %S"])
            .arg(self.path())
            .output()
            .expect("run stat");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut fields = text
            .split_whitespace()
            .map(|f| f.parse::<u64>().unwrap_or(0));
        fields.next().unwrap_or(0) * fields.next().unwrap_or(0)
    }

    /// Grows the ballast until only `leave` bytes (or less than a page) are free.
    pub fn fill(&self, leave: u64) {
        // The store may grow between the look and the allocation (then it fails, and nothing
        // of it is kept): look again.
        for _ in 0..50 {
            let take = self.free_bytes().saturating_sub(leave);
            if take < 4096 {
                return;
            }
            let current = std::fs::metadata(self.ballast()).map_or(0, |m| m.len());
            let grown = std::process::Command::new("fallocate")
                .args(["-l", &(current + take).to_string()])
                .arg(self.ballast())
                .stderr(std::process::Stdio::null())
                .status()
                .expect("run fallocate");
            if grown.success() {
                return;
            }
        }
        panic!(
            "the ballast cannot take the free space of {}",
            self.path().display()
        );
    }

    /// Removes the ballast: the space is back.
    pub fn free(&self) {
        let _ = std::fs::remove_file(self.ballast());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazily: a server killed a moment ago may still hold a file open.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// A nats-server on loopback whose JetStream store is on a [`SmallDisk`], configured by a file
/// (so a reload can stop and start JetStream). Killed on drop.
pub struct DiskNats {
    child: tokio::process::Child,
    config: PathBuf,
    store: PathBuf,
    port: u16,
    _config_dir: TempDir,
}

impl DiskNats {
    pub async fn start(disk: &SmallDisk) -> Self {
        gateway::install_crypto_provider();
        let config_dir = tempfile::tempdir().expect("temp dir");
        // Reserved by binding and releasing: a port taken in between makes the server exit.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("reserve a port")
            .port();
        let (config, store) = (
            config_dir.path().join("nats.conf"),
            disk.path().join("jetstream"),
        );
        write_config(&config, port, &store, true);
        let child = tokio::process::Command::new(nats_server_bin())
            .arg("-c")
            .arg(&config)
            .arg("-l")
            .arg(config_dir.path().join("nats-server.log"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start nats-server");
        let mut nats = Self {
            child,
            config,
            store,
            port,
            _config_dir: config_dir,
        };
        // Its own port answering, not another server's that took the port meanwhile.
        eventually("nats-server listens", Duration::from_secs(10), || {
            if let Ok(Some(status)) = nats.child.try_wait() {
                panic!("nats-server exited ({status}): port {port} taken?");
            }
            async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ())
            }
        })
        .await;
        nats.wait_jetstream(true).await;
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        let client = async_nats::connect(self.url())
            .await
            .expect("connect to nats-server");
        async_nats::jetstream::new(client)
    }

    /// Restarts JetStream inside the running server (two configuration reloads): what brings a
    /// stream back after a write failed for want of space. Returns once JetStream answers.
    pub async fn restart_jetstream(&self) {
        let pid = self.child.id().expect("nats-server runs");
        write_config(&self.config, self.port, &self.store, false);
        signal(pid, "-HUP");
        self.wait_jetstream(false).await;
        write_config(&self.config, self.port, &self.store, true);
        signal(pid, "-HUP");
        self.wait_jetstream(true).await;
    }

    /// Waits until JetStream answers `$JS.API.INFO` (`enabled`), or no longer does.
    async fn wait_jetstream(&self, enabled: bool) {
        let what = format!("JetStream {}", if enabled { "up" } else { "down" });
        eventually(&what, Duration::from_secs(30), || async move {
            let client = async_nats::connect(self.url()).await.ok()?;
            let reply = tokio::time::timeout(
                Duration::from_millis(500),
                client.request("$JS.API.INFO", "".into()),
            )
            .await;
            let up = matches!(&reply, Ok(Ok(m))
                if serde_json::from_slice::<serde_json::Value>(&m.payload)
                    .is_ok_and(|v| v.get("error").is_none()));
            (up == enabled).then_some(())
        })
        .await;
    }
}

/// The server's configuration: loopback, the store on the small disk, JetStream on or off.
fn write_config(path: &Path, port: u16, store: &Path, jetstream: bool) {
    let enabled = if jetstream { "" } else { "  enabled: false\n" };
    let text = format!(
        "listen: 127.0.0.1:{port}\njetstream {{\n  store_dir: \"{}\"\n{enabled}}}\n",
        store.display()
    );
    std::fs::write(path, text).expect("write nats.conf");
}
