//! Tools the tests run from the project's `.venv` (scripts/install-tools, scripts/install-nats):
//! schemathesis, kubectl, a Python with nats-py. They live outside the Rust build, so each lookup
//! says what to run when the tool is missing instead of failing with "file not found".

use std::path::PathBuf;

use tokio::process::Command;

/// A command that scripts/install-tools put in the project's `.venv` (or its `--target`
/// fallback, whose Python tools need `PYTHONPATH`). Panics with what to run when it is missing.
pub fn venv_tool(name: &str) -> std::process::Command {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = root.join(".venv/bin").join(name);
    if venv.exists() {
        return std::process::Command::new(venv);
    }
    let target = root.join(".venv/target/bin").join(name);
    assert!(
        target.exists(),
        "{name} not found in .venv: run scripts/install-tools (scripts/test does)"
    );
    let mut command = std::process::Command::new(target);
    command.env("PYTHONPATH", root.join(".venv/target"));
    command
}

/// A Python with nats-py: the project's `.venv` (scripts/install-nats puts it there), or its
/// `--target` fallback on the system Python.
pub fn python_command() -> Command {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = root.join(".venv/bin/python");
    if venv.exists() {
        Command::new(venv)
    } else {
        let mut c = Command::new("python3");
        c.env("PYTHONPATH", root.join(".venv/target"));
        c
    }
}
