//! The module map of docs/architecture.md names every source file exactly once, and
//! only files that exist. The map is the first code block under `## Module map`: one
//! line per file, `src/PATH.rs` then what the file owns; blank lines and lines starting
//! with `#` (group titles) are allowed. Runs anywhere (no root, no mount).

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

const DOC: &str = "docs/architecture.md";
const HEADING: &str = "## Module map";

/// Every `.rs` file under `dir`, as a path relative to the repository (`src/...`).
fn source_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    let mut entries: Vec<_> = fs::read_dir(root.join(dir))
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let rel = path.strip_prefix(root).unwrap().to_path_buf();
        if path.is_dir() {
            source_files(root, &rel, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(rel.to_string_lossy().into_owned());
        }
    }
}

/// The map's entries: file -> line number in the document. Panics on a malformed map.
fn module_map(doc: &str) -> BTreeMap<String, usize> {
    let mut lines = doc.lines().enumerate();
    lines
        .by_ref()
        .find(|(_, l)| l.trim_end() == HEADING)
        .unwrap_or_else(|| panic!("{DOC} has no `{HEADING}` section"));
    lines
        .by_ref()
        .take_while(|(_, l)| !l.starts_with("## "))
        .find(|(_, l)| l.starts_with("```"))
        .unwrap_or_else(|| panic!("{DOC}: no code block under `{HEADING}`"));
    let mut map = BTreeMap::new();
    for (i, line) in lines {
        let n = i + 1;
        if line.starts_with("```") {
            return map;
        }
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let mut words = text.split_whitespace();
        let path = words.next().unwrap_or_default();
        assert!(
            path.starts_with("src/") && path.ends_with(".rs"),
            "{DOC}:{n}: a module map line must start with a src/ file, not `{path}`"
        );
        assert!(
            words.next().is_some(),
            "{DOC}:{n}: `{path}` needs a few words on what it owns"
        );
        if let Some(first) = map.insert(path.to_string(), n) {
            panic!("{DOC}:{n}: `{path}` is already in the module map (line {first})");
        }
    }
    panic!("{DOC}: the module map's code block is not closed");
}

#[test]
fn every_source_file_is_in_the_module_map() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = fs::read_to_string(root.join(DOC)).unwrap();
    let map = module_map(&doc);
    let mut files = Vec::new();
    source_files(root, Path::new("src"), &mut files);

    let missing: Vec<&String> = files.iter().filter(|f| !map.contains_key(*f)).collect();
    let stale: Vec<(&String, &usize)> = map
        .iter()
        .filter(|(f, _)| !root.join(f).is_file())
        .collect();
    let mut problems = String::new();
    for f in &missing {
        problems += &format!(
            "{f} is not in the module map: add a line `{f}  WHAT IT OWNS` to the code block \
             under `{HEADING}` in {DOC}, in the group of its folder\n"
        );
    }
    for (f, n) in &stale {
        problems += &format!(
            "{DOC}:{n}: the module map names {f}, which does not exist: rename or remove \
             that line\n"
        );
    }
    assert!(problems.is_empty(), "\n{problems}");
}

/// docs/architecture.md ("Invariants and lock order") states the copy-before-write
/// ordering invariant and the lock order only by linking to these sections of the code.
#[test]
fn the_invariants_the_doc_links_to_are_in_the_code() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = fs::read_to_string(root.join(DOC)).unwrap();
    let code = fs::read_to_string(root.join("src/cbw/mod.rs")).unwrap();
    for section in ["The ordering invariant", "Locks and their order"] {
        assert!(
            doc.contains(&format!("\"{section}\"")),
            "{DOC} no longer names the section \"{section}\" of src/cbw/mod.rs"
        );
        assert!(
            code.contains(&format!("//! # {section}")),
            "src/cbw/mod.rs has no `//! # {section}` section, which {DOC} links to: \
             keep it at the top of the copy path, or update the link"
        );
    }
}
