//! The mail parser: `mime::parse_mail` (mail-parser within the depth and
//! part limits, the `.xlsx` attachments) and the dedupe key taken from the
//! raw header section (`envelope::dedupe_key`, `header_value`).
#![no_main]

use common::envelope;
use form_processor::mime::{self, MimeLimits};
use libfuzzer_sys::fuzz_target;

/// The defaults of `[form-processor]` (docs/configuration.md).
const LIMITS: MimeLimits = MimeLimits {
    max_depth: 20,
    max_parts: 500,
};

fuzz_target!(|data: &[u8]| {
    let _ = mime::parse_mail(data, &LIMITS);
    let _ = envelope::dedupe_key("user@example.com", data);
    let _ = envelope::header_value(data, "authentication-results");
});
