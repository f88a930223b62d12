//! The workbook reader: `workbook::read_form` on an attachment's bytes (size
//! and zip-bomb checks, our xlsx reader, the object map), with the
//! form-processor's default limits.
//!
//! `read_form` turns a panic inside the reader into a rejection
//! (`catch_unwind`); libFuzzer's panic hook aborts before any unwinding, so
//! this target puts back a hook that only prints. A panic that escapes
//! `read_form` still ends the run as a crash (libfuzzer-sys aborts on it).
#![no_main]

use form_processor::workbook::{self, Limits};
use libfuzzer_sys::fuzz_target;

/// The defaults of `[form-processor]` (docs/configuration.md).
const LIMITS: Limits = Limits {
    max_workbook_bytes: 10 << 20,
    max_decompressed_bytes: 100 << 20,
    max_sheets: 64,
    max_rows: 200_000,
    max_cells: 2_000_000,
};

fuzz_target!(
    init: {
        std::panic::set_hook(Box::new(|info| eprintln!("panic: {info}")));
    },
    |data: &[u8]| {
    let _ = workbook::read_form(data, &LIMITS);
    }
);
