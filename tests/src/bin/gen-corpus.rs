//! Writes the malformed-mail corpus: the small entries as
//! `tests/corpus/<name>.eml` and every entry's expected outcome in
//! `tests/corpus/expected.tsv` (see `mailagent_tests::corpus`).
//!
//!     cargo run -p mailagent-tests --bin gen-corpus [DIR]

fn main() -> std::io::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(mailagent_tests::corpus::dir);
    let n = mailagent_tests::corpus::write(&dir)?;
    println!("{n} entries and expected.tsv written to {}", dir.display());
    Ok(())
}
