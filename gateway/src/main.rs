// glibc's allocator took a fifth of the gateway's CPU under load (malloc, free, and lock waits
// between worker threads, measured with `perf record` while `scripts/bench` ran); mimalloc keeps
// per-thread heaps.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    gateway::cli::main()
}
