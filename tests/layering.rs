//! The crate's layers point one way. Every `crate::` path in `src/` is checked against the table
//! in `src/lib.rs` ("Layers"): a module may use its own layer and the ones below it, never one
//! above, and never an item through the crate root (`crate::CpuMask`): name the module it
//! lives in. Imports that still point up would be listed in `KNOWN_UPWARD` below, each with
//! its reason; the list is empty and may only shrink (a listed import that disappears fails
//! the test too, so the list stays true).

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

/// Every `crate::name` in the code (comments and doc comments skipped: intra-doc links may
/// point anywhere), up to the file's test module (a model test may drive a layer above).
fn crate_paths(src: &str) -> Vec<(usize, String)> {
    let mut out = vec![];
    for (n, line) in src.lines().enumerate() {
        if line.starts_with("#[cfg(test)]") || line.starts_with("#[cfg(all(test") {
            break;
        }
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let before = rest[..i].chars().last();
            rest = &rest[i + "crate::".len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
                continue; // `usmp_crate::`, `$crate::`
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '{')
                .collect();
            out.push((n + 1, name));
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
        for (line, name) in crate_paths(&text) {
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
