//! The object-map interpreter: `objectmap::parse` on the `Tririga Object
//! Map` worksheet, then `objectmap::extract` over the other worksheets.
//!
//! Input: text. A line `=== <name>` starts a worksheet (the first one, before
//! any such line, is the object map); each other line is a row, its cells
//! separated by tabs. A cell `#n:<f64>` is a number, `#b:<0|1>` a boolean,
//! `#d:<text>` a date, an empty cell is absent, anything else is text.
#![no_main]

use form_processor::objectmap::{self, Book, Sheet, MAP_SHEET};
use form_processor::value::Value;
use libfuzzer_sys::fuzz_target;

fn cell(text: &str) -> Option<Value> {
    if text.is_empty() {
        return None;
    }
    Some(if let Some(n) = text.strip_prefix("#n:") {
        Value::Number(n.parse().unwrap_or(f64::NAN))
    } else if let Some(b) = text.strip_prefix("#b:") {
        Value::Bool(b == "1")
    } else if let Some(d) = text.strip_prefix("#d:") {
        Value::Date(d.to_string())
    } else {
        Value::Text(text.to_string())
    })
}

fn book(text: &str) -> Book {
    let mut book = Book::new();
    let mut name = MAP_SHEET.to_string();
    let mut sheet = Sheet::default();
    let mut row = 0u32;
    for line in text.split('\n') {
        if let Some(next) = line.strip_prefix("=== ") {
            book.insert(std::mem::replace(&mut name, next.to_string()), sheet);
            sheet = Sheet::default();
            row = 0;
            continue;
        }
        for (col, c) in line.split('\t').enumerate() {
            if let Some(v) = cell(c) {
                sheet.cells.insert((row, col as u32), v);
            }
        }
        row += 1;
    }
    book.insert(name, sheet);
    book
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let book = book(text);
    for word in text.split(['\t', '\n']) {
        let _ = objectmap::parse_column(word);
        let _ = objectmap::parse_cell_ref(word);
    }
    let Ok(map) = objectmap::parse(&book[MAP_SHEET]) else {
        return;
    };
    let _ = map.sheets();
    if let Ok(form) = objectmap::extract(&map, &book) {
        for (_, v) in &form.fields {
            let _ = (v.to_json(), v.canonical());
        }
    }
});
