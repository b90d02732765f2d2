//! The shape of `src/`, checked on every test run: no import cycle between files or between
//! top-level modules, no file over 800 lines of code, no function over 100 lines of code but
//! the declarative tables listed here, and no per-kind `match` in notify.
//!
//! The files are read at test time and scanned with a small lexer (pure std): comments and
//! string literals are dropped, `#[cfg(test)] mod …` blocks (and files) are left out. The
//! import graph has an edge from a file to the file of every path it names through `use`
//! (grouped `use crate::{a, b::c}` included), `crate::…`, `super::…` or `self::…`; a path
//! resolves to the longest prefix of it that is a module file (`foo.rs` or `foo/mod.rs`). A
//! parent's `mod child;` and its bare `child::f()` paths are the module tree, not imports (a
//! `use child::…` is one). `src/main.rs` is the binary's own crate root: nothing imports it,
//! so it cannot be on a cycle, and it is only measured.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

/// Lines of code a file under `src/` may hold (blank lines, comments and in-file tests not
/// counted).
const MAX_FILE_LINES: usize = 800;

/// Lines of code a function may span, from `fn` to its closing brace.
const MAX_FN_LINES: usize = 100;

/// Functions allowed over [`MAX_FN_LINES`]: declarative tables only, as (file, function,
/// reason).
const LONG_FN_ALLOWED: &[(&str, &str, &str)] = &[(
    "src/metrics.rs",
    "Metrics::new",
    "the metric registration table: one declaration per metric, no logic to split",
)];

#[test]
fn no_import_cycle_between_files_or_top_level_modules() {
    let crate_ = Crate::parse(&read_src());
    assert!(!crate_.edges.is_empty(), "the scan found no import at all");
    let report = crate_.cycle_report();
    assert!(report.is_empty(), "\n{report}");
}

#[test]
fn no_file_over_800_lines_of_code() {
    let crate_ = Crate::parse(&read_src());
    let mut report = String::new();
    for file in &crate_.files {
        let lines = file.lines_of_code();
        if lines > MAX_FILE_LINES {
            let _ = writeln!(report, "  {}: {lines}", file.path);
        }
    }
    assert!(
        report.is_empty(),
        "\nfiles under src/ over {MAX_FILE_LINES} lines of code (blank lines, comments and \
         in-file tests not counted):\n{report}"
    );
}

#[test]
fn no_function_over_100_lines_of_code_but_declarative_tables() {
    let crate_ = Crate::parse(&read_src());
    let functions: Vec<Function> = crate_.files.iter().flat_map(File::functions).collect();
    assert!(!functions.is_empty(), "the scan found no function at all");
    let mut report = String::new();
    for f in &functions {
        let allowed = LONG_FN_ALLOWED
            .iter()
            .any(|(path, name, _)| *path == f.path && *name == f.name);
        if f.lines > MAX_FN_LINES && !allowed {
            let _ = writeln!(report, "  {}:{} {}: {}", f.path, f.line, f.name, f.lines);
        }
    }
    // An entry must name a function that exists, so a rename cannot leave a stale exemption.
    for (path, name, _) in LONG_FN_ALLOWED {
        if !functions.iter().any(|f| f.path == *path && f.name == *name) {
            let _ = writeln!(report, "  {path} {name}: allowed, but no such function");
        }
    }
    assert!(
        report.is_empty(),
        "\nfunctions over {MAX_FN_LINES} lines of code (only the declarative tables in \
         LONG_FN_ALLOWED may be):\n{report}"
    );
}

#[test]
fn notify_has_no_per_kind_match() {
    let crate_ = Crate::parse(&read_src());
    let mut report = String::new();
    let in_notify = |f: &&File| {
        f.module
            .as_ref()
            .and_then(|m| m.first())
            .is_some_and(|m| m == "notify")
    };
    for file in crate_.files.iter().filter(in_notify) {
        for line in file.kind_paths() {
            let _ = writeln!(report, "  {}:{line}", file.path);
        }
    }
    assert!(
        report.is_empty(),
        "\n`TargetKind::` or `Kind::` in src/notify (each target kind's behaviour belongs to \
         platform::Kind):\n{report}"
    );
}

/// Every `.rs` file under `src/`, as (path relative to the crate root, text), sorted.
fn read_src() -> Vec<(String, String)> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
        for entry in std::fs::read_dir(dir).expect("read src/") {
            let path = entry.expect("read src/").path();
            if path.is_dir() {
                walk(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(root).unwrap().to_string_lossy();
                let text = std::fs::read_to_string(&path).expect("read a source file");
                out.push((rel.replace('\\', "/"), text));
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    walk(&root.join("src"), root, &mut files);
    files.sort();
    assert!(files.len() > 1, "no sources found under {}", root.display());
    files
}

/// A token: an identifier or keyword, `::`, `->`, `=>`, a string literal (`""`) or any other
/// single character.
#[derive(Debug)]
struct Token {
    text: String,
    /// 0-based.
    line: usize,
}

impl Token {
    fn is(&self, s: &str) -> bool {
        self.text == s
    }

    fn is_ident(&self) -> bool {
        self.text
            .chars()
            .next()
            .is_some_and(|c| c.is_alphabetic() || c == '_')
    }
}

/// A source file, lexed.
struct File {
    path: String,
    /// Its module path in the library (`[]` for `lib.rs`); `None` for the binary's `main.rs`.
    module: Option<Vec<String>>,
    tokens: Vec<Token>,
    /// Per line, whether it holds code (a token or a string literal's text).
    code: Vec<bool>,
    /// Token index ranges (inclusive) of `#[cfg(test)] mod … { … }` blocks.
    tests: Vec<(usize, usize)>,
    /// Child modules declared `#[cfg(test)] mod name;`, whose files are tests.
    test_children: Vec<String>,
}

impl File {
    fn new(path: &str, text: &str) -> File {
        let (tokens, code) = lex(text);
        let (tests, test_children) = test_modules(&tokens);
        File {
            path: path.to_string(),
            module: module_of(path),
            tokens,
            code,
            tests,
            test_children,
        }
    }

    /// Whether the file is test-only as a whole (`#![cfg(test)]`).
    fn is_test_only(&self) -> bool {
        let t: Vec<&str> = self
            .tokens
            .iter()
            .take(8)
            .map(|t| t.text.as_str())
            .collect();
        t == ["#", "!", "[", "cfg", "(", "test", ")", "]"]
    }

    /// The test block the token at `i` starts, if any.
    fn test_block_at(&self, i: usize) -> Option<usize> {
        self.tests.iter().find(|(s, _)| *s == i).map(|(_, e)| *e)
    }

    fn lines_of_code(&self) -> usize {
        self.count_code(0, self.code.len().saturating_sub(1))
    }

    /// Lines of code in `first..=last`, leaving out those of test blocks.
    fn count_code(&self, first: usize, last: usize) -> usize {
        let tested: Vec<(usize, usize)> = self
            .tests
            .iter()
            .map(|(s, e)| (self.tokens[*s].line, self.tokens[*e].line))
            .collect();
        (first..=last)
            .filter(|l| self.code.get(*l).copied().unwrap_or(false))
            .filter(|l| !tested.iter().any(|(s, e)| s <= l && l <= e))
            .count()
    }

    /// Every path the file names through `use`, `crate::`, `super::` or `self::`, with the
    /// module it is named from (inline modules included), outside test blocks.
    fn references(&self) -> Vec<Reference> {
        let Some(file_module) = &self.module else {
            return Vec::new();
        };
        let t = &self.tokens;
        let mut out = Vec::new();
        let mut inline: Vec<(String, usize)> = Vec::new();
        let mut depth = 0usize;
        let mut i = 0;
        while i < t.len() {
            if let Some(end) = self.test_block_at(i) {
                i = end + 1;
                continue;
            }
            let module = || {
                let mut m = file_module.clone();
                m.extend(inline.iter().map(|(name, _)| name.clone()));
                m
            };
            match t[i].text.as_str() {
                "{" => depth += 1,
                "}" => {
                    depth = depth.saturating_sub(1);
                    if inline.last().is_some_and(|(_, d)| *d == depth) {
                        inline.pop();
                    }
                }
                "mod"
                    if t.get(i + 1).is_some_and(Token::is_ident)
                        && t.get(i + 2).is_some_and(|t| t.is("{")) =>
                {
                    inline.push((t[i + 1].text.clone(), depth));
                    i += 2;
                    continue;
                }
                "use" => {
                    let end = (i..t.len()).find(|&j| t[j].is(";")).unwrap_or(t.len());
                    let module = module();
                    for path in use_leaves(&t[i + 1..end]) {
                        out.push(Reference {
                            line: t[i].line + 1,
                            module: module.clone(),
                            path,
                            is_use: true,
                        });
                    }
                    i = end + 1;
                    continue;
                }
                "crate" | "super" | "self"
                    if t.get(i + 1).is_some_and(|t| t.is("::"))
                        && !(i > 0 && (t[i - 1].is("::") || t[i - 1].is("in"))) =>
                {
                    let mut path = vec![t[i].text.clone()];
                    let mut j = i + 1;
                    while j + 1 < t.len() && t[j].is("::") && t[j + 1].is_ident() {
                        path.push(t[j + 1].text.clone());
                        j += 2;
                    }
                    out.push(Reference {
                        line: t[i].line + 1,
                        module: module(),
                        path,
                        is_use: false,
                    });
                    i = j;
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
        out
    }

    /// Every function with a body outside test blocks, named `Type::name` inside an `impl`
    /// or `trait`.
    fn functions(&self) -> Vec<Function> {
        let t = &self.tokens;
        let mut out = Vec::new();
        let mut owners: Vec<(String, usize)> = Vec::new();
        let mut i = 0;
        while i < t.len() {
            if let Some(end) = self.test_block_at(i) {
                i = end + 1;
                continue;
            }
            while owners.last().is_some_and(|(_, end)| *end < i) {
                owners.pop();
            }
            let at_item = i == 0
                || ["}", ";", "]", "{", "unsafe", "default", "pub", ")"]
                    .iter()
                    .any(|s| t[i - 1].is(s));
            if (t[i].is("impl") || t[i].is("trait")) && at_item {
                if let Some(open) = (i..t.len()).find(|&j| t[j].is("{") || t[j].is(";")) {
                    if t[open].is("{") {
                        owners.push((owner_name(&t[i..open]), matching(t, open)));
                    }
                }
            }
            if t[i].is("fn") && t.get(i + 1).is_some_and(Token::is_ident) {
                if let Some(open) = body_start(t, i + 2) {
                    let close = matching(t, open);
                    let name = match owners.last() {
                        Some((owner, _)) => format!("{owner}::{}", t[i + 1].text),
                        None => t[i + 1].text.clone(),
                    };
                    out.push(Function {
                        path: self.path.clone(),
                        name,
                        line: t[i].line + 1,
                        lines: self.count_code(t[i].line, t[close].line),
                    });
                }
            }
            i += 1;
        }
        out
    }

    /// Lines (1-based) naming `TargetKind::` or `Kind::` as a path (not `ErrorKind::` and
    /// the like, which are other crates' error kinds).
    fn kind_paths(&self) -> Vec<usize> {
        let t = &self.tokens;
        (0..t.len().saturating_sub(1))
            .filter(|&i| (t[i].is("TargetKind") || t[i].is("Kind")) && t[i + 1].is("::"))
            .map(|i| t[i].line + 1)
            .collect()
    }
}

/// A path a file names, not yet resolved.
struct Reference {
    /// 1-based.
    line: usize,
    /// The module it is named from.
    module: Vec<String>,
    path: Vec<String>,
    /// From a `use`, where a path may also start at a child module (`use reply::ApiError`).
    is_use: bool,
}

struct Function {
    path: String,
    name: String,
    /// 1-based, of `fn`.
    line: usize,
    lines: usize,
}

/// The library's files and the import graph between them.
struct Crate {
    files: Vec<File>,
    /// (from, to) → where `from` first names `to`: `line path`.
    edges: BTreeMap<(String, String), String>,
}

impl Crate {
    fn parse(sources: &[(String, String)]) -> Crate {
        let all: Vec<File> = sources
            .iter()
            .map(|(path, text)| File::new(path, text))
            .collect();
        // Test files: `#![cfg(test)]`, or declared `#[cfg(test)] mod name;`.
        let tests: Vec<Vec<String>> = all
            .iter()
            .flat_map(|f| {
                let parent = f.module.clone().unwrap_or_default();
                f.test_children.iter().map(move |c| {
                    let mut m = parent.clone();
                    m.push(c.clone());
                    m
                })
            })
            .collect();
        let files: Vec<File> = all
            .into_iter()
            .filter(|f| !f.is_test_only())
            .filter(|f| {
                let m = f.module.as_ref();
                !tests.iter().any(|t| m.is_some_and(|m| m.starts_with(t)))
            })
            .collect();
        let by_module: BTreeMap<Vec<String>, &str> = files
            .iter()
            .filter_map(|f| Some((f.module.clone()?, f.path.as_str())))
            .collect();
        let references: Vec<(&File, Vec<Reference>)> =
            files.iter().map(|f| (f, f.references())).collect();
        let mut edges = BTreeMap::new();
        for (file, refs) in &references {
            for r in refs {
                let Some(target) = resolve(r, &by_module) else {
                    continue;
                };
                if target != file.path {
                    edges
                        .entry((file.path.clone(), target.to_string()))
                        .or_insert_with(|| {
                            format!("{}:{} {}", file.path, r.line, r.path.join("::"))
                        });
                }
            }
        }
        Crate { files, edges }
    }

    /// The top-level module of a file (`None` for the crate roots).
    fn top_level(&self, path: &str) -> Option<String> {
        let file = self.files.iter().find(|f| f.path == path)?;
        file.module.as_ref()?.first().cloned()
    }

    /// Every cycle of the file graph and of the top-level module graph, with where each hop
    /// is first named; empty when there is none.
    fn cycle_report(&self) -> String {
        let mut files: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut tops: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut top_evidence: BTreeMap<(String, String), String> = BTreeMap::new();
        for ((from, to), at) in &self.edges {
            files.entry(from.clone()).or_default().insert(to.clone());
            if let (Some(a), Some(b)) = (self.top_level(from), self.top_level(to)) {
                if a != b {
                    tops.entry(a.clone()).or_default().insert(b.clone());
                    top_evidence.entry((a, b)).or_insert_with(|| at.clone());
                }
            }
        }
        let mut report = String::new();
        let sections = [
            ("files of src/", cycles(&files), &self.edges),
            ("top-level modules of src/", cycles(&tops), &top_evidence),
        ];
        for (what, cycles, evidence) in sections {
            if cycles.is_empty() {
                continue;
            }
            let _ = writeln!(report, "import cycles between {what}:");
            for cycle in cycles {
                let _ = writeln!(report, "  {} → {}", cycle.join(" → "), cycle[0]);
                for (k, from) in cycle.iter().enumerate() {
                    let to = &cycle[(k + 1) % cycle.len()];
                    let _ = writeln!(report, "      {}", evidence[&(from.clone(), to.clone())]);
                }
            }
        }
        report
    }
}

/// The module path of a file under `src/`: `src/lib.rs` is `[]`, `src/a/mod.rs` is `[a]`,
/// `src/a/b.rs` is `[a, b]`; `src/main.rs` (the binary's root) is `None`.
fn module_of(path: &str) -> Option<Vec<String>> {
    let rel = path.strip_prefix("src/")?.strip_suffix(".rs")?;
    if rel == "main" {
        return None;
    }
    let mut parts: Vec<String> = rel.split('/').map(str::to_string).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    Some(parts)
}

/// The file a reference lands in: its path made absolute, then the longest prefix of it
/// that is a module file. Paths into other crates give `None`.
fn resolve<'a>(r: &Reference, files: &BTreeMap<Vec<String>, &'a str>) -> Option<&'a str> {
    let first = r.path.first()?.as_str();
    let absolute: Vec<String> = match first {
        "crate" => r.path[1..].to_vec(),
        "self" => r.module.iter().chain(&r.path[1..]).cloned().collect(),
        "super" => {
            let mut base = r.module.clone();
            let mut rest = r.path.as_slice();
            while rest.first().is_some_and(|s| s == "super") {
                base.pop()?;
                rest = &rest[1..];
            }
            base.into_iter().chain(rest.iter().cloned()).collect()
        }
        // A `use` may start at a child module of the current one (`use reply::ApiError`);
        // any other first segment is another crate.
        _ if r.is_use => {
            let mut child = r.module.clone();
            child.push(first.to_string());
            if !files.contains_key(&child) {
                return None;
            }
            r.module.iter().chain(&r.path).cloned().collect()
        }
        _ => return None,
    };
    (0..=absolute.len())
        .rev()
        .find_map(|n| files.get(&absolute[..n]).copied())
}

/// The leaf paths of a use tree (the tokens between `use` and `;`): `crate::{a, b::{self,
/// c}}` gives `crate::a`, `crate::b`, `crate::b::c`. A leading `::` (an external crate) gives
/// nothing.
fn use_leaves(t: &[Token]) -> Vec<Vec<String>> {
    fn tree(t: &[Token], i: &mut usize, mut path: Vec<String>, out: &mut Vec<Vec<String>>) {
        loop {
            match t.get(*i) {
                Some(tok) if tok.is("{") => {
                    *i += 1;
                    while t.get(*i).is_some_and(|t| !t.is("}")) {
                        tree(t, i, path.clone(), out);
                        if t.get(*i).is_some_and(|t| t.is(",")) {
                            *i += 1;
                        }
                    }
                    *i += 1;
                    return;
                }
                Some(tok) if tok.is("*") => {
                    *i += 1;
                    out.push(path);
                    return;
                }
                // `b::{self, …}`: the module `b` itself.
                Some(tok) if tok.is("self") && !path.is_empty() => *i += 1,
                Some(tok) if tok.is_ident() => {
                    path.push(tok.text.clone());
                    *i += 1;
                }
                _ => {
                    out.push(path);
                    return;
                }
            }
            match t.get(*i) {
                Some(tok) if tok.is("::") => *i += 1,
                Some(tok) if tok.is("as") => {
                    *i += 2;
                    out.push(path);
                    return;
                }
                _ => {
                    out.push(path);
                    return;
                }
            }
        }
    }
    let mut out = Vec::new();
    if !t.first().is_some_and(|t| t.is("::")) {
        tree(t, &mut 0, Vec::new(), &mut out);
    }
    out.retain(|p| !p.is_empty());
    out
}

/// The name of the type an `impl` block is for (or of the trait a `trait` block declares),
/// from the tokens between `impl`/`trait` and `{`.
fn owner_name(t: &[Token]) -> String {
    if t[0].is("trait") {
        return t.get(1).map(|t| t.text.clone()).unwrap_or_default();
    }
    let mut rest = &t[1..];
    if let Some(k) = rest.iter().rposition(|t| t.is("for")) {
        rest = &rest[k + 1..];
    } else if rest.first().is_some_and(|t| t.is("<")) {
        let mut depth = 0;
        let end = rest
            .iter()
            .position(|t| {
                depth += i32::from(t.is("<")) - i32::from(t.is(">"));
                depth == 0
            })
            .unwrap_or(0);
        rest = &rest[end + 1..];
    }
    rest.iter()
        .take_while(|t| !t.is("<") && !t.is("where") && !t.is("{"))
        .filter(|t| t.is_ident() && !["dyn", "mut", "crate", "super", "self"].contains(&&*t.text))
        .last()
        .map(|t| t.text.clone())
        .unwrap_or_default()
}

/// The `{` that opens the body of the function whose signature starts at `from`, or `None`
/// for a declaration without one.
fn body_start(t: &[Token], from: usize) -> Option<usize> {
    let mut depth = 0i32;
    for (j, tok) in t.iter().enumerate().skip(from) {
        match tok.text.as_str() {
            "(" | "[" => depth += 1,
            ")" | "]" => depth -= 1,
            "{" if depth == 0 => return Some(j),
            ";" if depth == 0 => return None,
            _ => {}
        }
    }
    None
}

/// The index of the `}` closing the `{` at `open` (the last token if it is unbalanced).
fn matching(t: &[Token], open: usize) -> usize {
    let mut depth = 0usize;
    for (j, tok) in t.iter().enumerate().skip(open) {
        if tok.is("{") {
            depth += 1;
        } else if tok.is("}") {
            depth -= 1;
            if depth == 0 {
                return j;
            }
        }
    }
    t.len() - 1
}

/// The `#[cfg(test)]` modules of a file: the token index ranges of those with a body, from
/// the attribute to the closing brace, and the names of those in their own file.
fn test_modules(t: &[Token]) -> (Vec<(usize, usize)>, Vec<String>) {
    let cfg_test = ["#", "[", "cfg", "(", "test", ")", "]"];
    let mut out = Vec::new();
    let mut children = Vec::new();
    let mut i = 0;
    while i + cfg_test.len() <= t.len() {
        if !cfg_test.iter().zip(&t[i..]).all(|(s, tok)| tok.is(s)) {
            i += 1;
            continue;
        }
        let mut j = i + cfg_test.len();
        // Other attributes, then a visibility.
        while t.get(j).is_some_and(|t| t.is("#")) {
            while t.get(j).is_some_and(|t| !t.is("]")) {
                j += 1;
            }
            j += 1;
        }
        if t.get(j).is_some_and(|t| t.is("pub")) {
            j += 1;
            if t.get(j).is_some_and(|t| t.is("(")) {
                while t.get(j).is_some_and(|t| !t.is(")")) {
                    j += 1;
                }
                j += 1;
            }
        }
        let is_mod =
            t.get(j).is_some_and(|t| t.is("mod")) && t.get(j + 1).is_some_and(Token::is_ident);
        match t.get(j + 2).map(|t| t.text.as_str()) {
            Some("{") if is_mod => {
                let end = matching(t, j + 2);
                out.push((i, end));
                i = end + 1;
            }
            Some(";") if is_mod => {
                children.push(t[j + 1].text.clone());
                i = j + 3;
            }
            _ => i = j,
        }
    }
    (out, children)
}

/// Splits Rust source into tokens, dropping comments and the text of string and character
/// literals; also says which lines hold code.
fn lex(src: &str) -> (Vec<Token>, Vec<bool>) {
    let c: Vec<char> = src.chars().collect();
    let mut code = vec![false; src.matches('\n').count() + 1];
    let mut tokens = Vec::new();
    let mut line = 0;
    let mut i = 0;
    let at = |k: usize| c.get(k).copied().unwrap_or('\0');
    let push = |tokens: &mut Vec<Token>, code: &mut Vec<bool>, text: &str, line: usize| {
        code[line] = true;
        tokens.push(Token {
            text: text.to_string(),
            line,
        });
    };
    while i < c.len() {
        let ch = c[i];
        if ch == '\n' {
            line += 1;
            i += 1;
        } else if ch.is_whitespace() {
            i += 1;
        } else if ch == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    line += usize::from(c[i] == '\n');
                    i += 1;
                }
            }
        } else if ch == '"' {
            push(&mut tokens, &mut code, "\"\"", line);
            i = string(&c, i + 1, None, &mut line, &mut code);
        } else if ch == '\'' {
            if at(i + 1) == '\\' {
                // An escaped character: '\n', '\'', '\u{4e00}'.
                i += 3;
                while i < c.len() && c[i] != '\'' {
                    i += 1;
                }
                push(&mut tokens, &mut code, "''", line);
                i += 1;
            } else if at(i + 2) == '\'' {
                push(&mut tokens, &mut code, "''", line);
                i += 3;
            } else {
                // A lifetime: its name lexes as an identifier.
                i += 1;
            }
        } else if ch.is_alphanumeric() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            let word: String = c[start..i].iter().collect();
            let hashes = c[i..].iter().take_while(|&&h| h == '#').count();
            if matches!(word.as_str(), "r" | "br" | "cr") && at(i + hashes) == '"' {
                push(&mut tokens, &mut code, "\"\"", line);
                i = string(&c, i + hashes + 1, Some(hashes), &mut line, &mut code);
            } else if matches!(word.as_str(), "b" | "c") && at(i) == '"' {
                push(&mut tokens, &mut code, "\"\"", line);
                i = string(&c, i + 1, None, &mut line, &mut code);
            } else if word == "r" && hashes == 1 && (at(i + 1).is_alphabetic() || at(i + 1) == '_')
            {
                // A raw identifier, r#type: lexed as the identifier.
                i += 1;
            } else {
                push(&mut tokens, &mut code, &word, line);
            }
        } else {
            let two: String = c[i..(i + 2).min(c.len())].iter().collect();
            if matches!(two.as_str(), "::" | "->" | "=>") {
                push(&mut tokens, &mut code, &two, line);
                i += 2;
            } else {
                push(&mut tokens, &mut code, &ch.to_string(), line);
                i += 1;
            }
        }
    }
    (tokens, code)
}

/// Skips a string literal's text from `i` (just after the opening quote) to just after its
/// end: escapes unless raw (`Some(number of #)`). Lines with text in it are code.
fn string(
    c: &[char],
    mut i: usize,
    raw: Option<usize>,
    line: &mut usize,
    code: &mut [bool],
) -> usize {
    while i < c.len() {
        match (c[i], raw) {
            ('\\', None) => {
                code[*line] = true;
                *line += usize::from(c.get(i + 1) == Some(&'\n'));
                i += 2;
                continue;
            }
            ('"', None) => return i + 1,
            ('"', Some(n)) if c[i + 1..].iter().take(n).filter(|&&h| h == '#').count() == n => {
                return i + 1 + n;
            }
            ('\n', _) => *line += 1,
            (ch, _) if !ch.is_whitespace() => code[*line] = true,
            _ => {}
        }
        i += 1;
    }
    i
}

/// Every elementary cycle of a directed graph, each starting at its smallest node.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    fn walk(
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        out: &mut Vec<Vec<String>>,
    ) {
        let (start, last) = (path[0].clone(), path[path.len() - 1].clone());
        for next in graph.get(&last).into_iter().flatten() {
            if *next == start {
                out.push(path.clone());
            } else if *next > start && !path.contains(next) && out.len() < 1000 {
                path.push(next.clone());
                walk(graph, path, out);
                path.pop();
            }
        }
    }
    let mut out = Vec::new();
    for start in graph.keys() {
        walk(graph, &mut vec![start.clone()], &mut out);
    }
    out
}

/// The checker itself, on tiny synthetic crates, so the checks above cannot pass vacuously.
mod checker {
    use super::*;

    fn parse(files: &[(&str, &str)]) -> Crate {
        let sources: Vec<(String, String)> = files
            .iter()
            .map(|(p, t)| (p.to_string(), t.to_string()))
            .collect();
        Crate::parse(&sources)
    }

    fn edges(c: &Crate) -> Vec<(&str, &str)> {
        c.edges
            .keys()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect()
    }

    #[test]
    fn a_cycle_between_two_files_is_found_and_printed() {
        let c = parse(&[
            ("src/lib.rs", "pub mod a;\npub mod b;\n"),
            ("src/a.rs", "use crate::b::Thing;\npub struct Other;\n"),
            (
                "src/b.rs",
                "pub struct Thing;\nfn f() { let _ = crate::a::Other; }\n",
            ),
        ]);
        let report = c.cycle_report();
        assert!(
            report.contains("import cycles between files of src/:"),
            "{report}"
        );
        assert!(
            report.contains("  src/a.rs → src/b.rs → src/a.rs"),
            "{report}"
        );
        assert!(report.contains("src/a.rs:1 crate::b::Thing"), "{report}");
        assert!(report.contains("src/b.rs:2 crate::a::Other"), "{report}");
        assert!(report.contains("  a → b → a"), "{report}");
    }

    #[test]
    fn a_longer_cycle_between_top_level_modules_is_found() {
        let c = parse(&[
            ("src/lib.rs", "pub mod a;\npub mod b;\npub mod c;\n"),
            ("src/a/mod.rs", "pub mod x;\n"),
            ("src/a/x.rs", "use crate::b::Y;\n"),
            ("src/b.rs", "use crate::c::Z;\n"),
            ("src/c.rs", "fn f() { crate::a::x::g() }\n"),
        ]);
        let report = c.cycle_report();
        assert!(report.contains("  a → b → c → a"), "{report}");
        assert!(
            report.contains("  src/a/x.rs → src/b.rs → src/c.rs → src/a/x.rs"),
            "{report}"
        );
    }

    #[test]
    fn a_parent_declaring_its_child_is_not_an_import() {
        let c = parse(&[
            ("src/lib.rs", "pub mod p;\n"),
            (
                "src/p/mod.rs",
                "pub mod child;\nmod other;\npub fn helper() { child::run() }\n",
            ),
            ("src/p/child.rs", "use super::helper;\npub fn run() {}\n"),
            ("src/p/other.rs", "pub fn f() { super::child::run() }\n"),
        ]);
        assert_eq!(
            edges(&c),
            [
                ("src/p/child.rs", "src/p/mod.rs"),
                ("src/p/other.rs", "src/p/child.rs")
            ]
        );
        assert_eq!(c.cycle_report(), "");
    }

    #[test]
    fn grouped_and_nested_uses_are_parsed() {
        let c = parse(&[
            (
                "src/lib.rs",
                "pub mod a;\npub mod b;\npub mod c;\npub mod d;\npub mod e;\n",
            ),
            (
                "src/a.rs",
                "use crate::{\n    b::{self, B},\n    c::*,\n    d::D as Dee,\n};\nuse std::fmt;\n",
            ),
            ("src/b.rs", ""),
            ("src/c.rs", ""),
            ("src/d.rs", ""),
            ("src/e.rs", "pub use super::{a::A, b};\n"),
        ]);
        assert_eq!(
            edges(&c),
            [
                ("src/a.rs", "src/b.rs"),
                ("src/a.rs", "src/c.rs"),
                ("src/a.rs", "src/d.rs"),
                ("src/e.rs", "src/a.rs"),
                ("src/e.rs", "src/b.rs"),
            ]
        );
        let leaves = use_leaves(&lex("crate::{b::{self, B}, c::*, d::D as Dee}").0);
        assert_eq!(
            leaves,
            [
                vec!["crate", "b"],
                vec!["crate", "b", "B"],
                vec!["crate", "c"],
                vec!["crate", "d", "D"],
            ]
        );
    }

    #[test]
    fn paths_resolve_to_the_longest_module_file_prefix() {
        let c = parse(&[
            ("src/lib.rs", "pub mod bus;\npub mod app;\n"),
            ("src/bus/mod.rs", "pub mod nats;\n"),
            ("src/bus/nats.rs", ""),
            (
                "src/app.rs",
                "fn f() {\n    crate::bus::nats::NatsBus::start();\n\
                 crate::bus::Bus::new();\n}\n",
            ),
        ]);
        assert_eq!(
            edges(&c),
            [
                ("src/app.rs", "src/bus/mod.rs"),
                ("src/app.rs", "src/bus/nats.rs")
            ]
        );
    }

    #[test]
    fn comments_strings_tests_and_inline_modules_add_no_edge() {
        let c = parse(&[
            ("src/lib.rs", "pub mod a;\npub mod b;\n"),
            (
                "src/a.rs",
                "// use crate::b::X;\n/* crate::b::Y /* nested */ crate::b::Z */\n\
                 /// [`crate::b`]\nconst S: &str = \"crate::b::W\";\n\
                 const R: &str = r#\"use crate::b;\"#;\n\
                 pub mod inner {\n    use super::S;\n}\n\
                 #[cfg(test)]\nmod tests {\n    use crate::b::T;\n}\n",
            ),
            ("src/b.rs", "use crate::a::S;\n"),
        ]);
        assert_eq!(edges(&c), [("src/b.rs", "src/a.rs")]);
    }

    #[test]
    fn lines_of_code_leave_out_blanks_comments_and_tests() {
        let file = File::new(
            "src/a.rs",
            "//! Doc.\n\nuse std::fmt;\n/// Doc.\nconst S: &str = \"\n  text\n\n\";\n\
             /*\nblock\n*/\n\
             #[cfg(test)]\nmod tests {\n    #[test]\n    fn t() {}\n}\n",
        );
        // `use`, `const S … "`, `  text`, `";`.
        assert_eq!(file.lines_of_code(), 4);
    }

    #[test]
    fn functions_are_measured_and_named_by_their_impl() {
        let body = "        x += 1;\n".repeat(3);
        let text = format!(
            "pub struct M;\nimpl M {{\n    pub fn new() -> Self {{\n{body}\n        // c\n\
             M\n    }}\n}}\n\
             impl<T: Fn() -> u8> std::fmt::Debug for Wrap<T> {{\n    fn fmt(&self) {{}}\n}}\n\
             trait Tr {{\n    fn decl(&self);\n    fn provided(&self) {{}}\n}}\n\
             fn free(f: impl Fn() -> [u8; 2]) -> impl Iterator<Item = u8> {{\n    f()\n}}\n"
        );
        let file = File::new("src/a.rs", &text);
        let found: Vec<(String, usize)> = file
            .functions()
            .into_iter()
            .map(|f| (f.name, f.lines))
            .collect();
        let expected = [
            ("M::new", 6),
            ("Wrap::fmt", 1),
            ("Tr::provided", 1),
            ("free", 3),
        ];
        assert_eq!(found, expected.map(|(n, l)| (n.to_string(), l)), "{text}");
    }

    #[test]
    fn kind_paths_are_found_but_not_other_crates_error_kinds() {
        let file = File::new(
            "src/notify/a.rs",
            "use crate::platform::Kind;\nfn f(k: Kind) {\n    match k { Kind::A => {} }\n}\n\
             // TargetKind::B\nfn g() { let _ = ErrorKind::X; let _ = TargetKind::C; }\n",
        );
        assert_eq!(file.kind_paths(), [3, 6]);
    }
}
