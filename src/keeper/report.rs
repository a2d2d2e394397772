//! The worker's reports to its keeper: one [`Report`] per line on the report pipe,
//! `PID JSON`, written by [`Report::line`] and read by [`Report::parse`] (the only
//! parser).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Negotiated;

/// What a worker tells its keeper.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Report {
    /// The first worker answered INIT with these parameters: every later worker takes
    /// the connection over with them.
    Init(Negotiated),
    /// The worker serves (a lookup through the kernel was answered) on this FUSE
    /// connection (the minor number of the mount's device).
    Ready {
        /// The connection number (`/sys/fs/fuse/connections/N`).
        connection: u32,
    },
    /// A planned restart: the worker has drained and exits next (status 75); the next
    /// worker is started from `binary`.
    Restart {
        /// When the drain began (milliseconds since the epoch).
        at_ms: u64,
        /// The binary of the next worker (`restart --binary`, which the keeper verifies
        /// again); `None`: the keeper's own binary as installed now.
        binary: Option<PathBuf>,
    },
    /// The FUSE session ended with the unmount: the worker shuts down and exits next, and
    /// so does the keeper. Without this report an exit, whatever its status, is a death.
    Unmounted,
    /// Device `name` is no longer served (`device remove`): the keeper closes its source.
    DeviceRemoved {
        /// The device.
        name: String,
    },
}

impl Report {
    /// The line (without its newline) that worker `pid` writes for this report.
    pub fn line(&self, pid: u32) -> String {
        // Serializing a plain enum of numbers, strings and paths cannot fail; a path
        // that is not UTF-8 is refused before a restart is reported.
        format!("{pid} {}", serde_json::to_string(self).unwrap_or_default())
    }

    /// Parses one line: the pid of the worker that wrote it, and its report.
    pub fn parse(line: &str) -> Result<(u32, Report), String> {
        let (pid, json) = line
            .split_once(' ')
            .ok_or_else(|| format!("worker report without a pid: {line}"))?;
        let pid = pid
            .parse()
            .map_err(|_| format!("worker report with a bad pid: {line}"))?;
        let report = serde_json::from_str(json)
            .map_err(|e| format!("worker report not understood ({e}): {line}"))?;
        Ok((pid, report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_report_reads_back_as_written() {
        let reports = [
            Report::Init(Negotiated {
                coherent_direct_io: true,
                has_resend: false,
            }),
            Report::Ready { connection: 57 },
            Report::Restart {
                at_ms: 1_700_000_000_123,
                binary: Some(PathBuf::from("/usr/local/bin/fleece fs")),
            },
            Report::Restart {
                at_ms: 1,
                binary: None,
            },
            Report::Unmounted,
            Report::DeviceRemoved { name: "vm1".into() },
        ];
        for r in reports {
            let line = r.line(4242);
            assert!(!line.contains('\n'));
            assert_eq!(Report::parse(&line), Ok((4242, r)));
        }
    }

    #[test]
    fn malformed_lines_are_refused() {
        for bad in [
            "",
            "42",
            "x {\"ready\":{\"connection\":1}}",
            "42 {\"nope\":1}",
            "42 ready 5",
        ] {
            assert!(Report::parse(bad).is_err(), "{bad:?}");
        }
    }
}
