//! The docs stand alone and stay true to the code, without a cluster:
//!
//! - every relative link of `README.md` and `docs/**/*.md` (`[text](target)`, `![alt](target)`,
//!   `[label]: target`, `<img src>`, `<a href>`) names a file or folder of this repository, and
//!   an anchor into a Markdown file names one of its headings (GitHub's slugs); no link leaves
//!   the repository, and no doc points to the team's `../shared/` folder, which users do not
//!   have; `http(s)` links are allowed and not fetched;
//! - `docs/api.md`, the API reference, names every reason of `src/plan/reason.rs`, every
//!   condition type of `src/plan/`, and every phase, field, printer column and short name of
//!   the CRDs in `crds/`; `README.md` names the short names and the `vmkeep` category.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Component, Path, PathBuf},
};

use serde_json::Value;

/// Links to docs that other changes add: tolerated while the file does not exist yet, checked
/// like any other link (anchors included) once it does. Remove an entry once its file lands.
const PENDING_TARGETS: &[&str] = &[];

/// Fields whose inner fields are a Kubernetes core type, documented by Kubernetes.
const KUBERNETES_TYPES: &[&str] = &["tolerations"];

/// The plan files that define condition types (`pub const X: &str = "CamelCase";`).
const CONDITION_FILES: &[&str] =
    &["src/plan/conditions.rs", "src/plan/image.rs", "src/plan/template.rs", "src/plan/virtual_machine.rs"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// `README.md` and every `docs/**/*.md`, relative to the repository root.
fn doc_files() -> Vec<String> {
    fn walk(dir: &Path, rel: &str, out: &mut Vec<String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir).expect("read docs/").map(|e| e.expect("entry")).collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if path.is_dir() {
                walk(&path, &format!("{rel}/{name}"), out);
            } else if name.ends_with(".md") {
                out.push(format!("{rel}/{name}"));
            }
        }
    }
    let mut files = vec!["README.md".to_owned()];
    walk(&root().join("docs"), "docs", &mut files);
    files
}

/// The lines of a Markdown file outside fenced code blocks, with their numbers (from 1).
fn prose_lines(text: &str) -> Vec<(usize, &str)> {
    let mut fence: Option<(char, usize)> = None;
    let mut lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let marker = trimmed.chars().next().filter(|c| *c == '`' || *c == '~');
        let run = marker.map_or(0, |m| trimmed.chars().take_while(|c| *c == m).count());
        match (fence, marker) {
            (None, Some(m)) if run >= 3 && indent <= 3 => fence = Some((m, run)),
            (Some((m, n)), Some(c)) if c == m && run >= n && trimmed.trim_end().chars().all(|c| c == m) => fence = None,
            (None, _) => lines.push((i + 1, line)),
            _ => {}
        }
    }
    lines
}

/// `line` with its inline code spans blanked out (so code is never read as a link), and the
/// contents of those spans.
fn split_code(line: &str) -> (String, Vec<String>) {
    let chars: Vec<char> = line.chars().collect();
    let run_at = |i: usize| chars[i..].iter().take_while(|c| **c == '`').count();
    let (mut out, mut spans) = (String::new(), Vec::new());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '`' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let run = run_at(i);
        // The closing run of exactly as many backticks, if any.
        let mut j = i + run;
        let close = loop {
            if j >= chars.len() {
                break None;
            }
            if chars[j] == '`' {
                let n = run_at(j);
                if n == run {
                    break Some(j);
                }
                j += n;
            } else {
                j += 1;
            }
        };
        match close {
            Some(j) => {
                spans.push(chars[i + run..j].iter().collect::<String>().trim().to_owned());
                out.extend(std::iter::repeat_n(' ', j + run - i));
                i = j + run;
            }
            None => {
                out.extend(&chars[i..i + run]);
                i += run;
            }
        }
    }
    (out, spans)
}

fn without_code(line: &str) -> String {
    split_code(line).0
}

/// The contents of the inline code spans of a Markdown text (outside fenced blocks).
fn code_spans(text: &str) -> Vec<String> {
    prose_lines(text).into_iter().flat_map(|(_, line)| split_code(line).1).collect()
}

/// Every word (letters, digits, `_`) of the code spans of a text: what it names in code.
fn code_words(text: &str) -> BTreeSet<String> {
    code_spans(text)
        .iter()
        .flat_map(|s| s.split(|c: char| !(c.is_alphanumeric() || c == '_')).map(str::to_owned).collect::<Vec<_>>())
        .filter(|w| !w.is_empty())
        .collect()
}

/// The link destinations of a Markdown file, with their line numbers.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (number, line) in prose_lines(text) {
        let line = without_code(line);
        // Reference definitions: `[label]: target`.
        let trimmed = line.trim_start();
        if trimmed.starts_with('[')
            && !trimmed.starts_with("[^")
            && let Some(end) = trimmed.find("]:")
        {
            if let Some(target) = trimmed[end + 2..].split_whitespace().next() {
                found.push((number, target.trim_matches(|c| c == '<' || c == '>').to_owned()));
            }
            continue;
        }
        // Inline links and images: `[text](target "title")`.
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let target = if let Some(inner) = after.strip_prefix('<') {
                inner.split('>').next().unwrap_or_default().to_owned()
            } else {
                let mut depth = 0usize;
                let end = after
                    .char_indices()
                    .find(|(_, c)| match c {
                        '(' => {
                            depth += 1;
                            false
                        }
                        ')' if depth == 0 => true,
                        ')' => {
                            depth -= 1;
                            false
                        }
                        c => c.is_whitespace(),
                    })
                    .map_or(after.len(), |(i, _)| i);
                after[..end].to_owned()
            };
            found.push((number, target));
            rest = after;
        }
        // HTML: `<img src="...">`, `<a href="...">`.
        for attribute in ["src=", "href="] {
            let mut rest = line.as_str();
            while let Some(at) = rest.find(attribute) {
                let after = &rest[at + attribute.len()..];
                if let Some(quote) = after.chars().next().filter(|c| *c == '"' || *c == '\'')
                    && let Some(end) = after[1..].find(quote)
                {
                    found.push((number, after[1..1 + end].to_owned()));
                }
                rest = after;
            }
        }
    }
    found
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(high), Some(low)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((high * 16 + low) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// GitHub's anchors of a Markdown file's headings (`## Ignore or Fail` -> `ignore-or-fail`;
/// a repeated heading gets `-1`, `-2`, ...).
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut anchors = BTreeSet::new();
    for (_, line) in prose_lines(text) {
        let trimmed = line.trim_start();
        let level = trimmed.chars().take_while(|c| *c == '#').count();
        if line.len() - trimmed.len() > 3 || !(1..=6).contains(&level) {
            continue;
        }
        let rest = &trimmed[level..];
        if !(rest.is_empty() || rest.starts_with(' ') || rest.starts_with('\t')) {
            continue;
        }
        // The closing `#`s, then the text as rendered: links and images by their text.
        let mut heading = rest.trim().trim_end_matches('#').trim_end().to_owned();
        while let Some(open) = heading.find("](") {
            let close = heading[open..].find(')').map_or(heading.len(), |c| open + c + 1);
            heading.replace_range(open..close, "");
        }
        let slug: String = heading
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || *c == '_' || *c == '-' || *c == ' ')
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let count = seen.entry(slug.clone()).or_insert(0);
        anchors.insert(if *count == 0 { slug.clone() } else { format!("{slug}-{count}") });
        *count += 1;
    }
    anchors
}

/// Checks one link of the doc `from` (a path relative to the root); `Err` says what is wrong.
fn check_link(from: &str, target: &str) -> Result<(), String> {
    let target = target.trim();
    if target.is_empty() {
        return Err("an empty link".into());
    }
    let lower = target.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") || lower.starts_with("mailto:") {
        return Ok(());
    }
    if let Some(colon) = target.find(':')
        && target[..colon].chars().all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
        && !target[..colon].is_empty()
    {
        return Err(format!("{target}: only relative paths and http(s) links are allowed"));
    }
    let (path, anchor) = match target.split_once('#') {
        Some((path, anchor)) => (path, Some(anchor)),
        None => (target, None),
    };
    let path = percent_decode(path.split('?').next().unwrap_or_default());
    if path.starts_with('/') {
        return Err(format!("{target}: an absolute path; link relative to {from}"));
    }
    // Resolved lexically against the doc's folder: never above the repository root.
    let mut resolved: Vec<String> =
        Path::new(from).parent().into_iter().flat_map(|p| p.iter()).map(|c| c.to_string_lossy().into_owned()).collect();
    if !path.is_empty() {
        for component in Path::new(&path).components() {
            match component {
                Component::CurDir => {}
                Component::ParentDir => {
                    if resolved.pop().is_none() {
                        return Err(format!("{target}: leaves the repository"));
                    }
                }
                Component::Normal(part) => resolved.push(part.to_string_lossy().into_owned()),
                _ => return Err(format!("{target}: not a relative path")),
            }
        }
    } else {
        resolved = Path::new(from).iter().map(|c| c.to_string_lossy().into_owned()).collect();
    }
    let rel = resolved.join("/");
    let file = root().join(&rel);
    if !file.exists() {
        if PENDING_TARGETS.contains(&rel.as_str()) {
            return Ok(());
        }
        return Err(format!("{target}: {rel} does not exist"));
    }
    // Through symlinks too, the file is in the repository.
    let canonical_root = root().canonicalize().expect("root");
    let canonical = file.canonicalize().map_err(|e| format!("{target}: {e}"))?;
    if !canonical.starts_with(&canonical_root) {
        return Err(format!("{target}: resolves outside the repository"));
    }
    if let Some(anchor) = anchor.filter(|a| !a.is_empty())
        && rel.ends_with(".md")
    {
        let text = std::fs::read_to_string(&file).map_err(|e| format!("{target}: {e}"))?;
        let wanted = percent_decode(anchor).to_lowercase();
        if !anchors(&text).contains(&wanted) {
            return Err(format!("{target}: {rel} has no heading with anchor #{wanted}"));
        }
    }
    Ok(())
}

#[test]
fn every_relative_link_resolves_inside_the_repository() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for doc in doc_files() {
        let text = read(&doc);
        for (line, target) in links(&text) {
            checked += 1;
            if let Err(why) = check_link(&doc, &target) {
                problems.push(format!("{doc}:{line}: {why}"));
            }
        }
    }
    assert!(checked > 20, "the link parser found only {checked} links");
    assert!(problems.is_empty(), "broken links:\n{}", problems.join("\n"));
}

#[test]
fn no_doc_depends_on_the_shared_folder() {
    let mut problems = Vec::new();
    for doc in doc_files() {
        for (number, line) in read(&doc).lines().enumerate() {
            for word in ["../shared", "DESIGN.md"] {
                if line.contains(word) {
                    problems.push(format!(
                        "{doc}:{}: mentions {word}, which users of the repository do not have",
                        number + 1
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The values of the `pub const X: &str = "Value";` lines of a source file.
fn str_consts(source: &str) -> Vec<(String, String)> {
    source
        .lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("pub const ")?;
            let (name, rest) = rest.split_once(':')?;
            let (ty, value) = rest.split_once('=')?;
            if !ty.contains("str") {
                return None;
            }
            let value = value.trim().strip_suffix(';')?.trim().strip_prefix('"')?.strip_suffix('"')?;
            Some((name.trim().to_owned(), value.to_owned()))
        })
        .collect()
}

fn missing(words: &BTreeSet<String>, wanted: impl IntoIterator<Item = String>) -> Vec<String> {
    wanted.into_iter().filter(|w| !words.contains(w)).collect::<BTreeSet<_>>().into_iter().collect()
}

#[test]
fn the_api_reference_names_every_reason_and_condition_type() {
    let words = code_words(&read("docs/api.md"));
    let reasons: Vec<String> = str_consts(&read("src/plan/reason.rs")).into_iter().map(|(_, v)| v).collect();
    assert!(reasons.len() > 30 && reasons.contains(&"ImageInUse".to_owned()), "parsed reasons: {reasons:?}");
    let absent = missing(&words, reasons);
    assert!(absent.is_empty(), "docs/api.md does not name these reasons of src/plan/reason.rs in code: {absent:?}");

    let types: Vec<String> = CONDITION_FILES
        .iter()
        .flat_map(|f| str_consts(&read(f)))
        .map(|(_, v)| v)
        .filter(|v| v.starts_with(|c: char| c.is_ascii_uppercase()) && v.chars().all(|c| c.is_ascii_alphanumeric()))
        .collect();
    for known in ["Ready", "ImagesClaimed", "DisksReady", "InUse", "PersistenceChangePending"] {
        assert!(types.iter().any(|t| t == known), "condition type {known} not found in {CONDITION_FILES:?}");
    }
    let absent = missing(&words, types);
    assert!(absent.is_empty(), "docs/api.md does not name these condition types in code: {absent:?}");
}

/// The CRDs of `crds/`, parsed.
fn crds() -> Vec<Value> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("crds"))
        .expect("crds/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let crds: Vec<Value> = files
        .iter()
        .map(|p| serde_yaml::from_str(&std::fs::read_to_string(p).expect("read CRD")).expect("parse CRD"))
        .collect();
    assert_eq!(crds.len(), 3, "Image, Template, VirtualMachine");
    crds
}

fn kind(crd: &Value) -> String {
    crd["spec"]["names"]["kind"].as_str().expect("kind").to_owned()
}

/// Every field name under a schema's properties (and list items), by its dotted path.
fn fields(schema: &Value, path: &str, out: &mut Vec<(String, String)>) {
    let Some(properties) = schema["properties"].as_object() else {
        if schema["items"].is_object() {
            fields(&schema["items"], path, out);
        }
        return;
    };
    for (name, inner) in properties {
        let path = format!("{path}.{name}");
        out.push((name.clone(), path.clone()));
        if !KUBERNETES_TYPES.contains(&name.as_str()) {
            fields(inner, &path, out);
        }
    }
}

#[test]
fn the_api_reference_names_every_phase_field_column_and_short_name() {
    let api = read("docs/api.md");
    let words = code_words(&api);
    let mut problems = Vec::new();
    let mut phases = 0;
    for crd in crds() {
        let kind = kind(&crd);
        for version in crd["spec"]["versions"].as_array().expect("versions") {
            let schema = &version["schema"]["openAPIV3Schema"];
            for phase in schema["properties"]["status"]["properties"]["phase"]["enum"].as_array().into_iter().flatten()
            {
                let phase = phase.as_str().expect("phase").to_owned();
                phases += 1;
                if !words.contains(&phase) {
                    problems.push(format!("{kind} phase {phase}"));
                }
            }
            let mut all = Vec::new();
            for part in ["spec", "status"] {
                fields(&schema["properties"][part], &format!("{kind}.{part}"), &mut all);
            }
            for (name, path) in all {
                if !words.contains(&name) {
                    problems.push(format!("field {path}"));
                }
            }
            for column in version["additionalPrinterColumns"].as_array().into_iter().flatten() {
                let column = column["name"].as_str().expect("column").to_uppercase();
                if !words.contains(&column) {
                    problems.push(format!("{kind} printer column {column}"));
                }
            }
        }
        for short in crd["spec"]["names"]["shortNames"].as_array().into_iter().flatten() {
            let short = short.as_str().expect("short name").to_owned();
            if !words.contains(&short) {
                problems.push(format!("{kind} short name {short}"));
            }
        }
    }
    assert!(phases >= 17, "parsed only {phases} phases from crds/");
    assert!(problems.is_empty(), "docs/api.md does not name, in code:\n{}", problems.join("\n"));
}

#[test]
fn the_readme_names_the_short_names_and_the_category() {
    let readme = read("README.md");
    let words = code_words(&readme);
    let mut problems = Vec::new();
    for crd in crds() {
        for short in crd["spec"]["names"]["shortNames"].as_array().into_iter().flatten() {
            let short = short.as_str().expect("short name");
            if !words.contains(short) {
                problems.push(format!("short name {short} of {}", kind(&crd)));
            }
        }
        for category in crd["spec"]["names"]["categories"].as_array().into_iter().flatten() {
            let command = format!("kubectl get {}", category.as_str().expect("category"));
            if !code_spans(&readme).iter().any(|s| s.starts_with(&command)) && !readme.contains(&command) {
                problems.push(format!("`{command}`"));
            }
        }
    }
    assert!(readme.contains("docs/api.md"), "README.md links docs/api.md");
    assert!(problems.is_empty(), "README.md does not name: {problems:?}");
}

mod parser {
    use super::*;

    #[test]
    fn links_outside_code_are_found() {
        let text = "See [a](docs/a.md#x) and ![i](b.svg \"t\") and `[no](c.md)`.\n\
                    ```\n[no](d.md)\n```\n[ref]: e.md\n<img src=\"f.png\"> [p](g_(1).md)\n";
        let found: Vec<String> = links(text).into_iter().map(|(_, t)| t).collect();
        assert_eq!(found, ["docs/a.md#x", "b.svg", "e.md", "g_(1).md", "f.png"]);
    }

    #[test]
    fn anchors_follow_github() {
        let text = "# Ignore or Fail\n## `status.disks[]` and [links](x.md)\n## Ignore or Fail\n```\n# not\n```\n";
        let found: Vec<String> = anchors(text).into_iter().collect();
        assert_eq!(found, ["ignore-or-fail", "ignore-or-fail-1", "statusdisks-and-links"]);
    }

    #[test]
    fn links_that_leave_or_break_are_refused() {
        assert!(check_link("docs/behaviour.md", "../shared/DESIGN.md").is_err());
        assert!(check_link("docs/behaviour.md", "../../etc/passwd").is_err());
        assert!(check_link("README.md", "../main/README.md").is_err());
        assert!(check_link("README.md", "docs/no-such-file.md").is_err());
        assert!(check_link("README.md", "docs/webhook.md#no-such-heading").is_err());
        assert!(check_link("README.md", "/docs/webhook.md").is_err());
        assert!(check_link("README.md", "file:///etc/passwd").is_err());
        assert!(check_link("README.md", "docs/webhook.md#ignore-or-fail").is_ok());
        assert!(check_link("docs/install.md", "../crds/").is_ok());
        assert!(check_link("README.md", "https://example.org/x").is_ok());
    }
}
