//! The `gateway` binary as the end-to-end tests run it: the same entry point, built with the
//! `fault-injection` hook that lets a test crash it between the JetStream ack and the answer.

fn main() -> anyhow::Result<()> {
    gateway::cli::main()
}
