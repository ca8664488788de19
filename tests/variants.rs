//! The kernel variants that the next GPU run times (scripts/variants/*.patch, applied to this
//! tree by scripts/device_bundle.sh) must still apply to it: a patch that no longer does stops
//! the bundle, which a session with a lent GPU finds out too late (the twenty-sixth session's
//! change to the normalized terms broke `ldexp.patch` that way). No adapter needed.

use std::fs;
use std::path::Path;

/// One hunk's old side: the lines of `file` that it replaces, with their context.
struct Hunk {
    file: String,
    header: String,
    old: Vec<String>,
}

/// The hunks of a unified diff, as `git diff` writes them.
fn hunks(patch: &str) -> Vec<Hunk> {
    let mut out = Vec::new();
    let mut file = String::new();
    let mut lines = patch.lines();
    while let Some(line) = lines.next() {
        if let Some(path) = line.strip_prefix("+++ b/") {
            file = path.to_string();
            continue;
        }
        let Some(ranges) = line.strip_prefix("@@ -") else {
            continue;
        };
        // "@@ -a,b +c,d @@ context": b old lines and d new ones follow (a count of 1 may be
        // left out).
        let count = |range: &str| -> usize {
            range
                .split_once(',')
                .map_or(Ok(1), |(_, n)| n.parse())
                .unwrap_or_else(|e| panic!("bad hunk header {line:?}: {e}"))
        };
        let mut fields = ranges.split(' ');
        let (old_range, new_range) = (fields.next().unwrap_or(""), fields.next().unwrap_or(""));
        let (mut old_left, mut new_left) =
            (count(old_range), count(new_range.trim_start_matches('+')));
        let mut old = Vec::new();
        while old_left + new_left > 0 {
            let body = lines
                .next()
                .unwrap_or_else(|| panic!("hunk {line:?} of {file} ends early"));
            match body.chars().next() {
                Some(' ') | None => {
                    old.push(body.get(1..).unwrap_or("").to_string());
                    old_left -= 1;
                    new_left -= 1;
                }
                Some('-') => {
                    old.push(body[1..].to_string());
                    old_left -= 1;
                }
                Some('+') => new_left -= 1,
                Some('\\') => {} // "\ No newline at end of file"
                Some(other) => panic!("unexpected line {other:?} in hunk {line:?} of {file}"),
            }
        }
        out.push(Hunk {
            file: file.clone(),
            header: line.to_string(),
            old,
        });
    }
    out
}

#[test]
fn variant_patches_still_apply_to_this_tree() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("scripts/variants");
    let mut patches: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|ext| ext == "patch"))
        .collect();
    patches.sort();
    assert!(!patches.is_empty(), "no patches in {}", dir.display());
    for patch in &patches {
        let text = fs::read_to_string(patch).expect("a readable patch");
        let hunks = hunks(&text);
        assert!(!hunks.is_empty(), "{} has no hunks", patch.display());
        for hunk in hunks {
            let source = fs::read_to_string(root.join(&hunk.file))
                .unwrap_or_else(|e| panic!("{}: {}: {e}", patch.display(), hunk.file));
            let lines: Vec<&str> = source.lines().collect();
            // git apply finds a hunk anywhere in its file (an offset), but only whole.
            let applies = lines
                .windows(hunk.old.len())
                .any(|window| window.iter().zip(&hunk.old).all(|(a, b)| a == b));
            assert!(
                applies,
                "{}: the hunk {} no longer matches {} (rebase the variant on this tree: \
                 apply it with `git apply --3way`, fix the conflict, and write `git diff` over it)",
                patch.display(),
                hunk.header,
                hunk.file
            );
        }
    }
}
