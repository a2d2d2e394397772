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

/// Parses the command line. Help and version go to stdout as clap formats them; a usage
/// error is one line naming the problem, and exit code 2.
fn parse() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
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
            let sub = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
            let help = match (e.kind(), sub) {
                (clap::error::ErrorKind::InvalidSubcommand, _) | (_, None) => String::new(),
                (_, Some(sub)) => format!(" {sub}"),
            };
            eprintln!("fleecefs: error: {first} (see 'fleecefs{help} --help')");
            std::process::exit(2);
        }
    }
}

fn main() {
    let cli = parse();
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
