//! The crates' shape, checked by reading their sources: no import cycle
//! between the top-level modules of either crate (the root crate's, and
//! the middleware's, where data and decisions sit below the layers and
//! the stack), no file above the size that says it holds several concerns,
//! and no transport that decides a refusal (constructs one, or holds the
//! policy or the violation log).

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

/// `module -> the top-level modules it names as crate::…`, for the crate
/// whose sources are in `src`. A name the crate root re-exports
/// (`crate::Blocked`) counts as the module it comes from; unit tests
/// (`#[cfg(test)]` onwards) are left out.
fn dependencies_of(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let reexported = reexports(&src.join("lib.rs"));
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let Some(module) = module_of(src, &file) else {
            continue;
        };
        // A module's unit tests in a file of their own (`mod tests;`).
        if file.file_name().is_some_and(|name| name == "tests.rs") {
            continue;
        }
        let text = code(&file);
        let text = text.split("#[cfg(test)]").next().unwrap_or_default();
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
            let name = reexported.get(&name).cloned().unwrap_or(name);
            if !name.is_empty() && name != module {
                uses.insert(name);
            }
        }
    }
    graph
}

/// `name -> module` for what `lib` re-exports with `pub use module::{…}`
/// or `pub use module::name`.
fn reexports(lib: &Path) -> BTreeMap<String, String> {
    let text = code(lib);
    let mut names = BTreeMap::new();
    for statement in text.split(';') {
        let Some(rest) = statement.trim().strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, items)) = rest.split_once("::") else {
            continue;
        };
        let items = items.trim().trim_start_matches('{').trim_end_matches('}');
        for item in items.split(',') {
            let item = item.trim();
            let name = item.rsplit(" as ").next().unwrap_or(item).trim();
            if !name.is_empty() && !name.contains("::") {
                names.insert(name.to_owned(), module.trim().to_owned());
            }
        }
    }
    names
}

/// The root crate's graph.
fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
    dependencies_of(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

/// The middleware crate's graph.
fn middleware_dependencies() -> BTreeMap<String, BTreeSet<String>> {
    dependencies_of(&Path::new(env!("CARGO_MANIFEST_DIR")).join("middleware/src"))
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

/// Every cycle of `graph`, one line each.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    graph
        .keys()
        .filter_map(|start| {
            let mut path = vec![start.clone()];
            cycle_from(graph, start, &mut path).map(|cycle| cycle.join(" -> "))
        })
        .collect()
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let graph = dependencies();
    assert!(graph.contains_key("cli") && graph.contains_key("transport"));
    let found = cycles(&graph);
    assert!(found.is_empty(), "import cycles: {found:#?}");
}

#[test]
fn no_import_cycle_in_the_middleware_data_below_decisions_below_layers() {
    let graph = middleware_dependencies();
    assert!(graph.contains_key("policy") && graph.contains_key("stack"));
    let found = cycles(&graph);
    assert!(found.is_empty(), "import cycles: {found:#?}");
    // Data and decisions name no layer, and nothing names the stack.
    let layers = [
        "approval",
        "credentials",
        "future",
        "limited_mode",
        "loop_guard",
        "policy_layer",
        "request_rules_layer",
        "scan_layer",
        "strip_headers",
        "violation_log",
        "stack",
    ];
    let data = [
        "address",
        "error",
        "git",
        "inspect",
        "pattern",
        "policy",
        "protocol",
        "request",
        "request_rules",
        "scan",
        "target",
    ];
    let mut upward = Vec::new();
    for module in data {
        for used in graph.get(module).into_iter().flatten() {
            if layers.contains(&used.as_str()) {
                upward.push(format!("{module} -> {used}"));
            }
        }
    }
    for (module, uses) in &graph {
        if module != "stack" && uses.contains("stack") {
            upward.push(format!("{module} -> stack"));
        }
    }
    assert!(
        upward.is_empty(),
        "data or decisions naming a layer: {upward:#?}"
    );
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

/// Middleware files hold one concern each: none above 600 lines of code
/// (unit tests left out) but these, each for the reason given.
#[test]
fn no_middleware_file_holds_several_concerns() {
    let allowed: [(&str, &str); 3] = [
        (
            "violation_log.rs",
            "one record, rendered three ways (text line, JSON, OCSF-ready fields) where they must agree, and the layer that writes it",
        ),
        (
            "policy/mod.rs",
            "the policy's data, its one decision order (deny, local, allow) and the live handle: the builder is half of it",
        ),
        (
            "error.rs",
            "every reason's code, status and built-in message in one table, which the README's refusal table mirrors",
        ),
    ];
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("middleware/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut long = Vec::new();
    for file in files {
        let relative = file
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if relative.ends_with("tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let lines = text
            .split("#[cfg(test)]")
            .next()
            .unwrap_or_default()
            .lines()
            .count();
        if lines > 600 && !allowed.iter().any(|(name, _)| *name == relative) {
            long.push(format!("{relative}: {lines} lines"));
        }
    }
    assert!(long.is_empty(), "split these by concern: {long:#?}");
}
