// glibc's allocator took a fifth of the gateway's CPU under load (malloc, free, and lock waits
// between worker threads, measured with `perf record` while `scripts/bench` ran); mimalloc keeps
// per-thread heaps. Built without transparent huge pages (`no_thp`): with them, an idle gateway's
// heap was 14 MB resident for 4 MB in use (each touched 2 MiB region resident whole; measured in
// /proc/<pid>/smaps_rollup as AnonHugePages).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    gateway::cli::main()
}
