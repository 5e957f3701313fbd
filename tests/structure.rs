//! The crate's shape, checked by reading its sources: no import cycle
//! between the root crate's top-level modules, and no transport that
//! decides a refusal (constructs one, or holds the policy or the violation
//! log).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, into: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, into);
        } else if path.extension().is_some_and(|e| e == "rs") {
            into.push(path);
        }
    }
}

/// The code of a file, comments left out (doc links are not imports).
fn code(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level module a file of `src/` belongs to (`None` for the crate
/// root and the binary).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_owned())
}

/// `module -> the top-level modules it names as crate::…`.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let Some(module) = module_of(&src, &file) else {
            continue;
        };
        let text = code(&file);
        assert!(
            !text.contains("crate::{"),
            "{}: name each module in its own `use crate::…` (this test reads them one by one)",
            file.display()
        );
        let uses = graph.entry(module.clone()).or_default();
        for (index, _) in text.match_indices("crate::") {
            let name: String = text[index + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                uses.insert(name);
            }
        }
    }
    graph
}

/// A cycle through `start`, if there is one.
fn cycle_from(
    graph: &BTreeMap<String, BTreeSet<String>>,
    start: &str,
    path: &mut Vec<String>,
) -> Option<Vec<String>> {
    let last = path.last().cloned().unwrap_or_else(|| start.to_owned());
    for next in graph.get(&last).into_iter().flatten() {
        if next == start {
            let mut cycle = path.clone();
            cycle.push(start.to_owned());
            return Some(cycle);
        }
        if path.contains(next) || next.as_str() < start {
            continue;
        }
        path.push(next.clone());
        if let Some(cycle) = cycle_from(graph, start, path) {
            return Some(cycle);
        }
        path.pop();
    }
    None
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let graph = dependencies();
    assert!(graph.contains_key("cli") && graph.contains_key("transport"));
    let cycles: Vec<String> = graph
        .keys()
        .filter_map(|start| {
            let mut path = vec![start.clone()];
            cycle_from(&graph, start, &mut path).map(|cycle| cycle.join(" -> "))
        })
        .collect();
    assert!(cycles.is_empty(), "import cycles: {cycles:#?}");
}

#[test]
fn no_transport_decides_a_refusal() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/transport");
    let mut files = Vec::new();
    rust_files(&dir, &mut files);
    assert!(files.len() > 5, "{files:?}");
    let forbidden = [
        "Blocked::new",
        "Blocked {",
        "Reason::",
        "PolicyHandle",
        "NetworkPolicy",
        "ViolationLog",
        "ViolationRing",
        "ViolationSink",
        "Mode::",
    ];
    let mut found = Vec::new();
    for file in &files {
        // A transport's unit tests build refusals to check its answers.
        let text = code(file);
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
        // The one rescue per wire reads the reason to answer it.
        let answers = file.file_name().is_some_and(|name| name == "rescue.rs");
        for word in forbidden {
            if text.contains(word) && !(answers && word == "Reason::") {
                found.push(format!("{}: {word}", file.display()));
            }
        }
    }
    assert!(found.is_empty(), "transport code deciding: {found:#?}");
}
