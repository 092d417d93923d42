//! Enforces the "# Layers" section of `lib.rs`: reads every source file of
//! the crate, collects its `crate::<module>` references (through the
//! root's re-exports for `crate::<Item>`), and checks that the graph of
//! top-level modules has no cycle, that no module imports one of a higher
//! layer, and that the middle layer uses only the edges `lib.rs` lists.
//!
//! A folder's own files (`mm/fault.rs` naming `super::Mm`) are one module.
//! Comments, `tests.rs` files and `#[cfg(test)] mod tests { .. }` blocks
//! are not looked at: tests may drive the crate from the top.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every top-level module and its layer (0 = bottom, 1 = middle, 2 = top),
/// as in the table of `lib.rs`. A new module must be added here.
const LAYERS: &[(&str, u8)] = &[
    ("host", 2),
    ("snapshot", 1),
    ("exit", 1),
    ("ksm", 1),
    ("mm", 1),
    ("tracked", 1),
    ("vma", 1),
    ("types", 0),
    ("budget", 0),
    ("mmap_lock", 0),
    ("pgtable", 0),
    ("sys", 0),
    ("uffd", 0),
    ("contain", 0),
    ("clock", 0),
    ("counters", 0),
    ("loop_thread", 0),
    ("flags", 0),
    ("error", 0),
    ("sched", 0),
    ("procfs", 0),
];

/// The edges allowed inside the middle layer (the list in `lib.rs`).
const MIDDLE_EDGES: &[(&str, &str)] = &[
    ("exit", "mm"),
    ("ksm", "mm"),
    ("ksm", "tracked"),
    ("ksm", "vma"),
    ("mm", "tracked"),
    ("mm", "vma"),
    ("snapshot", "mm"),
    ("snapshot", "tracked"),
    ("snapshot", "vma"),
    ("vma", "tracked"),
];

/// Files that are test code only (not part of the graph).
fn is_test_file(rel: &Path) -> bool {
    rel.file_name().is_some_and(|n| n == "tests.rs")
        || rel.components().any(|c| c.as_os_str() == "tests")
        || rel == Path::new("layers.rs")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src/") {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The source without comments and without its trailing
/// `#[cfg(test)] mod tests { .. }` block.
fn code_of(src: &str) -> String {
    let src = match src.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &src[..i],
        None => src,
    };
    let mut out = String::with_capacity(src.len());
    let b = src.as_bytes();
    let mut i = 0;
    let mut in_str = false;
    while i < b.len() {
        if in_str {
            if b[i] == b'\\' {
                out.push_str("  ");
                i += 2;
                continue;
            }
            if b[i] == b'"' {
                in_str = false;
            }
            out.push(' ');
            i += 1;
        } else if b[i] == b'"' && (i == 0 || b[i - 1] != b'\'') {
            // String contents never count as references.
            in_str = true;
            out.push(' ');
            i += 1;
        } else if src[i..].starts_with("//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if src[i..].starts_with("/*") {
            let end = src[i + 2..].find("*/").map_or(b.len(), |k| i + 2 + k + 2);
            i = end;
        } else {
            let c = src[i..].chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

fn ident_at(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The first path segment of every item of `crate::{..}` or `crate::x`
/// (`s` starts right after `crate::`).
fn first_segments(s: &str) -> Vec<&str> {
    if !s.starts_with('{') {
        return vec![ident_at(s)];
    }
    let mut out = Vec::new();
    let mut depth = 0;
    let mut start = true;
    for (i, c) in s.char_indices() {
        match c {
            '{' => {
                depth += 1;
                start = depth == 1;
                continue;
            }
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => {
                start = true;
                continue;
            }
            c if c.is_whitespace() => continue,
            _ => {}
        }
        if start && depth == 1 {
            out.push(ident_at(&s[i..]));
        }
        start = false;
    }
    out
}

/// `crate::<Item>` → the module the root re-exports it from.
fn root_reexports(lib: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    let code = code_of(lib);
    let mut rest = code.as_str();
    while let Some(i) = rest.find("pub use ") {
        rest = &rest[i + "pub use ".len()..];
        let stmt = &rest[..rest.find(';').expect("`;` after `pub use`")];
        let module = ident_at(stmt);
        let items = &stmt[module.len() + 2..];
        for name in first_segments(items) {
            map.insert(name.to_owned(), module.to_owned());
        }
    }
    map
}

/// Top-level module → the other top-level modules it references.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let layers: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("read lib.rs");
    let reexports = root_reexports(&lib);
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).expect("under src/");
        if rel == Path::new("lib.rs") || is_test_file(rel) {
            continue;
        }
        let first = rel.components().next().expect("a component");
        let from = first.as_os_str().to_string_lossy();
        let from = from.trim_end_matches(".rs").to_owned();
        assert!(
            layers.contains_key(from.as_str()),
            "module `{from}` ({}) has no layer: add it to LAYERS and to lib.rs",
            rel.display()
        );
        let code = code_of(&std::fs::read_to_string(&f).expect("read source"));
        let edges = graph.entry(from.clone()).or_default();
        let mut rest = code.as_str();
        while let Some(i) = rest.find("crate::") {
            let before = rest[..i].chars().next_back();
            rest = &rest[i + "crate::".len()..];
            if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
                continue; // `$crate::`, `mm_core::`-like paths
            }
            for seg in first_segments(rest) {
                let to = if layers.contains_key(seg) {
                    seg.to_owned()
                } else if let Some(m) = reexports.get(seg) {
                    m.clone()
                } else {
                    panic!("{}: `crate::{seg}` names no module", rel.display());
                };
                if to != from {
                    edges.insert(to);
                }
            }
        }
    }
    graph
}

/// A cycle of `graph`, if any (as the list of modules along it).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == n) {
            let mut cycle = path[at..].to_vec();
            cycle.push(n.to_owned());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_owned());
        for m in graph.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, graph, done, path) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        if let Some(c) = visit(n, graph, &mut done, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

#[test]
fn test_no_module_cycle() {
    let graph = module_graph();
    for (from, tos) in &graph {
        eprintln!("{from} -> {tos:?}");
    }
    if let Some(c) = find_cycle(&graph) {
        panic!("import cycle among mm-core's modules: {}", c.join(" -> "));
    }
}

#[test]
fn test_no_import_of_a_higher_layer() {
    let layers: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let mut bad = Vec::new();
    for (from, tos) in module_graph() {
        for to in tos {
            let (lf, lt) = (layers[from.as_str()], layers[to.as_str()]);
            if lt > lf {
                bad.push(format!("{from} (layer {lf}) -> {to} (layer {lt})"));
            } else if lf == 1 && lt == 1 && !MIDDLE_EDGES.contains(&(from.as_str(), to.as_str())) {
                bad.push(format!("{from} -> {to}: not a middle-layer edge of lib.rs"));
            }
        }
    }
    assert!(bad.is_empty(), "layer violations:\n{}", bad.join("\n"));
}

#[test]
fn test_layer_check_sees_imports() {
    // The checker itself: a comment is not an import, a string is not one,
    // a grouped import names each of its modules, a root item its module.
    let code = code_of("// use crate::host;\nlet s = \"crate::host\";\nuse crate::{mm::Mm, Host};");
    assert!(!code.contains("crate::host"));
    let i = code.find("crate::").unwrap() + "crate::".len();
    assert_eq!(first_segments(&code[i..]), vec!["mm", "Host"]);
    let graph = module_graph();
    assert!(graph["exit"].contains("mm"));
    assert!(
        graph["host"].contains("ksm"),
        "Host::new_mm injects ksm's hook"
    );
    assert!(!graph["mm"].contains("ksm"));
    assert!(!graph["tracked"].contains("mm"));
}
