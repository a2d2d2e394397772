//! The one error type of fleecefs, and the one place where errors become errnos.
//!
//! `Display` says what went wrong in the domain's words without repeating the source;
//! [`report`] prints the whole chain once, at the edge (CLI exit, control reply, log line).

use std::error::Error as StdError;
use std::fmt;
use std::io;

/// What kind of failure this is: decides the errno a FUSE request gets and how the CLI
/// reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A bad argument or request (name, flag, state precondition).
    Invalid,
    /// Something named does not exist (device, target, bitmap, mount).
    NotFound,
    /// The operation conflicts with the current state (an access is active, a daemon runs).
    Busy,
    /// A system call failed; the errno comes from the wrapped `io::Error`.
    Io,
    /// The snapshot range is not readable: discarded or outside the dirty map (EACCES).
    Inaccessible,
    /// The file is read-only (EROFS).
    ReadOnly,
    /// The snapshot handle belongs to an access that has ended (ESTALE).
    Stale,
    /// The access is broken: copy-before-write failed, the snapshot is no longer valid (EIO).
    Broken,
    /// The operation is not supported on this file (EOPNOTSUPP).
    Unsupported,
    /// A write or allocation past the fixed end of a device (ENOSPC).
    PastEnd,
    /// Copy-before-write took longer than `--cbw-timeout` (ETIMEDOUT).
    TimedOut,
    /// A file operation on a directory (EISDIR).
    IsDirectory,
    /// A directory operation on a file (ENOTDIR).
    NotDirectory,
    /// Creating, removing, renaming, or changing owner, mode or size (EPERM).
    NotPermitted,
    /// An operation fleecefs does not implement at all, such as extended attributes
    /// (ENOSYS).
    NotImplemented,
}

/// An error with its kind, a message that names the problem, and an optional cause.
#[derive(Debug)]
pub struct Error {
    kind: Kind,
    message: String,
    source: Option<io::Error>,
    /// What was done about it, printed after the cause.
    note: Option<String>,
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A new error of `kind`.
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
            note: None,
        }
    }

    /// A failed system call, with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error {
            kind: Kind::Io,
            message: context.into(),
            source: Some(source),
            note: None,
        }
    }

    /// Shorthand for [`Kind::Invalid`].
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Kind::Invalid, message)
    }

    /// Shorthand for [`Kind::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Kind::NotFound, message)
    }

    /// Shorthand for [`Kind::Busy`].
    pub fn busy(message: impl Into<String>) -> Self {
        Self::new(Kind::Busy, message)
    }

    /// Adds what was done about the failure (e.g. a cleanup), printed after the cause.
    pub fn with_note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The message without the cause.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The errno a FUSE request that failed with this error replies with.
    pub fn errno(&self) -> i32 {
        match self.kind {
            Kind::Invalid => libc::EINVAL,
            Kind::NotFound => libc::ENOENT,
            Kind::Busy => libc::EBUSY,
            Kind::Io => self
                .source
                .as_ref()
                .and_then(io::Error::raw_os_error)
                .unwrap_or(libc::EIO),
            Kind::Inaccessible => libc::EACCES,
            Kind::ReadOnly => libc::EROFS,
            Kind::Stale => libc::ESTALE,
            Kind::Broken => libc::EIO,
            Kind::Unsupported => libc::EOPNOTSUPP,
            Kind::PastEnd => libc::ENOSPC,
            Kind::TimedOut => libc::ETIMEDOUT,
            Kind::IsDirectory => libc::EISDIR,
            Kind::NotDirectory => libc::ENOTDIR,
            Kind::NotPermitted => libc::EPERM,
            Kind::NotImplemented => libc::ENOSYS,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source.as_ref().map(|e| e as &(dyn StdError + 'static))
    }
}

/// The whole chain on one line: `message: cause: cause` (and `; note` if there is one).
pub fn report(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    if let Some(note) = err.downcast_ref::<Error>().and_then(|e| e.note.as_deref()) {
        out.push_str("; ");
        out.push_str(note);
    }
    out
}

/// Adds context to `io::Result`s.
pub trait IoContext<T> {
    /// Wraps the error with what was being done.
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping_and_report() {
        let e = Error::io(
            "reading source /x",
            io::Error::from_raw_os_error(libc::ENOSPC),
        );
        assert_eq!(e.errno(), libc::ENOSPC);
        assert!(report(&e).starts_with("reading source /x: "));
        assert_eq!(Error::new(Kind::Io, "no cause").errno(), libc::EIO);
    }

    /// The whole table, as docs/usage.md lists it: every kind and its errno.
    #[test]
    fn errno_table() {
        let table = [
            (Kind::Invalid, libc::EINVAL),
            (Kind::NotFound, libc::ENOENT),
            (Kind::Busy, libc::EBUSY),
            (Kind::Inaccessible, libc::EACCES),
            (Kind::ReadOnly, libc::EROFS),
            (Kind::Stale, libc::ESTALE),
            (Kind::Broken, libc::EIO),
            (Kind::Unsupported, libc::EOPNOTSUPP),
            (Kind::PastEnd, libc::ENOSPC),
            (Kind::TimedOut, libc::ETIMEDOUT),
            (Kind::IsDirectory, libc::EISDIR),
            (Kind::NotDirectory, libc::ENOTDIR),
            (Kind::NotPermitted, libc::EPERM),
            (Kind::NotImplemented, libc::ENOSYS),
        ];
        for (kind, errno) in table {
            assert_eq!(Error::new(kind, "x").errno(), errno, "{kind:?}");
        }
    }
}
