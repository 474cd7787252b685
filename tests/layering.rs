//! The crate's layers point one way. Every `crate::` path in `src/` (and every `super::` path
//! that climbs to the crate root, the same thing spelled otherwise) is checked against the
//! table in `src/lib.rs` ("Layers"): a module may use its own layer and the ones below it,
//! never one above, and never an item through the crate root (`crate::CpuMask`): name the
//! module it lives in. Imports that still point up would be listed in `KNOWN_UPWARD` below,
//! each with its reason; the list is empty and may only shrink (a listed import that
//! disappears fails the test too, so the list stays true).
//!
//! The bottom layer is held to its first line as well (`src/cpu/mod.rs`: it "knows nothing of
//! IPIs, stops, hotplug or kexec"): no identifier in its code is made of those words, so an
//! upper layer's protocol state (a doorbell flag, a lock, a spin constant) cannot settle there
//! again unnoticed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The layers, bottom first. Keep in step with the table in `src/lib.rs`.
const LAYERS: &[&[&str]] = &[
    &["sync"],
    &["cpu", "inject"],
    &["ipi"],
    &["stop"],
    &["hotplug"],
    &["runtime"],
    &["kexec"],
];

/// Upward imports that remain, as (file, module it reaches up to), each with its reason. Empty:
/// every layer reaches up only through a hook the layer above registers at build. An entry
/// is a debt; the list may only shrink.
const KNOWN_UPWARD: &[(&str, &str)] = &[];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The top-level module a file under `src/` belongs to (`src/ipi/call.rs` -> `ipi`).
fn module_of(rel: &Path) -> Option<String> {
    let mut parts = rel.components().skip(1); // "src"
    let first = parts.next()?.as_os_str().to_str()?.to_string();
    Some(first.trim_end_matches(".rs").to_string())
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// What names the crate root in a file at `rel`: `crate::`, or the `super::` chain that climbs
/// there from the file's own module (`src/ipi/call.rs`: `super::super::`; `src/ipi/mod.rs`:
/// `super::`).
fn root_prefixes(rel: &Path) -> Vec<String> {
    let depth = rel.components().count().saturating_sub(1); // "src/ipi/call.rs" -> 2
    let is_mod = rel.file_name().is_some_and(|f| f == "mod.rs");
    let ups = if is_mod { depth - 1 } else { depth };
    let mut v = vec!["crate::".to_string()];
    if ups > 0 {
        v.push("super::".repeat(ups));
    }
    v
}

/// The code of one line: string literals emptied and the comment cut off.
fn code_of(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    let mut in_str = false;
    while let Some(c) = chars.next() {
        if in_str {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    in_str = false;
                    out.push(c);
                }
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_str = true;
                out.push(c);
            }
            '/' if chars.peek() == Some(&'/') => break,
            _ => out.push(c),
        }
    }
    out
}

/// The lines of a file's code up to its test module (a model test may drive a layer above).
fn code_lines(src: &str) -> impl Iterator<Item = (usize, String)> + '_ {
    src.lines()
        .take_while(|l| !l.starts_with("#[cfg(test)]") && !l.starts_with("#[cfg(all(test"))
        .enumerate()
        .map(|(n, l)| (n + 1, code_of(l)))
}

/// Every `crate::name` in the code (comments and doc comments skipped: intra-doc links may
/// point anywhere), up to the file's test module (a model test may drive a layer above).
fn crate_paths(src: &str) -> Vec<(usize, String)> {
    paths_after(src, "crate::")
}

/// Every `<prefix>name` in the code, as `crate_paths`.
fn paths_after(src: &str, prefix: &str) -> Vec<(usize, String)> {
    let mut out = vec![];
    for (n, code) in code_lines(src) {
        let mut rest = code.as_str();
        while let Some(i) = rest.find(prefix) {
            let before = rest[..i].chars().last();
            rest = &rest[i + prefix.len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
                continue; // `usmp_crate::`, `$crate::`
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '{')
                .collect();
            if name == "super" {
                continue; // a longer `super::` chain than the prefix: not the crate root
            }
            out.push((n, name));
        }
    }
    out
}

/// The violations in the crate as it stands: (file, line, what).
fn violations(root: &Path) -> (Vec<String>, BTreeSet<(String, String)>) {
    let mut files = vec![];
    rust_files(&root.join("src"), &mut files);
    let mut bad = vec![];
    let mut upward = BTreeSet::new();
    for f in files {
        let rel = f.strip_prefix(root).unwrap().to_path_buf();
        let rel_s = rel.to_string_lossy().replace('\\', "/");
        let Some(me) = module_of(&rel) else { continue };
        if me == "lib" {
            continue; // the crate map names everything
        }
        let Some(my_layer) = layer_of(&me) else {
            bad.push(format!("{rel_s}: module `{me}` is not in the layer table"));
            continue;
        };
        let text = std::fs::read_to_string(&f).unwrap();
        let paths = root_prefixes(&rel)
            .iter()
            .flat_map(|p| paths_after(&text, p))
            .collect::<Vec<_>>();
        for (line, name) in paths {
            if name.starts_with('{') || name.chars().next().is_some_and(char::is_uppercase) {
                bad.push(format!(
                    "{rel_s}:{line}: `crate::{name}` imports through the crate root; name the module"
                ));
                continue;
            }
            if name.is_empty() || name == me {
                continue;
            }
            match layer_of(&name) {
                None if name.chars().all(|c| c.is_lowercase() || c == '_') => {
                    // A function or macro re-exported at the root (e.g. `crate::this_cpu`).
                    bad.push(format!(
                        "{rel_s}:{line}: `crate::{name}` is not a module of the layer table"
                    ));
                }
                None => {}
                Some(l) if l > my_layer => {
                    upward.insert((rel_s.clone(), name.clone()));
                }
                Some(_) => {}
            }
        }
    }
    (bad, upward)
}

#[test]
fn layers_point_one_way() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (mut bad, upward) = violations(root);
    let known: BTreeSet<(String, String)> = KNOWN_UPWARD
        .iter()
        .map(|(f, m)| (f.to_string(), m.to_string()))
        .collect();
    for (f, m) in upward.difference(&known) {
        bad.push(format!(
            "{f}: imports `{m}`, a layer above its own (see the Layers table in src/lib.rs)"
        ));
    }
    for (f, m) in known.difference(&upward) {
        bad.push(format!(
            "{f} no longer imports `{m}`: remove it from KNOWN_UPWARD in tests/layering.rs"
        ));
    }
    assert!(bad.is_empty(), "layering violations:\n{}", bad.join("\n"));
}

/// The checker itself: a planted upward import and a root import are reported.
#[test]
fn the_checker_catches_an_upward_and_a_root_import() {
    let paths = crate_paths("use crate::runtime::rt::Shared; // crate::kexec in a comment\nlet m = crate::CpuMask::new();\nlet x = $crate::ipi;");
    assert_eq!(
        paths,
        vec![(1, "runtime".to_string()), (2, "CpuMask".to_string())]
    );
    assert!(layer_of("runtime").unwrap() > layer_of("ipi").unwrap());
    assert_eq!(
        module_of(Path::new("src/ipi/call.rs")).as_deref(),
        Some("ipi")
    );
}

/// The words the bottom layer's first line says it knows nothing of.
const UPPER_WORDS: &[&str] = &["ipi", "ipis", "stop", "stops", "hotplug", "kexec"];

/// Files of the bottom layer whose code may still spell an upper layer's name, each with its
/// reason. The list may only shrink.
const CPU_WORDS_ALLOWED: &[(&str, &str)] = &[(
    "src/cpu/events.rs",
    "`EventKind` is the public vocabulary of the event rings, which every layer records into",
)];

/// The words of an identifier, lower-cased: `kick_for_ipi` -> kick, for, ipi; `IpiSend` ->
/// ipi, send.
fn words(ident: &str) -> Vec<String> {
    let mut out = vec![];
    for part in ident.split('_') {
        let mut cur = String::new();
        let mut prev_lower = false;
        for c in part.chars() {
            if c.is_uppercase() && prev_lower {
                out.push(std::mem::take(&mut cur));
            }
            prev_lower = c.is_lowercase() || c.is_ascii_digit();
            cur.extend(c.to_lowercase());
        }
        if !cur.is_empty() {
            out.push(cur);
        }
    }
    out
}

/// Identifiers of the bottom layer's code made of an upper layer's name: (file, line, ident).
fn cpu_layer_upper_words(root: &Path) -> Vec<(String, usize, String)> {
    let mut files = vec![];
    rust_files(&root.join("src/cpu"), &mut files);
    files.sort();
    let mut out = vec![];
    for f in files {
        let rel = f
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let text = std::fs::read_to_string(&f).unwrap();
        for (line, code) in code_lines(&text) {
            let idents = code
                .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                .filter(|w| !w.is_empty());
            for ident in idents {
                if words(ident)
                    .iter()
                    .any(|w| UPPER_WORDS.contains(&w.as_str()))
                {
                    out.push((rel.clone(), line, ident.to_string()));
                }
            }
        }
    }
    out
}

#[test]
fn the_bottom_layer_names_no_layer_above() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let first = std::fs::read_to_string(root.join("src/cpu/mod.rs")).unwrap();
    assert!(
        first
            .lines()
            .next()
            .is_some_and(|l| l.contains("know nothing of IPIs, stops, hotplug or kexec")),
        "src/cpu/mod.rs's first line changed: keep UPPER_WORDS in step with it"
    );
    let found = cpu_layer_upper_words(root);
    let mut bad: Vec<String> = found
        .iter()
        .filter(|(f, _, _)| !CPU_WORDS_ALLOWED.iter().any(|(a, _)| a == f))
        .map(|(f, l, i)| format!("{f}:{l}: `{i}` names a layer above `cpu`"))
        .collect();
    for (f, _) in CPU_WORDS_ALLOWED {
        if !found.iter().any(|(g, _, _)| g == f) {
            bad.push(format!(
                "{f} no longer names a layer above: remove it from CPU_WORDS_ALLOWED"
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "the cpu layer names upper layers:\n{}",
        bad.join("\n")
    );
}

/// The checkers' helpers: a `super::` chain to the crate root, strings and comments, words.
#[test]
fn the_helpers_find_root_paths_and_words() {
    assert_eq!(
        root_prefixes(Path::new("src/cpu/idle.rs")),
        vec!["crate::".to_string(), "super::super::".to_string()]
    );
    assert_eq!(
        root_prefixes(Path::new("src/cpu/mod.rs")),
        vec!["crate::".to_string(), "super::".to_string()]
    );
    assert_eq!(
        paths_after(
            "use super::super::ipi::call; use super::super::super::x;",
            "super::super::"
        ),
        vec![(1, "ipi".to_string())]
    );
    assert_eq!(code_of(r#"let s = "// ipi"; // stop"#), r#"let s = ""; "#);
    assert_eq!(words("kick_for_ipi"), ["kick", "for", "ipi"]);
    assert_eq!(words("IpiSend"), ["ipi", "send"]);
    assert_eq!(words("is_stopped"), ["is", "stopped"]);
}
