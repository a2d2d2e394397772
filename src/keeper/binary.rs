//! The binary a worker is started from, held open: the keeper execs the file it verified
//! (`execveat(fd, "", AT_EMPTY_PATH)`), never a path resolved again later, so that
//! replacing the file afterwards changes nothing.
//!
//! `restart --binary PATH` is trusted only as root would trust a program it runs: an
//! absolute path, every directory on the way from `/` owned by root and writable by
//! nobody else (a root-owned sticky directory such as `/tmp` may be on the way, as for
//! the state directory, see `secure_path`), and the file a regular file owned by root,
//! not writable by its group or others, and executable.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::error::{Error, Result};
use crate::secure_path;

/// A worker binary, open.
#[derive(Debug)]
pub struct Binary {
    path: PathBuf,
    file: File,
}

impl Binary {
    /// The keeper's own binary, as this process runs it (`/proc/self/exe`: the same file
    /// even if its path was replaced since).
    pub fn running(path: PathBuf) -> Result<Binary> {
        let file = File::open("/proc/self/exe")
            .map_err(|e| Error::io("opening the running fleecefs executable", e))?;
        Ok(Binary { path, file })
    }

    /// The keeper's own binary as installed now at `path` (where the keeper was started
    /// from, trusted as the keeper itself is).
    pub fn installed(path: &Path) -> Result<Binary> {
        let file = File::open(path)
            .map_err(|e| Error::io(format!("opening binary {}", path.display()), e))?;
        Ok(Binary {
            path: path.to_path_buf(),
            file,
        })
    }

    /// `restart --binary PATH`: opened after the checks of the module docs.
    pub fn verify(path: &Path) -> Result<Binary> {
        let shown = path.display();
        let what = "restart --binary";
        if !path.is_absolute() {
            return Err(Error::invalid(format!(
                "{what} {shown} is not an absolute path"
            )));
        }
        let (Some(name), Some(parent)) = (path.file_name(), path.parent()) else {
            return Err(Error::invalid(format!(
                "{what} {shown} does not name a file"
            )));
        };
        let dir = secure_path::open_trusted_dir(parent, what, secure_path::Missing::Fail)?
            .ok_or_else(|| Error::not_found(format!("{what} {shown} does not exist")))?;
        let file = secure_path::open_in(&dir, name, libc::O_RDONLY, 0).map_err(|e| {
            match e.raw_os_error() {
                Some(libc::ELOOP) => Error::invalid(format!(
                    "{what} {shown} is a symlink: give the path of the file itself"
                )),
                _ => Error::io(format!("{what} {shown}"), e),
            }
        })?;
        let m = file
            .metadata()
            .map_err(|e| Error::io(format!("{what} {shown}"), e))?;
        let mode = m.permissions().mode();
        let why = if !m.is_file() {
            Some("is not a regular file".to_string())
        } else if m.uid() != 0 {
            Some(format!("is owned by uid {}, not root", m.uid()))
        } else if mode & 0o022 != 0 {
            Some(format!(
                "is writable by {} (mode {:04o})",
                if mode & 0o002 != 0 {
                    "every user"
                } else {
                    "its group"
                },
                mode & 0o7777
            ))
        } else if mode & 0o111 == 0 {
            Some("is not an executable file".to_string())
        } else {
            None
        };
        if let Some(why) = why {
            return Err(Error::invalid(format!(
                "{what} {shown} is not safe to run as root: it {why}; install it owned by root and writable only by root"
            )));
        }
        Ok(Binary {
            path: path.to_path_buf(),
            file,
        })
    }

    /// The path it was opened at (for messages and `status`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether both are the same file.
    pub fn same_file(&self, other: &Binary) -> bool {
        match (self.file.metadata(), other.file.metadata()) {
            (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
            _ => false,
        }
    }

    /// Another handle of the same open file.
    pub fn try_clone(&self) -> Result<Binary> {
        Ok(Binary {
            path: self.path.clone(),
            file: self
                .file
                .try_clone()
                .map_err(|e| Error::io("duplicating the binary's fd", e))?,
        })
    }

    /// The open file's fd (kept open across the exec, for scripts' interpreters).
    pub fn fd(&self) -> i32 {
        self.file.as_raw_fd()
    }

    /// Runs `BINARY --version` from the open file: it must say fleecefs.
    pub fn check_version(&self) -> Result<()> {
        let shown = self.path.display();
        // This process's fd, by its /proc link: the file opened, not the path.
        let link = format!("/proc/{}/fd/{}", std::process::id(), self.fd());
        let out = Command::new(&link)
            .arg("--version")
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .map_err(|e| Error::io(format!("running {shown} --version"), e))?;
        if !out.status.success() || !out.stdout.starts_with(b"fleecefs ") {
            return Err(Error::invalid(format!(
                "{shown} is not a fleecefs binary ('{shown} --version' does not say fleecefs)"
            )));
        }
        Ok(())
    }
}

/// An `execveat` prepared before `fork`: in the child, only [`Exec::run`] is called
/// (async-signal-safe: no allocation).
pub struct Exec {
    fd: i32,
    _strings: Vec<CString>,
    argv: Vec<*mut libc::c_char>,
    envp: Vec<*mut libc::c_char>,
}

// SAFETY: the pointers point into `_strings`, owned by the same value and never changed;
// they are only read (by execveat in a forked child).
unsafe impl Send for Exec {}
// SAFETY: as above: nothing is written through the pointers.
unsafe impl Sync for Exec {}

impl Exec {
    /// Runs `binary` with `args` (after argv\[0\]) and this process's environment plus
    /// `extra_env`.
    pub fn new(binary: &Binary, args: &[OsString], extra_env: &[(&str, String)]) -> Result<Exec> {
        let c = |s: &[u8]| {
            CString::new(s).map_err(|_| Error::invalid("an argument contains a NUL byte"))
        };
        let mut strings = vec![c(binary.path.as_os_str().as_bytes())?];
        for a in args {
            strings.push(c(a.as_bytes())?);
        }
        let nargs = strings.len();
        let overridden: Vec<&str> = extra_env.iter().map(|(k, _)| *k).collect();
        for (k, v) in std::env::vars_os() {
            if overridden.iter().any(|o| OsStr::new(o) == k) {
                continue;
            }
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            strings.push(c(&kv)?);
        }
        for (k, v) in extra_env {
            strings.push(c(format!("{k}={v}").as_bytes())?);
        }
        // execve takes `char *const argv[]`: the strings are never written through.
        let ptrs: Vec<*mut libc::c_char> = strings
            .iter()
            .map(|s| s.as_ptr() as *mut libc::c_char)
            .collect();
        let mut argv = ptrs[..nargs].to_vec();
        argv.push(std::ptr::null_mut());
        let mut envp = ptrs[nargs..].to_vec();
        envp.push(std::ptr::null_mut());
        Ok(Exec {
            fd: binary.fd(),
            _strings: strings,
            argv,
            envp,
        })
    }

    /// In the child: replaces the process with the binary; returns only on failure.
    pub fn run(&self) -> std::io::Error {
        // SAFETY: argv and envp are NULL-terminated arrays of valid C strings that live
        // as long as `self`; the empty path with AT_EMPTY_PATH execs the fd itself.
        unsafe {
            libc::execveat(
                self.fd,
                c"".as_ptr(),
                self.argv.as_ptr(),
                self.envp.as_ptr(),
                libc::AT_EMPTY_PATH,
            );
        }
        std::io::Error::last_os_error()
    }
}
