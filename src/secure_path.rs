//! Paths the root daemon and CLI may trust, checked in one place.
//!
//! A directory is *trusted* when it and every directory above it up to `/` is owned by
//! root (or the process's own user) and writable by nobody else, as OpenSSH requires of
//! the paths to its key files. One exception above the last component: a root-owned
//! directory with the sticky bit (`/tmp`), whose entries only their owners may rename or
//! remove, so a root-owned directory in it stays where it is. Symlinks along the path are
//! followed only when root owns them (in a sticky directory anyone may make one). Nothing
//! but root can then change what a path through a trusted directory resolves to, so
//! files in it cannot be swapped for a user's symlink; every file is still opened with
//! `O_NOFOLLOW` under the directory's fd, so a leftover symlink is refused rather than
//! followed.
//!
//! The state directory, the fleecing directory and the state directory a client finds
//! for a mount (whose `control.sock` it talks to) all go through [`open_trusted_dir`].

use std::collections::VecDeque;
use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// The error of opening a file the CLI was given with `O_NOFOLLOW`: a symlink is said so.
pub fn symlink_refused(what: &str, path: &Path, e: io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        Error::invalid(format!(
            "{what} {} is a symlink: fleecefs never reads or writes a backup through one (give the file's own path)",
            path.display()
        ))
    } else {
        Error::io(format!("opening {what} {}", path.display()), e)
    }
}

/// What [`open_trusted_dir`] does about a missing directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missing {
    /// Fail: the directory must exist.
    Fail,
    /// Create it (and missing parents), mode 0700.
    Create,
    /// Only check what exists; a missing rest is fine (returns `None`).
    Allow,
}

/// Why a directory with owner `uid` and mode `mode` cannot be trusted by a process with
/// effective uid `euid`, or `None` when it can. `last` is the directory itself (no sticky
/// exception); the others are its parents.
pub fn untrusted_reason(uid: u32, mode: u32, euid: u32, last: bool) -> Option<String> {
    if uid != 0 && uid != euid {
        return Some(format!("is owned by uid {uid}, not root"));
    }
    let sticky = mode & libc::S_ISVTX != 0;
    if mode & 0o022 != 0 && (last || !sticky || uid != 0) {
        let who = if mode & 0o002 != 0 {
            "every user"
        } else {
            "its group"
        };
        return Some(format!("is writable by {who} (mode {:04o})", mode & 0o7777));
    }
    None
}

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `openat(dir, name, flags | O_NOFOLLOW | O_CLOEXEC, mode)`: `name` is one component.
pub fn open_in(dir: &File, name: &OsStr, flags: i32, mode: u32) -> io::Result<File> {
    let c = cstr(name)?;
    // SAFETY: `c` is a valid NUL-terminated string and `dir` an open fd for the call.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat returned a new fd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// `unlinkat(dir, name, 0)`; a missing file is fine.
pub fn remove_in(dir: &File, name: &OsStr) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: `c` is a valid NUL-terminated string and `dir` an open fd for the call.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), 0) } < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::NotFound {
            return Err(e);
        }
    }
    Ok(())
}

/// `renameat(dir, from, dir, to)`.
pub fn rename_in(dir: &File, from: &OsStr, to: &OsStr) -> io::Result<()> {
    let (f, t) = (cstr(from)?, cstr(to)?);
    let d = dir.as_raw_fd();
    // SAFETY: both names are valid NUL-terminated strings and `dir` an open fd.
    if unsafe { libc::renameat(d, f.as_ptr(), d, t.as_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn mkdir_in(dir: &File, name: &OsStr, mode: u32) -> io::Result<()> {
    let c = cstr(name)?;
    // SAFETY: `c` is a valid NUL-terminated string and `dir` an open fd for the call.
    if unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode as libc::mode_t) } < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(e);
        }
    }
    Ok(())
}

/// The target of the symlink `name` in `dir`, or `None` when `name` is not a symlink.
pub fn symlink_in(dir: &File, name: &OsStr) -> io::Result<Option<PathBuf>> {
    let c = cstr(name)?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: `buf` has `buf.len()` writable bytes; `c` and `dir` are valid for the call.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            c.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        // EINVAL: not a symlink.
        return match e.raw_os_error() {
            Some(libc::EINVAL) => Ok(None),
            _ => Err(e),
        };
    }
    buf.truncate(n as usize);
    Ok(Some(PathBuf::from(OsString::from_vec(buf))))
}

/// A trusted directory held open: every file in it is opened, created, renamed and
/// removed by name under this fd (`openat`/`renameat`/`unlinkat`, never following a
/// symlink), so a directory renamed or swapped for a symlink after it was checked cannot
/// send root elsewhere. The path is kept for messages only.
#[derive(Debug)]
pub struct Dir {
    fd: File,
    path: PathBuf,
}

impl Dir {
    /// The directory open as `fd`, found at `path` (for messages).
    pub fn new(fd: File, path: PathBuf) -> Dir {
        Dir { fd, path }
    }

    /// Where the directory was when it was opened (messages only).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` in it, as a path for messages only.
    pub fn display_path(&self, name: impl AsRef<OsStr>) -> PathBuf {
        self.path.join(name.as_ref())
    }

    /// The directory's fd.
    pub fn file(&self) -> &File {
        &self.fd
    }

    /// [`open_in`] this directory.
    pub fn open(&self, name: impl AsRef<OsStr>, flags: i32, mode: u32) -> io::Result<File> {
        open_in(&self.fd, name.as_ref(), flags, mode)
    }

    /// [`remove_in`] this directory (a missing file is fine).
    pub fn remove(&self, name: impl AsRef<OsStr>) -> io::Result<()> {
        remove_in(&self.fd, name.as_ref())
    }

    /// [`rename_in`] this directory.
    pub fn rename(&self, from: impl AsRef<OsStr>, to: impl AsRef<OsStr>) -> io::Result<()> {
        rename_in(&self.fd, from.as_ref(), to.as_ref())
    }

    /// Whether `name` exists in it (a symlink counts; it is not followed).
    pub fn exists(&self, name: impl AsRef<OsStr>) -> io::Result<bool> {
        let c = cstr(name.as_ref())?;
        // SAFETY: all-zero bytes are a valid `stat` (plain integers).
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid NUL-terminated string, `st` a writable stat and the fd
        // open for the call.
        let r = unsafe {
            libc::fstatat(
                self.fd.as_raw_fd(),
                c.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::NotFound => Ok(false),
            _ => Err(e),
        }
    }

    /// fsync of the directory, so that creations, renames and removals in it are durable.
    pub fn sync(&self) -> io::Result<()> {
        self.fd.sync_all()
    }

    /// The names of its entries (without `.` and `..`), read through the fd.
    pub fn names(&self) -> io::Result<Vec<OsString>> {
        // A new open file description: fdopendir takes the fd and reads from its offset.
        let d = open_in(
            &self.fd,
            OsStr::new("."),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )?;
        // SAFETY: `d` is an open directory fd whose ownership passes to the DIR stream
        // (closed by closedir below).
        let stream = unsafe { libc::fdopendir(std::os::fd::IntoRawFd::into_raw_fd(d)) };
        if stream.is_null() {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::new();
        loop {
            // SAFETY: `stream` is a valid DIR stream only this loop uses.
            let ent = unsafe { libc::readdir(stream) };
            if ent.is_null() {
                break;
            }
            // SAFETY: readdir returned a valid dirent whose d_name is NUL-terminated; it
            // is copied before the next readdir.
            let name = unsafe { std::ffi::CStr::from_ptr((*ent).d_name.as_ptr()) };
            let b = name.to_bytes();
            if b != b"." && b != b".." {
                out.push(OsString::from_vec(b.to_vec()));
            }
        }
        // SAFETY: `stream` came from fdopendir and is closed once.
        unsafe { libc::closedir(stream) };
        Ok(out)
    }
}

const MAX_LINKS: usize = 40;

fn refuse(what: &str, path: &Path, at: &Path, why: &str) -> Error {
    let whose = if at == path {
        format!("{what} {} is not safe: it", path.display())
    } else {
        format!("{what} {} is not safe: {}", path.display(), at.display())
    };
    Error::invalid(format!(
        "{whose} {why}; use a directory owned by root that only root can write, in directories only root can write"
    ))
}

/// Opens the directory `path` (absolute) after checking that it and every directory on
/// the way from `/` is trusted (see the module docs); `what` names it in messages
/// ("state directory"). With [`Missing::Create`], missing directories are made (0700);
/// with [`Missing::Allow`], a missing rest returns `Ok(None)` after the existing part
/// passed.
pub fn open_trusted_dir(path: &Path, what: &str, missing: Missing) -> Result<Option<File>> {
    walk(path, what, missing, true)
}

/// The directory that holds `path` (a file the CLI reads or writes as root: a copy's
/// DEST, a restore's source), opened by a walk from `/` that follows only symlinks owned
/// by root (or the process's user), and the file's name in it: open it with [`open_in`]
/// (`O_NOFOLLOW`), so that no other user's symlink leads the CLI to another file. A
/// relative `path` is taken from the current directory.
pub fn parent_of(path: &Path, what: &str) -> Result<(File, OsString)> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::io("finding the current directory", e))?
            .join(path)
    };
    let name = match abs.file_name() {
        Some(n) if abs.components().next_back() != Some(Component::ParentDir) => n.to_os_string(),
        _ => {
            return Err(Error::invalid(format!(
                "{what} {} does not name a file",
                path.display()
            )))
        }
    };
    let parent = abs.parent().unwrap_or(Path::new("/"));
    let dir = walk(parent, what, Missing::Fail, false)?
        .ok_or_else(|| Error::not_found(format!("{what} {}", path.display())))?;
    Ok((dir, name))
}

/// The directory `path` is in (relative paths from the current directory).
pub fn dir_of(path: &Path) -> Option<PathBuf> {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().ok()?.join(path)
    };
    abs.parent().map(Path::to_path_buf)
}

/// Walks `path` from `/`, following a symlink only when root (or this process's user)
/// owns it. `strict`: every directory must be trusted too.
fn walk(path: &Path, what: &str, missing: Missing, strict: bool) -> Result<Option<File>> {
    if !path.is_absolute() {
        return Err(Error::invalid(format!(
            "{what} {} is not an absolute path",
            path.display()
        )));
    }
    let euid = crate::sys::euid();
    let root = File::open("/").map_err(|e| Error::io("opening /", e))?;
    let check = |f: &File, at: &Path, last: bool| -> Result<()> {
        if !strict {
            return Ok(());
        }
        let m = f
            .metadata()
            .map_err(|e| Error::io(format!("stat of {}", at.display()), e))?;
        match untrusted_reason(m.uid(), m.permissions().mode(), euid, last) {
            Some(why) => Err(refuse(what, path, at, &why)),
            None => Ok(()),
        }
    };
    let mut todo: VecDeque<OsString> = VecDeque::new();
    let push_front = |todo: &mut VecDeque<OsString>, p: &Path| {
        for c in p.components().rev() {
            match c {
                Component::Normal(n) => todo.push_front(n.to_os_string()),
                Component::ParentDir => todo.push_front(OsString::from("..")),
                _ => {}
            }
        }
    };
    push_front(&mut todo, path);
    check(&root, Path::new("/"), todo.is_empty())?;
    // The directories walked so far, `/` first.
    let mut stack: Vec<(File, PathBuf)> = vec![(root, PathBuf::from("/"))];
    let mut links = 0;
    while let Some(name) = todo.pop_front() {
        if name == ".." {
            if stack.len() > 1 {
                stack.pop();
            }
            continue;
        }
        let (dir, at) = stack.last().expect("the stack always holds /");
        let here = at.join(&name);
        let link = symlink_in(dir, &name);
        match link {
            Ok(Some(target)) => {
                // Also in a trusted directory: a sticky one (`/tmp`) takes anyone's.
                let owner = open_in(dir, &name, libc::O_PATH, 0)
                    .and_then(|l| l.metadata())
                    .map_err(|e| Error::io(format!("stat of {}", here.display()), e))?
                    .uid();
                if owner != 0 && owner != euid {
                    return Err(Error::invalid(format!(
                        "{what} {}: {} is a symlink owned by uid {owner}; fleecefs follows only root's symlinks (give the real path)",
                        path.display(),
                        here.display()
                    )));
                }
                links += 1;
                if links > MAX_LINKS {
                    return Err(Error::invalid(format!(
                        "{what} {}: too many symlinks",
                        path.display()
                    )));
                }
                if target.is_absolute() {
                    stack.truncate(1);
                }
                push_front(&mut todo, &target);
                if todo.is_empty() {
                    // A symlink to `/`.
                    check(&stack[0].0, Path::new("/"), true)?;
                }
                continue;
            }
            Ok(None) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => match missing {
                Missing::Fail => {
                    return Err(Error::not_found(format!(
                        "{what} {} does not exist ({} is missing)",
                        path.display(),
                        here.display()
                    )))
                }
                Missing::Allow => return Ok(None),
                Missing::Create => mkdir_in(dir, &name, 0o700)
                    .map_err(|e| Error::io(format!("creating {}", here.display()), e))?,
            },
            Err(e) => return Err(Error::io(format!("reading {}", here.display()), e)),
        }
        let f = open_in(dir, &name, libc::O_RDONLY | libc::O_DIRECTORY, 0).map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOTDIR) {
                Error::invalid(format!(
                    "{what} {}: {} is not a directory",
                    path.display(),
                    here.display()
                ))
            } else {
                Error::io(format!("opening {}", here.display()), e)
            }
        })?;
        check(&f, &here, todo.is_empty())?;
        stack.push((f, here));
    }
    Ok(stack.pop().map(|(f, _)| f))
}

/// The subdirectory `name` (at `path`, for messages) of the trusted directory `dir`,
/// created (0700) if missing; refused when it is a symlink or another user may write it.
pub fn subdir_in(dir: &File, name: &OsStr, path: &Path) -> Result<File> {
    mkdir_in(dir, name, 0o700).map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    let f = open_in(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0).map_err(|e| {
        if matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)) {
            Error::invalid(format!(
                "{} is not a directory (a symlink is never followed there)",
                path.display()
            ))
        } else {
            Error::io(format!("opening {}", path.display()), e)
        }
    })?;
    let m = f
        .metadata()
        .map_err(|e| Error::io(format!("stat of {}", path.display()), e))?;
    if let Some(why) = untrusted_reason(m.uid(), m.permissions().mode(), crate::sys::euid(), true) {
        return Err(refuse("directory", path, path, &why));
    }
    Ok(f)
}

/// [`open_trusted_dir`] with [`Missing::Create`] or [`Missing::Fail`], as a [`Dir`].
pub fn trusted_dir(path: &Path, what: &str, missing: Missing) -> Result<Dir> {
    let fd = open_trusted_dir(path, what, missing)?
        .ok_or_else(|| Error::not_found(format!("{what} {}", path.display())))?;
    Ok(Dir::new(fd, path.to_path_buf()))
}

/// Opens (creating, mode 0600) the log file `path` for appending, never through a
/// symlink and only in a trusted directory (opened and checked first, the file opened
/// under its fd), and narrows a wider mode to 0600: the log holds the output of freeze
/// hooks.
pub fn open_log(path: &Path) -> io::Result<File> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let dir = open_trusted_dir(dir, "log directory", Missing::Fail)
        .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e.to_string()))?
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
    open_log_in(&dir, name)
}

/// [`open_log`] of the file `name` in the open directory `dir`.
pub fn open_log_in(dir: &File, name: &OsStr) -> io::Result<File> {
    let f = open_in(
        dir,
        name,
        libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT,
        0o600,
    )?;
    let m = f.metadata()?;
    if !m.is_file() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    if m.permissions().mode() & 0o077 != 0 {
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(f)
}

/// Creates a listening UNIX socket at `path` (absolute) with mode 0600, in a trusted
/// directory (see the module docs; `what` names the socket in messages). A leftover
/// socket at the path is replaced; any other file there is refused. Call while no other
/// thread creates files: the umask is process-wide.
pub fn bind_private_socket(path: &Path, what: &str) -> Result<std::os::unix::net::UnixListener> {
    let old = crate::sys::set_umask(0o177);
    let l = bind_socket_0600(path, what);
    crate::sys::set_umask(old);
    l
}

/// [`bind_private_socket`] in a process whose umask already keeps group and others out
/// (the daemon's, 0o077), from any thread: the umask is left alone.
pub fn bind_private_socket_in_daemon(
    path: &Path,
    what: &str,
) -> Result<std::os::unix::net::UnixListener> {
    bind_socket_0600(path, what)
}

fn bind_socket_0600(path: &Path, what: &str) -> Result<std::os::unix::net::UnixListener> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::invalid(format!("{what} {} has no directory", path.display())))?;
    open_trusted_dir(dir, &format!("the directory of {what}"), Missing::Fail)?;
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) {
            return Err(Error::invalid(format!(
                "{what} {} exists and is not a socket",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(path);
    }
    let l = std::os::unix::net::UnixListener::bind(path);
    let l = l.map_err(|e| Error::io(format!("creating {what} {}", path.display()), e))?;
    // Not group- or world-accessible whatever the umask did.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("setting the mode of {}", path.display()), e))?;
    Ok(l)
}

/// `p` (absolute) with symlinks and `..` resolved as far as it exists; the missing rest
/// is appended with `..` applied lexically.
pub fn resolved(p: &Path) -> PathBuf {
    let mut missing = Vec::new();
    let mut cur = p.to_path_buf();
    let mut out = loop {
        if let Ok(c) = cur.canonicalize() {
            break c;
        }
        match (cur.file_name(), cur.parent()) {
            (Some(name), Some(parent)) => {
                missing.push(name.to_os_string());
                cur = parent.to_path_buf();
            }
            // '..' at the end, or the root: nothing more to resolve.
            _ => break cur,
        }
    };
    for c in missing.into_iter().rev() {
        if c == ".." {
            out.pop();
        } else if c != "." {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolved_follows_what_exists_and_appends_the_rest() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("m")).unwrap();
        let base = d.path().canonicalize().unwrap();
        assert_eq!(resolved(&d.path().join("m/../m/y")), base.join("m/y"));
        assert_eq!(resolved(&d.path().join("nope/./z")), base.join("nope/z"));
    }

    #[test]
    fn owners_and_modes() {
        assert_eq!(untrusted_reason(0, 0o40755, 0, true), None);
        assert_eq!(untrusted_reason(1000, 0o40700, 1000, true), None);
        let r = untrusted_reason(1000, 0o40700, 0, true).unwrap();
        assert!(r.contains("owned by uid 1000"), "{r}");
        let r = untrusted_reason(0, 0o40775, 0, true).unwrap();
        assert!(r.contains("writable by its group"), "{r}");
        let r = untrusted_reason(0, 0o40777, 0, false).unwrap();
        assert!(r.contains("every user"), "{r}");
        // /tmp: fine above, not as the directory itself, nor owned by a user.
        assert_eq!(untrusted_reason(0, 0o41777, 0, false), None);
        assert!(untrusted_reason(0, 0o41777, 0, true).is_some());
        assert!(untrusted_reason(5, 0o41777, 5, false).is_some());
    }

    #[test]
    fn walks_creates_and_refuses() {
        let t = tempfile::tempdir().unwrap();
        let base = t.path().canonicalize().unwrap();
        let want = base.join("a/b");
        assert!(open_trusted_dir(&want, "dir", Missing::Allow)
            .unwrap()
            .is_none());
        assert!(open_trusted_dir(&want, "dir", Missing::Fail).is_err());
        let f = open_trusted_dir(&want, "dir", Missing::Create)
            .unwrap()
            .unwrap();
        assert!(f.metadata().unwrap().is_dir());
        assert_eq!(
            std::fs::metadata(&want).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // Through a symlink in a trusted directory, and '..'.
        std::os::unix::fs::symlink("a", base.join("l")).unwrap();
        assert!(open_trusted_dir(&base.join("l/b/../b"), "dir", Missing::Fail).is_ok());
        std::fs::set_permissions(base.join("a"), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = open_trusted_dir(&want, "state directory", Missing::Fail)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("state directory") && e.contains("every user"),
            "{e}"
        );
        assert!(e.contains(&base.join("a").display().to_string()), "{e}");
        std::fs::write(base.join("file"), b"").unwrap();
        let e = open_trusted_dir(&base.join("file"), "dir", Missing::Fail)
            .err()
            .unwrap();
        assert!(e.to_string().contains("not a directory"), "{e}");
    }

    #[test]
    fn log_is_private_and_never_a_symlink() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("x.log");
        std::fs::write(&log, b"").unwrap();
        std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(open_log(&log).unwrap());
        assert_eq!(
            std::fs::metadata(&log).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let victim = t.path().join("victim");
        std::fs::write(&victim, b"v").unwrap();
        let link = t.path().join("l.log");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(open_log(&link).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"v");
    }
}
