//! `eks-pod-identity-agent`: thin entry point; everything lives in the library.

use clap::Parser as _;

use agent::config::{Cli, Command};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    agent::logging::init(cli.verbosity, cli.log_format);
    match cli.command {
        Command::Version => {
            println!("eks-pod-identity-agent {}", env!("CARGO_PKG_VERSION"));
            std::process::ExitCode::SUCCESS
        }
        Command::Server(args) => match agent::config::ServerConfig::try_from(*args) {
            Ok(config) => {
                // Before the runtime's own handlers: a stop signal that comes while the
                // runtime shuts down after a handover must still end the process.
                let signals = match agent::StopSignals::record() {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("eks-pod-identity-agent: cannot handle SIGTERM: {e}");
                        return std::process::ExitCode::FAILURE;
                    }
                };
                let runtime = runtime();
                let outcome = runtime.block_on(agent::run_server(config));
                if matches!(outcome, Ok(agent::Stopped::HandedOver)) {
                    // Everything this agent still ran (refreshes, pre-warm, sweeps) ends with
                    // its runtime: it calls nobody while it waits to be stopped.
                    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
                    signals.wait();
                }
                exit_code(outcome.map(drop))
            }
            Err(e) => {
                // As clap does for a bad value: the message, and exit 2.
                eprintln!("eks-pod-identity-agent: {e}");
                std::process::ExitCode::from(2)
            }
        },
        Command::Initialize(args) => run(agent::run_initialize(args)),
        Command::Uninstall(args) => run(async { agent::run_uninstall(args) }),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime starts")
}

fn run(task: impl std::future::Future<Output = anyhow::Result<()>>) -> std::process::ExitCode {
    exit_code(runtime().block_on(task))
}

fn exit_code(outcome: anyhow::Result<()>) -> std::process::ExitCode {
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let message = agent::report(&e);
            tracing::error!(error = %message, "eks-pod-identity-agent failed");
            eprintln!("eks-pod-identity-agent: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}
