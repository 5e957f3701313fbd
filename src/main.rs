//! The `portcullis` binary: parse, load config, start tracing, run.

fn main() -> std::process::ExitCode {
    portcullis::cli::main()
}
