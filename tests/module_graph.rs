//! No import cycles between the library's modules: neither between the top-level modules of `src/` (`src/x.rs` or
//! `src/x/`) nor between the traffic tools (the submodules of `traffic`, each a node of its own). A file's edges are
//! the `crate::…` paths of its code, `use` trees included, and in `traffic` its `super::…` paths; comments are left out
//! (a module's doc may name the modules that use it). The test fails on any cycle, naming a file and line of each of
//! its edges; no edge is excused.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The module whose submodules are nodes of their own.
const SPLIT: &str = "traffic";

/// Where an edge was seen first: file and line.
type Edges = BTreeMap<(String, String), String>;

/// The paths written after `crate::` at the start of `s`, each cut to its first two segments (`{a, b::c}` is `a`
/// and `b::c`).
fn paths(s: &str) -> Vec<Vec<String>> {
    fn tree(b: &[u8], i: &mut usize) -> Vec<Vec<String>> {
        let skip_ws = |i: &mut usize| {
            while *i < b.len() && b[*i].is_ascii_whitespace() {
                *i += 1;
            }
        };
        skip_ws(i);
        if *i < b.len() && b[*i] == b'{' {
            *i += 1;
            let mut out = Vec::new();
            loop {
                skip_ws(i);
                match b.get(*i) {
                    None => return out,
                    Some(b'}') => {
                        *i += 1;
                        return out;
                    }
                    Some(b',') => *i += 1,
                    Some(_) => {
                        let before = *i;
                        out.extend(tree(b, i));
                        if *i == before {
                            // Not a path (e.g. `*`): step over it.
                            *i += 1;
                        }
                    }
                }
            }
        }
        let start = *i;
        while *i < b.len() && (b[*i].is_ascii_alphanumeric() || b[*i] == b'_') {
            *i += 1;
        }
        if start == *i {
            return Vec::new();
        }
        let ident = String::from_utf8_lossy(&b[start..*i]).into_owned();
        if b[*i..].starts_with(b"::") {
            *i += 2;
            let rest = tree(b, i);
            if rest.is_empty() {
                return vec![vec![ident]];
            }
            return rest
                .into_iter()
                .map(|mut p| {
                    p.insert(0, ident.clone());
                    p.truncate(2);
                    p
                })
                .collect();
        }
        vec![vec![ident]]
    }
    let mut i = 0;
    tree(s.as_bytes(), &mut i)
}

/// A line without its comment: what follows the first `//` that is not inside a string literal.
fn code_of(line: &str) -> &str {
    let (mut in_string, mut escaped) = (false, false);
    let b = line.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        match c {
            _ if escaped => escaped = false,
            b'\\' if in_string => escaped = true,
            // A quote as a character literal (`'"'`) opens no string.
            b'"' if !(i > 0 && b[i - 1] == b'\'' && b.get(i + 1) == Some(&b'\'')) => in_string = !in_string,
            b'/' if !in_string && b.get(i + 1) == Some(&b'/') => return &line[..i],
            _ => {}
        }
    }
    line
}

/// The node a file belongs to (`None` for the crate roots).
fn node_of(rel: &Path) -> Option<String> {
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    match parts.as_slice() {
        [root] if root == "lib" || root == "main" => None,
        [split, sub, ..] if split == SPLIT && sub != "mod" => Some(format!("{SPLIT}::{sub}")),
        [first, ..] => Some(first.clone()),
        [] => None,
    }
}

/// The node a path names, from the crate root.
fn target(path: &[String], nodes: &BTreeSet<String>) -> Option<String> {
    let first = path.first()?;
    if first == SPLIT {
        if let Some(sub) = path.get(1) {
            let n = format!("{SPLIT}::{sub}");
            if nodes.contains(&n) {
                return Some(n);
            }
        }
    }
    Some(first.clone())
}

/// The edges of one file's text, from `node`; an edge to a name that is no module is an error.
fn edges_of(node: &str, file: &str, text: &str, nodes: &BTreeSet<String>, edges: &mut Edges) -> Result<(), String> {
    for (n, line) in text.lines().enumerate() {
        let line = code_of(line);
        let mut found: Vec<Vec<String>> = Vec::new();
        for (at, _) in line.match_indices("crate::") {
            // `crate::` itself, or `$crate::` in a macro; not the end of a longer name (`my_crate::`).
            let before = line[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            found.extend(paths(&line[at + "crate::".len()..]));
        }
        if node.starts_with(&format!("{SPLIT}::")) {
            for (at, _) in line.match_indices("super::") {
                let before = line[..at].chars().next_back();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                    continue;
                }
                // `super::sim` from a tool is its sibling; `super::Item` in a `mod tests` is the tool itself.
                for p in paths(&line[at + "super::".len()..]) {
                    if nodes.contains(&format!("{SPLIT}::{}", p[0])) {
                        found.push(vec![SPLIT.to_string(), p[0].clone()]);
                    }
                }
            }
        }
        for p in found {
            let Some(to) = target(&p, nodes) else { continue };
            if !nodes.contains(&to) {
                return Err(format!(
                    "{file}:{}: `crate::{}` names no module of src/",
                    n + 1,
                    p.join("::")
                ));
            }
            if to != node {
                edges
                    .entry((node.to_string(), to))
                    .or_insert_with(|| format!("{file}:{}", n + 1));
            }
        }
    }
    Ok(())
}

/// Every cycle, each once, as the nodes along it (the first repeated at the end).
fn cycles(edges: &Edges) -> Vec<Vec<String>> {
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        next.entry(from).or_default().push(to);
    }
    let mut found: BTreeSet<Vec<String>> = BTreeSet::new();
    // From each node, the simple paths back to it through nodes greater than it: each cycle is found once, from its
    // least node. The graphs here have some twenty nodes.
    fn walk<'a>(
        start: &'a str,
        at: &'a str,
        next: &BTreeMap<&'a str, Vec<&'a str>>,
        path: &mut Vec<&'a str>,
        found: &mut BTreeSet<Vec<String>>,
    ) {
        for &to in next.get(at).into_iter().flatten() {
            if to == start {
                let mut cycle: Vec<String> = path.iter().map(|s| s.to_string()).collect();
                cycle.push(start.to_string());
                found.insert(cycle);
            } else if to > start && !path.contains(&to) {
                path.push(to);
                walk(start, to, next, path, found);
                path.pop();
            }
        }
    }
    for &start in next.keys() {
        walk(start, start, &next, &mut vec![start], &mut found);
    }
    found.into_iter().collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The graph of `src/`.
fn graph_of(src: &Path) -> Result<Edges, String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let owned: Vec<(String, PathBuf)> = files
        .into_iter()
        .filter_map(|f| Some((node_of(f.strip_prefix(src).unwrap())?, f)))
        .collect();
    let nodes: BTreeSet<String> = owned
        .iter()
        .map(|(n, _)| n.clone())
        .chain([SPLIT.to_string()])
        .collect();
    let mut edges = Edges::new();
    for (node, file) in &owned {
        let text = std::fs::read_to_string(file).unwrap();
        let name = file.strip_prefix(src.parent().unwrap()).unwrap().display().to_string();
        edges_of(node, &name, &text, &nodes, &mut edges)?;
    }
    Ok(edges)
}

/// The graph between top-level modules: each `traffic::x` counted as `traffic`.
fn top_level(edges: &Edges) -> Edges {
    let top = |n: &str| n.split("::").next().unwrap_or(n).to_string();
    let mut out = Edges::new();
    for ((from, to), at) in edges {
        let (from, to) = (top(from), top(to));
        if from != to {
            out.entry((from, to)).or_insert_with(|| at.clone());
        }
    }
    out
}

/// Each cycle with where its edges are, one line an edge.
fn report(found: &[Vec<String>], edges: &Edges) -> String {
    let lines: Vec<String> = found
        .iter()
        .map(|c| {
            let steps: Vec<String> = c
                .windows(2)
                .map(|w| format!("  {} -> {} ({})", w[0], w[1], edges[&(w[0].clone(), w[1].clone())]))
                .collect();
            format!("{}:\n{}", c.join(" -> "), steps.join("\n"))
        })
        .collect();
    lines.join("\n")
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = graph_of(&src).unwrap();
    // The graph is read, not empty: the command line calls the gateway, the gateway writes capture files, and the
    // load generator builds the simulated terminal's requests.
    for (from, to) in [
        ("cli", "gateway"),
        ("gateway", "traffic::capture"),
        ("traffic::load", "traffic::sim"),
    ] {
        assert!(
            edges.contains_key(&(from.to_string(), to.to_string())),
            "{from} -> {to}: {edges:?}"
        );
    }
    // Between the traffic tools (and any module with them).
    let found = cycles(&edges);
    assert!(found.is_empty(), "import cycles:\n{}", report(&found, &edges));
    // Between top-level modules: the traffic tools as one, which the gateway uses (capture files) and which
    // uses no part of the gateway or the PIN server.
    let top = top_level(&edges);
    let found = cycles(&top);
    assert!(
        found.is_empty(),
        "import cycles between top-level modules:\n{}",
        report(&found, &top)
    );
}

/// The edges of some one-line files, each `(node, text)`, between `nodes`.
fn read_all(nodes: &[&str], files: &[(&str, &str)]) -> Edges {
    let nodes: BTreeSet<String> = nodes.iter().map(|n| n.to_string()).collect();
    let mut edges = Edges::new();
    for (node, text) in files {
        edges_of(node, &format!("{node}.rs"), text, &nodes, &mut edges).unwrap();
    }
    edges
}

#[test]
fn paths_use_trees_and_cycles_are_read_as_written() {
    let p = |s: &str| paths(s);
    let v =
        |x: &[&[&str]]| -> Vec<Vec<String>> { x.iter().map(|p| p.iter().map(|s| s.to_string()).collect()).collect() };
    assert_eq!(p("store::crypto::PinCipher;"), v(&[&["store", "crypto"]]));
    assert_eq!(p("tls::client_config(&a)"), v(&[&["tls", "client_config"]]));
    assert_eq!(p("sale;"), v(&[&["sale"]]));
    assert_eq!(
        p("{admin::{key_spec, KeyArgs}, traffic::{sim, load::run}, iso8583};"),
        v(&[
            &["admin", "key_spec"],
            &["admin", "KeyArgs"],
            &["traffic", "sim"],
            &["traffic", "load"],
            &["iso8583"]
        ])
    );
    let names = |c: &[&str]| -> Vec<String> { c.iter().map(|n| n.to_string()).collect() };
    let nodes = ["a", "b", "c", "traffic", "traffic::x", "traffic::y"];
    let mut edges = read_all(
        &nodes,
        &[
            ("a", "use crate::b::Thing;"),
            ("b", "let x = crate::c::f(); // not crate::a"),
            ("b", "/// Called by [`crate::a`]."),
            ("b", "let s = \"//\"; let q = '\"'; crate::a::f()"),
            ("traffic::x", "use super::y::Z; $crate::a::m!()"),
            ("traffic::x", "use super::*; super::Record::new()"),
            ("traffic::y", "fn f() { my_crate::c::g() }"),
        ],
    );
    let keys: Vec<(&str, &str)> = edges.keys().map(|(f, t)| (f.as_str(), t.as_str())).collect();
    assert_eq!(
        keys,
        [
            ("a", "b"),
            ("b", "a"),
            ("b", "c"),
            ("traffic::x", "a"),
            ("traffic::x", "traffic::y")
        ]
    );
    assert_eq!(cycles(&edges), vec![names(&["a", "b", "a"])]);
    edges.remove(&("b".to_string(), "a".to_string()));
    assert!(cycles(&edges).is_empty());
    // c -> traffic::x closes a -> b -> c -> traffic::x -> a.
    edges.extend(read_all(&nodes, &[("c", "use crate::traffic::x;")]));
    assert_eq!(cycles(&edges), vec![names(&["a", "b", "c", "traffic::x", "a"])]);
    let known: BTreeSet<String> = nodes.map(String::from).into();
    assert!(edges_of("a", "a.rs", "crate::nowhere::f()", &known, &mut edges).is_err());
    // The gateway writing capture files and a tool using the gateway: no cycle between tools, one between the
    // top-level modules.
    let edges = read_all(
        &["gateway", "traffic", "traffic::capture", "traffic::dialsim"],
        &[
            ("gateway", "use crate::traffic::capture::Capture;"),
            ("traffic::dialsim", "use crate::gateway::serial::f;"),
        ],
    );
    assert!(cycles(&edges).is_empty());
    assert_eq!(
        cycles(&top_level(&edges)),
        vec![names(&["gateway", "traffic", "gateway"])]
    );
    assert_eq!(node_of(Path::new("traffic/sim.rs")).as_deref(), Some("traffic::sim"));
    assert_eq!(node_of(Path::new("traffic/mod.rs")).as_deref(), Some("traffic"));
    assert_eq!(node_of(Path::new("gateway/serial.rs")).as_deref(), Some("gateway"));
    assert_eq!(node_of(Path::new("lib.rs")), None);
}
