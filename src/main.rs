//! The `fleecefs` command: parse, run, exit code (0 done, 1 failed, 2 usage error).
#![warn(clippy::undocumented_unsafe_blocks)]

use clap::Parser;

use fleecefs::cli::{BitmapCommand, Cli, Command, DeviceCommand};
use fleecefs::{commands, copy, daemon, error, logger, restore};

fn run(cli: Cli) -> error::Result<()> {
    match cli.command {
        Command::Mount(a) => {
            commands::require_root("mounting")?;
            daemon::mount(&a)
        }
        Command::Setup(a) => {
            let hooks = commands::freeze_hooks(&a)?;
            commands::setup(
                &a.mountpoint,
                &a.target,
                a.devices,
                a.bitmap,
                hooks.as_ref(),
                a.json,
            )
        }
        Command::Teardown(a) => commands::teardown(&a.mountpoint, &a.target, a.success, a.json),
        Command::Copy(a) => copy::run(&a),
        Command::Restore(a) => restore::run(&a),
        Command::Status(a) => commands::status(&a.mountpoint, a.json),
        Command::Unmount(a) => commands::unmount(&a.mountpoint),
        Command::Restart(a) => commands::restart(&a.mountpoint, a.binary.as_deref(), a.force),
        Command::Bitmap(BitmapCommand::Remove(a)) => {
            commands::bitmap_remove(&a.mountpoint, &a.target)
        }
        Command::Resize(a) => commands::resize(&a),
        Command::Device(DeviceCommand::Add(a)) => commands::device_add(&a),
        Command::Device(DeviceCommand::Remove(a)) => commands::device_remove(&a),
        Command::Worker(a) => daemon::worker(&a.mountpoint),
    }
}

/// The (sub)commands named on the command line, as far as they are known, and the last one.
fn command_path() -> (Vec<String>, clap::Command) {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    let mut path = Vec::new();
    for a in std::env::args().skip(1).filter(|a| !a.starts_with('-')) {
        match cmd.find_subcommand(&a) {
            Some(c) => cmd = c.clone(),
            None => break,
        }
        path.push(a);
    }
    (path, cmd)
}

/// Parses the command line. Help and version go to stdout as clap formats them; a usage
/// error is one line naming the problem, and exit code 2.
fn parse() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // `fleecefs` or `fleecefs bitmap` alone: name the commands that can follow.
            let (path, cmd) = command_path();
            let names: Vec<&str> = cmd
                .get_subcommands()
                .map(|c| c.get_name())
                .filter(|n| *n != "help")
                .collect();
            let shown = std::iter::once("fleecefs")
                .chain(path.iter().map(String::as_str))
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!(
                "fleecefs: error: '{shown}' needs a command: {} (see '{shown} --help')",
                names.join(", ")
            );
            std::process::exit(2);
        }
        Err(e) => {
            let text = e.render().to_string();
            // The first paragraph says what is wrong (possibly over several lines).
            let problem: Vec<&str> = text
                .trim_start()
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let first = problem.join(" ");
            let first = first.trim_start_matches("error: ");
            let help = match e.kind() {
                clap::error::ErrorKind::InvalidSubcommand => String::new(),
                _ => command_path().0.iter().map(|c| format!(" {c}")).collect(),
            };
            eprintln!("fleecefs: error: {first} (see 'fleecefs{help} --help')");
            std::process::exit(2);
        }
    }
}

fn main() {
    let cli = parse();
    let daemon = match &cli.command {
        Command::Mount(a) => a.foreground || a.daemon_child,
        Command::Worker(_) => true,
        _ => false,
    };
    logger::init(cli.verbose, daemon);
    if let Err(e) = run(cli) {
        // An empty message means the error was already printed (by the daemon child).
        if !e.message().is_empty() {
            eprintln!("fleecefs: error: {}", error::report(&e));
        }
        std::process::exit(1);
    }
}
