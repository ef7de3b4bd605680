fn main() -> std::process::ExitCode {
    paynow::cli::run()
}
