//! The layout reads as one flow: no top-level module of any crate's `src/` imports one that
//! imports it back, directly or through others. A module's edges are the `crate::name` paths
//! written in its files (outside comments), as a reader would follow them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src` belongs to (`src/serve/apps.rs` -> `serve`); none for the
/// crate roots.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let first = file.strip_prefix(src).ok()?.components().next()?;
    let name = first.as_os_str().to_string_lossy();
    let name = name.strip_suffix(".rs").unwrap_or(&name).to_owned();
    (!matches!(name.as_str(), "lib" | "main")).then_some(name)
}

/// The names that follow `crate::` in `text`, single or in a `crate::{a, b::c}` group.
fn crate_paths(text: &str) -> BTreeSet<String> {
    let code: String = text
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        // `canaryd_engine::crate::` never occurs; a preceding identifier character means another
        // word (e.g. `my_crate::`).
        let before = code[..i].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = group.split('}').next().unwrap_or("");
            out.extend(
                group
                    .split(',')
                    .map(|p| ident(p.trim()))
                    .filter(|n| !n.is_empty()),
            );
        } else {
            out.insert(ident(rest));
        }
    }
    out
}

fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| top_module(src, f)).collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> =
        modules.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    for file in &files {
        let Some(from) = top_module(src, file) else {
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for to in crate_paths(&text) {
            if to != from && modules.contains(&to) {
                edges.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    edges
}

/// A cycle through `start`, if there is one.
fn cycle_from(edges: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_owned(), vec![start.to_owned()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in edges.get(&at).into_iter().flatten() {
            if next == start {
                return Some(path);
            }
            if seen.insert(next.clone()) {
                let mut longer = path.clone();
                longer.push(next.clone());
                stack.push((next.clone(), longer));
            }
        }
    }
    None
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sources = vec![root.join("src")];
    if let Ok(crates) = std::fs::read_dir(root.join("crates")) {
        sources.extend(crates.flatten().map(|c| c.path().join("src")));
    }
    let mut cycles = Vec::new();
    for src in sources.iter().filter(|s| s.is_dir()) {
        let edges = graph(src);
        assert!(!edges.is_empty(), "{} has modules", src.display());
        for module in edges.keys() {
            if let Some(cycle) = cycle_from(&edges, module) {
                cycles.push(format!("{}: {} -> {module}", src.display(), cycle.join(" -> ")));
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "modules that import each other:\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_reader_finds_single_and_grouped_paths_and_skips_comments() {
    let text = "use crate::engine::Input;\nuse crate::{events, store::Store};\n// crate::serve\nlet x = crate::io::blocking;";
    let found: Vec<String> = crate_paths(text).into_iter().collect();
    assert_eq!(found, ["engine", "events", "io", "store"]);
    // A cycle is found; a chain is not.
    let edges: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.into_iter().map(str::to_owned).collect()))
    .collect();
    assert_eq!(
        cycle_from(&edges, "a"),
        Some(vec!["a".into(), "b".into(), "c".into()])
    );
    assert_eq!(cycle_from(&edges, "d"), None);
}
