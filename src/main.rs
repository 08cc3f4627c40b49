#![forbid(unsafe_code)]

/// mimalloc instead of glibc's malloc: the gateway and the PIN server allocate and free many small buffers per
/// request on several threads, where glibc's arenas spent a fifth of the gateway's CPU (`malloc_consolidate`,
/// `unlink_chunk`) in a profile of a prefetch load (see README, Speed).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    pingate::cli::main()
}
