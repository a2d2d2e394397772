//! The `fleecefs` command: parse, run, exit code (0 done, 1 failed, 2 usage error).

use clap::Parser;

use fleecefs::cli::{BitmapCommand, Cli, Command};
use fleecefs::{commands, copy, daemon, error, logger};

fn run(cli: Cli) -> error::Result<()> {
    match cli.command {
        Command::Mount(a) => {
            commands::require_root("mounting")?;
            daemon::mount(&a)
        }
        Command::Setup(a) => commands::setup(&a.mountpoint, &a.target, a.devices, a.bitmap, a.json),
        Command::Teardown(a) => commands::teardown(&a.mountpoint, &a.target, a.success, a.json),
        Command::Copy(a) => copy::run(&a),
        Command::Status(a) => commands::status(&a.mountpoint, a.json),
        Command::Unmount(a) => daemon::unmount(&a.mountpoint),
        Command::Bitmap(BitmapCommand::Remove(a)) => {
            commands::bitmap_remove(&a.mountpoint, &a.target)
        }
    }
}

fn main() {
    let cli = Cli::parse();
    let daemon = matches!(&cli.command, Command::Mount(a) if a.foreground || a.daemon_child);
    logger::init(cli.verbose, daemon);
    if let Err(e) = run(cli) {
        // An empty message means the error was already printed (by the daemon child).
        if !e.message().is_empty() {
            eprintln!("fleecefs: error: {}", error::report(&e));
        }
        std::process::exit(1);
    }
}
