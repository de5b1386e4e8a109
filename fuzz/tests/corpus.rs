//! Replays every committed fuzz corpus file (`fuzz/corpus/<target>/`) through its target, so what
//! the fuzzers found stays fixed. `deploy/scripts/fuzz.sh` runs the fuzzers themselves.

use std::path::PathBuf;

#[test]
fn every_corpus_file_decodes_without_a_panic() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut replayed = 0;
    for (name, target) in lode_fuzz::TARGETS {
        let dir = root.join(name);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e} (every target keeps a corpus)", dir.display()));
        let mut files = 0;
        for entry in entries.flatten() {
            let bytes = std::fs::read(entry.path()).expect("read corpus file");
            target(&bytes);
            files += 1;
        }
        assert!(files > 0, "{name}: empty corpus");
        replayed += files;
    }
    eprintln!("replayed {replayed} corpus files");
}
