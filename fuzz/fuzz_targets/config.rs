//! Config loading: `config::load_text` (figment's TOML, the environment
//! overrides, then `config::parse` with its defaults and validation) for
//! each component, on the input as the config file's text.
#![no_main]

use common::config::{load_text, Component};
use libfuzzer_sys::fuzz_target;

const COMPONENTS: [Component; 5] = [
    Component::TokenBroker,
    Component::ImapFetcher,
    Component::PopFetcher,
    Component::FormProcessor,
    Component::Cli,
];

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    // A config names secret files, which parse reads: reading the file an
    // operator names is the feature, but a device file would block the
    // fuzzer or never end.
    if ["/dev", "/proc", "/sys"].iter().any(|d| text.contains(d)) {
        return;
    }
    let component = COMPONENTS[usize::from(first) % COMPONENTS.len()];
    if let Ok(config) = load_text(Some(text), "fuzz.toml", &[], component) {
        let _ = config.summary();
    }
});
