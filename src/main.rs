/// mimalloc instead of the system allocator: a request allocates and frees many small
/// buffers across threads, where glibc's malloc spent a tenth of the server's CPU (see the
/// README's Performance).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    paynow::cli::run()
}
