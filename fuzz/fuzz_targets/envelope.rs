//! The envelope decoder: AMQP basic properties as they arrive in a content
//! header frame (decoded by lapin's own parser), then
//! `Envelope::from_amqp` on them with the rest of the input as the body.
//! A decoded envelope must survive `properties()` → `from_amqp` unchanged.
#![no_main]

use common::envelope::Envelope;
use lapin::protocol::basic::parse_properties;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((body, props)) = parse_properties(data) else {
        return;
    };
    let Ok(envelope) = Envelope::from_amqp(&props, body.to_vec()) else {
        return;
    };
    let again = Envelope::from_amqp(&envelope.properties(), envelope.body.clone())
        .expect("an envelope's own properties decode");
    assert_eq!(again, envelope);
});
