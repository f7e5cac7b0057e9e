//! Guards on the shape of `lb-userspace/src`, read as text (no root, no build of the sources):
//! the top-level rooms (modules of `lib.rs`) must import each other without a circle, and no
//! function outside the tests may grow past [`MAX_FN_LINES`] lines. Both keep the crate
//! readable for someone who opens it for the first time: a room can be understood from the
//! rooms below it, and a function fits on a screen or two.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

/// The longest a non-test function may be, from its `fn` line to its closing brace.
const MAX_FN_LINES: usize = 150;

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, sorted so that reports are stable.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            out.extend(rust_files(&p));
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
    out
}

/// The source with comments, string and char literals blanked out (newlines kept, so line
/// numbers still hold): what is left is code, and braces in it balance.
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            let end = rest
                .iter()
                .position(|&c| c == b'\n')
                .map_or(b.len(), |n| i + n);
            blank(&mut out, i, end);
            i = end;
        } else if rest.starts_with(b"/*") {
            let (mut depth, mut j) = (0usize, i);
            while j < b.len() {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if let Some(hashes) = raw_string_start(rest) {
            // r"..." / r#"..."# / br#"..."#
            let open = rest.iter().position(|&c| c == b'"').unwrap();
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            let body = i + open + 1;
            let end = b[body..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(b.len(), |n| body + n + close.len());
            blank(&mut out, i, end);
            i = end;
        } else if rest[0] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            blank(&mut out, i, (j + 1).min(b.len()));
            i = j + 1;
        } else if rest[0] == b'\'' {
            // A char literal ('x', '\n', '\u{..}', 'é'), or else a lifetime ('a), left as is.
            let end = if rest.get(1) == Some(&b'\\') {
                rest[2..]
                    .iter()
                    .position(|&c| c == b'\'')
                    .map(|n| i + 2 + n + 1)
            } else {
                let ch = std::str::from_utf8(&rest[1..rest.len().min(5)])
                    .ok()
                    .or_else(|| {
                        (2..5)
                            .rev()
                            .find_map(|k| std::str::from_utf8(rest.get(1..k)?).ok())
                    })
                    .and_then(|s| s.chars().next());
                ch.map(char::len_utf8)
                    .filter(|&n| rest.get(1 + n) == Some(&b'\''))
                    .map(|n| i + 1 + n + 1)
            };
            match end {
                Some(end) => {
                    blank(&mut out, i, end);
                    i = end;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    String::from_utf8(out).expect("blanking keeps UTF-8 (only ASCII bytes of literals change)")
}

/// `Some(number of #)` when `s` opens a raw string literal.
fn raw_string_start(s: &[u8]) -> Option<usize> {
    let s = s.strip_prefix(b"b").unwrap_or(s);
    let s = s.strip_prefix(b"r")?;
    let hashes = s.iter().take_while(|&&c| c == b'#').count();
    (s.get(hashes) == Some(&b'"')).then_some(hashes)
}

/// Byte ranges of `#[cfg(test)]` items (the test modules), to be left out of both checks.
fn test_ranges(code: &str) -> Vec<(usize, usize)> {
    let mut ranges = Vec::new();
    let mut from = 0;
    while let Some(n) = code[from..].find("#[cfg(test)]") {
        let at = from + n;
        // The item ends at its matching `}` or, for a `mod x;` or `use`, at its `;`.
        let open = code[at..].find(['{', ';']).map(|k| at + k);
        let end = match open {
            Some(o) if code.as_bytes()[o] == b'{' => matching_brace(code, o),
            Some(o) => o + 1,
            None => code.len(),
        };
        ranges.push((at, end));
        from = end;
    }
    ranges
}

/// Index just past the `}` that closes the `{` at `open`.
fn matching_brace(code: &str, open: usize) -> usize {
    let mut depth = 0usize;
    for (k, c) in code.bytes().enumerate().skip(open) {
        match c {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return k + 1;
                }
            }
            _ => {}
        }
    }
    code.len()
}

fn in_ranges(ranges: &[(usize, usize)], at: usize) -> bool {
    ranges.iter().any(|&(a, b)| (a..b).contains(&at))
}

fn line_of(code: &str, at: usize) -> usize {
    code[..at].bytes().filter(|&c| c == b'\n').count() + 1
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// The first path segments named after `prefix` at `at`: `crate::a::X` gives `a`,
/// `crate::{a::X, b}` gives `a` and `b`.
fn first_segments(code: &str, at: usize) -> Vec<String> {
    let b = code.as_bytes();
    let mut i = at;
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    if b.get(i) != Some(&b'{') {
        let end = (i..b.len()).find(|&k| !is_ident(b[k])).unwrap_or(b.len());
        return vec![code[i..end].to_string()];
    }
    // A group: the identifiers that start each item at depth 1.
    let (mut out, mut depth, mut expect) = (Vec::new(), 0usize, true);
    let mut k = i;
    while k < b.len() {
        match b[k] {
            b'{' => {
                depth += 1;
                if depth == 1 {
                    expect = true;
                }
            }
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            b',' if depth == 1 => expect = true,
            c if expect && depth == 1 && is_ident(c) => {
                let end = (k..b.len()).find(|&e| !is_ident(b[e])).unwrap_or(b.len());
                out.push(code[k..end].to_string());
                expect = false;
                k = end;
                continue;
            }
            c if !c.is_ascii_whitespace() && depth == 1 => expect = false,
            _ => {}
        }
        k += 1;
    }
    out
}

/// The crate's rooms (`mod` items of lib.rs) and the names lib.rs re-exports from them
/// (`pub use config::Config` makes `crate::Config` a reference to `config`).
fn rooms_and_aliases(lib: &str) -> (BTreeSet<String>, BTreeMap<String, String>) {
    let code = code_only(lib);
    let mut rooms = BTreeSet::new();
    let mut aliases = BTreeMap::new();
    for stmt in code.split(';') {
        let words: Vec<&str> = stmt.split_whitespace().collect();
        let stmt = words.join(" ");
        if let Some(name) = stmt.strip_prefix("pub mod ").or(stmt.strip_prefix("mod ")) {
            rooms.insert(name.trim().to_string());
        }
    }
    for stmt in code.split(';') {
        let stmt: String = stmt.split_whitespace().collect::<Vec<_>>().join(" ");
        let Some(path) = stmt.strip_prefix("pub use ") else {
            continue;
        };
        let room = path.split("::").next().unwrap_or("").trim().to_string();
        if !rooms.contains(&room) {
            continue;
        }
        let tail = &path[room.len()..];
        // The names a `pub use` makes visible at the root: the last segment of each item, or
        // its `as` name.
        for item in tail.split([',', '{', '}']) {
            let item = item.trim().trim_start_matches("::");
            let name = match item.split_once(" as ") {
                Some((_, alias)) => alias.trim(),
                None => item.rsplit("::").next().unwrap_or("").trim(),
            };
            if !name.is_empty() && name != "self" && name != "*" {
                aliases.insert(name.to_string(), room.clone());
            }
        }
    }
    (rooms, aliases)
}

/// The module path of a file under `src` (`agent/mod.rs` and `agent.rs` are both `agent`).
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// room -> rooms it refers to -> where (file:line), from every file but the binaries.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

fn room_graph() -> Graph {
    let src = src_dir();
    let (rooms, aliases) = rooms_and_aliases(&fs::read_to_string(src.join("lib.rs")).unwrap());
    assert!(
        rooms.len() > 3,
        "lib.rs declares too few modules to be read right: {rooms:?}"
    );
    let mut graph = Graph::new();
    for file in rust_files(&src) {
        let rel = file.strip_prefix(&src).unwrap().to_path_buf();
        if rel.starts_with("bin") || rel == Path::new("lib.rs") {
            continue; // the binaries are users of the library, not rooms in it
        }
        let module = module_path(&rel);
        let from = module[0].clone();
        let code = code_only(&fs::read_to_string(&file).unwrap());
        let tests = test_ranges(&code);
        let mut refs = Vec::new();
        for (at, _) in code.match_indices("crate::") {
            let before = code[..at].bytes().last();
            if before.is_some_and(|c| is_ident(c) || c == b':') {
                continue; // `$crate::` or `lb_crate::`
            }
            refs.extend(first_segments(&code, at + 7).into_iter().map(|s| (at, s)));
        }
        for (at, _) in code.match_indices("super::") {
            let before = code[..at].bytes().last();
            if before.is_some_and(|c| is_ident(c) || c == b':') {
                continue; // counted with the first `super::` of the chain
            }
            // `super::super::x` from `a/b/c.rs` climbs two modules.
            let mut ups = 1;
            let mut next = at + 7;
            while code[next..].starts_with("super::") {
                ups += 1;
                next += 7;
            }
            // Module of the file, then climb `ups` levels (a file `a/b.rs` is module a::b).
            let base = module.len().saturating_sub(ups);
            if base > 0 {
                continue; // still inside the room
            }
            refs.extend(first_segments(&code, next).into_iter().map(|s| (at, s)));
        }
        for (at, seg) in refs {
            if in_ranges(&tests, at) {
                continue;
            }
            let to = if rooms.contains(&seg) {
                Some(&seg)
            } else {
                aliases.get(&seg)
            };
            if let Some(to) = to.filter(|&to| *to != from) {
                let place = format!("{}:{}", rel.display(), line_of(&code, at));
                graph
                    .entry(from.clone())
                    .or_default()
                    .entry(to.clone())
                    .or_insert(place);
            }
        }
    }
    graph
}

/// A cycle of the graph as `[a, b, ..., a]`, if there is one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        g: &Graph,
        n: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(k) = path.iter().position(|p| p == n) {
            let mut cycle = path[k..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for next in g.get(n).into_iter().flat_map(|m| m.keys()) {
            if let Some(c) = visit(g, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(graph, n, &mut Vec::new(), &mut done))
}

#[test]
fn rooms_import_each_other_without_a_circle() {
    let graph = room_graph();
    for (from, tos) in &graph {
        eprintln!(
            "{from} -> {}",
            tos.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    if let Some(cycle) = find_cycle(&graph) {
        let steps: Vec<String> = cycle
            .windows(2)
            .map(|w| {
                format!(
                    "  {} -> {} (first at src/{})",
                    w[0], w[1], graph[&w[0]][&w[1]]
                )
            })
            .collect();
        panic!(
            "the rooms of lb-userspace/src import each other in a circle; move the shared type \
             down to the room both use, or let the owner pass the data:\n{}",
            steps.join("\n")
        );
    }
}

/// Every non-test function: (file:line, name, lines from `fn` to its closing brace).
fn functions() -> Vec<(String, String, usize)> {
    let src = src_dir();
    let mut out = Vec::new();
    for file in rust_files(&src) {
        let rel = file.strip_prefix(&src).unwrap().display().to_string();
        let code = code_only(&fs::read_to_string(&file).unwrap());
        let tests = test_ranges(&code);
        let b = code.as_bytes();
        for (at, _) in code.match_indices("fn ") {
            let word_start = at == 0 || !is_ident(b[at - 1]);
            if !word_start || in_ranges(&tests, at) {
                continue;
            }
            let name_end = (at + 3..b.len())
                .find(|&k| !is_ident(b[k]))
                .unwrap_or(b.len());
            let name = code[at + 3..name_end].to_string();
            if name.is_empty() {
                continue; // `fn(` as a type
            }
            // The body starts at the first `{` of the item; a `;` first means no body.
            let Some(k) = code[name_end..].find(['{', ';']).map(|k| name_end + k) else {
                continue;
            };
            if b[k] == b';' {
                continue;
            }
            let end = matching_brace(&code, k);
            let lines = line_of(&code, end) - line_of(&code, at) + 1;
            out.push((format!("src/{rel}:{}", line_of(&code, at)), name, lines));
        }
    }
    out
}

#[test]
fn no_function_is_longer_than_150_lines() {
    let mut all = functions();
    assert!(
        all.len() > 100,
        "too few functions found ({}), the reader is broken",
        all.len()
    );
    all.sort_by_key(|f| std::cmp::Reverse(f.2));
    for (place, name, lines) in all.iter().take(10) {
        eprintln!("{lines:>4} {name} ({place})");
    }
    let long: Vec<String> = all
        .iter()
        .filter(|f| f.2 > MAX_FN_LINES)
        .map(|(place, name, lines)| format!("  {place} `{name}`: {lines} lines"))
        .collect();
    assert!(
        long.is_empty(),
        "functions longer than {MAX_FN_LINES} lines; split them into named steps:\n{}",
        long.join("\n")
    );
}
