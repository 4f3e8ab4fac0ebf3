//! The fuzz targets' committed inputs, replayed on stable: every file of `fuzz/corpus/<target>/`
//! (the minimised corpora) and of `fuzz/artifacts/<target>/` (every crash the fuzzer found, kept
//! after its fix) goes through the same entry point as the target (`canaryd::fuzzing`), which
//! panics when a reader panics or breaks its contract. The fuzzing itself needs nightly and
//! cargo-fuzz (`fuzz/README.md`); this keeps what it found from coming back.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use canaryd::fuzzing::TARGETS;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files directly in `dir`, sorted; none when it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

#[test]
fn every_fuzz_target_is_replayed_here_and_has_a_corpus() {
    let mut on_disk: Vec<String> = files(&fuzz_dir().join("fuzz_targets"))
        .iter()
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    on_disk.sort();
    let mut here: Vec<String> = TARGETS.iter().map(|(name, _)| name.to_string()).collect();
    here.sort();
    assert_eq!(
        on_disk, here,
        "fuzz/fuzz_targets/ and canaryd::fuzzing::TARGETS differ"
    );
    for (name, _) in TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(name));
        assert!(!corpus.is_empty(), "fuzz/corpus/{name}/ is empty or missing");
    }
}

#[test]
fn every_committed_fuzz_input_replays_without_a_crash() {
    let mut replayed = 0;
    let mut failures = Vec::new();
    for (name, target) in TARGETS {
        for folder in ["corpus", "artifacts"] {
            for file in files(&fuzz_dir().join(folder).join(name)) {
                let data = std::fs::read(&file).expect("read a fuzz input");
                replayed += 1;
                if let Err(panic) = catch_unwind(AssertUnwindSafe(|| target(&data))) {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failures.push(format!("{}: {message}", file.display()));
                }
            }
        }
    }
    assert!(replayed > 0, "no fuzz input found under {}", fuzz_dir().display());
    assert!(
        failures.is_empty(),
        "{} of {replayed} fuzz inputs crashed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
