//! The root README's wasmtime snippet is this crate's README doctest,
//! word for word (the root README marks its copy `ignore`: the facade does
//! not depend on wasmtime).

fn snippet(path: &str, fence: &str) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let start = text
        .find(fence)
        .unwrap_or_else(|| panic!("{path}: no {fence:?} block"))
        + fence.len();
    let end = start + text[start..].find("```\n").expect("closing fence");
    text[start..end].to_string()
}

#[test]
fn root_readme_snippet_is_the_doctest() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let ours = snippet(&format!("{dir}/README.md"), "```rust\n");
    let root = snippet(&format!("{dir}/../README.md"), "```rust,ignore\n");
    assert_eq!(root, ours, "README.md and mm-wasmtime/README.md disagree");
    assert!(ours.contains("mm_wasmtime::"), "the wasmtime snippet");
}
