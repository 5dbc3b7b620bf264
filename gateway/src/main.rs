fn main() -> anyhow::Result<()> {
    gateway::cli::main()
}
