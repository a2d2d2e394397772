//! The patch files in `vendor/CRATE/patches/` describe each vendored tree (fuser, vhost,
//! vhost-user-backend, virtio-queue): undone in reverse order on a copy of `vendor/CRATE/`,
//! every one of them applies. A
//! change to a vendored tree without its patch file (or a patch file that was edited
//! without the tree) fails here. Needs `git` (for `git apply`), no network and no root.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &dest);
        } else {
            fs::copy(entry.path(), &dest).unwrap();
        }
    }
}

fn patches(vendor: &Path) -> Vec<PathBuf> {
    let mut patches: Vec<PathBuf> = fs::read_dir(vendor.join("patches"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "patch"))
        .collect();
    patches.sort();
    patches
}

#[test]
fn patches_reverse_apply_to_the_vendored_tree() {
    check_vendored("fuser");
}

#[test]
fn vhost_patches_reverse_apply_to_the_vendored_tree() {
    check_vendored("vhost");
}

#[test]
fn vhost_user_backend_patches_reverse_apply_to_the_vendored_tree() {
    check_vendored("vhost-user-backend");
}

#[test]
fn virtio_queue_patches_reverse_apply_to_the_vendored_tree() {
    check_vendored("virtio-queue");
}

fn check_vendored(name: &str) {
    let vendor = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("vendor")
        .join(name);
    let patches = patches(&vendor);
    assert!(
        !patches.is_empty(),
        "no .patch files in {}",
        vendor.join("patches").display()
    );
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join(name);
    copy_tree(&vendor.join("src"), &tree.join("src"));
    fs::copy(vendor.join("Cargo.toml"), tree.join("Cargo.toml")).unwrap();
    for patch in patches.iter().rev() {
        let out = Command::new("git")
            .args(["apply", "--reverse"])
            .arg(patch)
            .current_dir(&tree)
            .output()
            .expect("git is needed to check the vendored patches");
        assert!(
            out.status.success(),
            "{} does not match vendor/{name} (undone after the later patches): {}\n\
             A change to vendor/{name} needs its patch file (vendor/{name}/PATCHES.md).",
            patch.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
}
