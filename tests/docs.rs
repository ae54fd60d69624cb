//! The docs a user reads hold together: every relative link in `README.md`,
//! `CHANGELOG.md` and `docs/*.md` names a file of the repository, nothing
//! points outside it (`../shared`), and the README stays a front door
//! (at most 200 lines).

use std::fs;
use std::path::{Path, PathBuf};

/// The longest the README may be, in lines.
const README_MAX_LINES: usize = 200;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Markdown files users read: README.md, CHANGELOG.md, docs/*.md.
fn docs() -> Vec<PathBuf> {
    let root = root();
    let mut files = vec![root.join("README.md"), root.join("CHANGELOG.md")];
    let mut in_docs: Vec<PathBuf> = fs::read_dir(root.join("docs"))
        .expect("a docs/ directory")
        .map(|e| e.expect("a docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    in_docs.sort();
    files.extend(in_docs);
    files
}

/// The text of `markdown` outside fenced code blocks, with inline code spans
/// blanked, so that neither yields links.
fn prose(markdown: &str) -> String {
    let mut out = String::new();
    let mut fence: Option<(char, usize)> = None;
    for line in markdown.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let marker = trimmed.chars().next().filter(|c| *c == '`' || *c == '~');
        let run = marker.map_or(0, |c| trimmed.chars().take_while(|x| *x == c).count());
        match fence {
            Some((c, n)) => {
                if marker == Some(c) && run >= n && trimmed[run..].trim().is_empty() {
                    fence = None;
                }
                out.push('\n');
                continue;
            }
            None if indent <= 3 && run >= 3 => {
                fence = marker.map(|c| (c, run));
                out.push('\n');
                continue;
            }
            None => {}
        }
        // Blank what lies between backticks (inline code).
        for (i, part) in line.split('`').enumerate() {
            if i % 2 == 0 {
                out.push_str(part);
            } else {
                out.push(' ');
            }
        }
        out.push('\n');
    }
    out
}

/// The targets of the inline links and images (`[text](target)`,
/// `![alt](target)`) of `markdown`, outside code, as written.
fn links(markdown: &str) -> Vec<String> {
    let text = prose(markdown);
    let mut found = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("](") {
        let after = &rest[at + 2..];
        let Some(end) = after.find(')') else { break };
        let raw = after[..end].trim();
        // `(target "title")` and `(<target>)`.
        let target = raw.split_whitespace().next().unwrap_or("");
        let target = target.trim_start_matches('<').trim_end_matches('>');
        found.push(target.to_string());
        rest = &after[end + 1..];
    }
    found
}

/// Whether `target` points into this repository (not a URL, not a
/// fragment of the same page).
fn is_local(target: &str) -> bool {
    !(target.is_empty()
        || target.starts_with('#')
        || target.starts_with("http://")
        || target.starts_with("https://")
        || target.starts_with("mailto:"))
}

fn name(file: &Path) -> String {
    file.strip_prefix(root())
        .unwrap_or(file)
        .display()
        .to_string()
}

#[test]
fn every_link_in_the_docs_resolves_inside_the_repository() {
    let root = root().canonicalize().expect("the repository's root");
    let mut checked = 0;
    for file in docs() {
        let text = fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("{} cannot be read: {e}", name(&file)));
        let dir = file.parent().expect("a file's directory");
        for link in links(&text) {
            if !is_local(&link) {
                continue;
            }
            let path = link.split('#').next().unwrap_or("");
            let target = dir.join(path);
            assert!(
                target.exists(),
                "{}: the link ({link}) names {}, which does not exist",
                name(&file),
                target.display()
            );
            let resolved = target.canonicalize().expect("an existing path");
            assert!(
                resolved.starts_with(&root),
                "{}: the link ({link}) leads outside the repository",
                name(&file)
            );
            checked += 1;
        }
    }
    assert!(
        checked > 0,
        "no relative links found: is the parser broken?"
    );
}

#[test]
fn no_doc_points_at_the_shared_directory() {
    for file in docs() {
        let text = fs::read_to_string(&file).expect("a doc");
        for (n, line) in text.lines().enumerate() {
            assert!(
                !line.contains("../shared"),
                "{}:{}: mentions ../shared, which users of the repository do not have",
                name(&file),
                n + 1
            );
        }
    }
}

#[test]
fn the_readme_is_a_front_door() {
    let file = root().join("README.md");
    let text = fs::read_to_string(&file).expect("README.md");
    let lines = text.lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md has {lines} lines; keep it to {README_MAX_LINES} and move the rest to docs/"
    );
    let found = links(&text);
    for doc in [
        "docs/api.md",
        "docs/operations.md",
        "docs/production.md",
        "docs/benchmarks.md",
        "CHANGELOG.md",
    ] {
        assert!(
            found.iter().any(|l| l.split('#').next() == Some(doc)),
            "README.md: no link to {doc} (its \"Where to read on\" lists the docs)"
        );
    }
    assert!(
        text.lines().any(|l| l.trim() == "scripts/test"),
        "README.md: the test command `scripts/test` is missing (CI runs what the README says)"
    );
}

#[test]
fn the_link_parser_skips_code_and_keeps_targets() {
    let md = "See [a](docs/a.md#part) and ![b](b.png \"B\").\n\
              `[not](code.md)` and [web](https://example.com) [here](#top)\n\
              [two\nlines](two.md)\n\
              ```sh\n[fenced](fenced.md)\n```\n\
              ~~~~\n```\n[tilde](tilde.md)\n~~~~\n\
              [after](<after.md>)\n";
    let found = links(md);
    assert_eq!(
        found,
        [
            "docs/a.md#part",
            "b.png",
            "https://example.com",
            "#top",
            "two.md",
            "after.md"
        ],
        "the links of the sample"
    );
    let local: Vec<_> = found.iter().filter(|l| is_local(l)).collect();
    assert_eq!(local, ["docs/a.md#part", "b.png", "two.md", "after.md"]);
}

/// The `METHOD /path` rows of `docs/api.md`'s tables.
fn documented_operations() -> std::collections::BTreeSet<String> {
    let api = fs::read_to_string(root().join("docs/api.md")).expect("docs/api.md");
    api.lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .filter(|op| op.contains(" /"))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_api_doc_lists_exactly_the_operations_of_openapi_json() {
    use utoipa::OpenApi;
    let doc = grabflow::contract::ApiDoc::openapi();
    let mut served = std::collections::BTreeSet::new();
    for (path, item) in &doc.paths.paths {
        let methods = [
            ("GET", item.get.is_some()),
            ("PUT", item.put.is_some()),
            ("POST", item.post.is_some()),
            ("DELETE", item.delete.is_some()),
            ("PATCH", item.patch.is_some()),
        ];
        for (method, present) in methods {
            if present {
                served.insert(format!("{method} {path}"));
            }
        }
    }
    // The document does not describe itself.
    served.insert("GET /openapi.json".into());
    let documented = documented_operations();
    let missing: Vec<_> = served.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&served).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/api.md and /openapi.json differ: served but not documented {missing:?}, documented but not served {stale:?}"
    );
}
