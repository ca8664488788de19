//! The locked dependency tree builds on the Rust that Cargo.toml's `rust-version` promises: no
//! locked package asks for a newer one, as crates.io's index (cargo's local copy of it)
//! records. ordered-float 5.5, which wgpu-hal accepts, asks for 1.90 while we said 1.88, so
//! `cargo install --locked` failed there; Cargo.lock holds 5.4. No adapter needed.

use std::path::{Path, PathBuf};

/// "1.88" or "1.85.0" as (major, minor, patch).
fn parse_version(text: &str) -> (u32, u32, u32) {
    let mut parts = text.trim().split('.').map(|part| {
        part.parse::<u32>()
            .unwrap_or_else(|_| panic!("rust-version {text:?} is not numbers and dots"))
    });
    let major = parts.next().unwrap_or(0);
    (major, parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

fn quoted_value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let rest = line
        .trim()
        .strip_prefix(key)?
        .trim_start()
        .strip_prefix('=')?;
    Some(rest.trim().trim_matches('"'))
}

/// The registry packages of Cargo.lock, as (name, version).
fn locked_registry_packages(lock: &str) -> Vec<(String, String)> {
    let mut packages = Vec::new();
    for block in lock.split("[[package]]").skip(1) {
        let field = |key: &str| block.lines().find_map(|line| quoted_value(line, key));
        let (Some(name), Some(version), Some(source)) =
            (field("name"), field("version"), field("source"))
        else {
            continue;
        };
        if source.starts_with("registry+") || source.starts_with("sparse+") {
            packages.push((name.to_string(), version.to_string()));
        }
    }
    packages
}

/// Where cargo's sparse-index cache keeps a crate's entry (its layout by name length).
fn index_cache_file(index_root: &Path, name: &str) -> PathBuf {
    let lower = name.to_lowercase();
    let relative = match lower.len() {
        1 => format!("1/{lower}"),
        2 => format!("2/{lower}"),
        3 => format!("3/{}/{lower}", &lower[..1]),
        _ => format!("{}/{}/{lower}", &lower[..2], &lower[2..4]),
    };
    index_root.join(".cache").join(relative)
}

/// The rust_version the index records for one version of a crate (None: the crate sets none).
fn indexed_rust_version(cache: &[u8], version: &str) -> Option<Option<String>> {
    cache.split(|&byte| byte == 0).find_map(|record| {
        let entry: serde_json::Value = serde_json::from_slice(record).ok()?;
        (entry["vers"].as_str()? == version)
            .then(|| entry["rust_version"].as_str().map(str::to_string))
    })
}

#[test]
fn no_locked_dependency_needs_a_newer_rust_than_ours() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("reading Cargo.toml");
    let ours = manifest
        .lines()
        .find_map(|line| quoted_value(line, "rust-version"))
        .expect("Cargo.toml sets rust-version");
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).expect("reading Cargo.lock");
    let packages = locked_registry_packages(&lock);
    assert!(
        packages.len() > 50,
        "Cargo.lock lists {} registry packages",
        packages.len()
    );

    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .expect("CARGO_HOME or HOME is set");
    let index_roots: Vec<PathBuf> = std::fs::read_dir(cargo_home.join("registry/index"))
        .expect("cargo's registry index cache (cargo fetched the dependencies to build this)")
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .collect();

    let mut too_new = Vec::new();
    for (name, version) in &packages {
        let recorded = index_roots.iter().find_map(|index_root| {
            let cache = std::fs::read(index_cache_file(index_root, name)).ok()?;
            indexed_rust_version(&cache, version)
        });
        let Some(recorded) = recorded else {
            panic!("cargo's index cache under {cargo_home:?} has no entry for {name} {version}");
        };
        if let Some(needed) = recorded
            && parse_version(&needed) > parse_version(ours)
        {
            too_new.push(format!("{name} {version} needs Rust {needed}"));
        }
    }
    assert!(
        too_new.is_empty(),
        "Cargo.toml says rust-version {ours}, but {too_new:?}"
    );
}
