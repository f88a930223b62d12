//! Our xlsx reader (`form_processor::xlsx`, issue 15) against calamine 0.26,
//! which read forms before it: the same workbook must give the same form,
//! or be refused for the same reason. Compared on generated workbooks (two
//! writers: rust_xlsxwriter and the corpus's own SpreadsheetML), on every
//! workbook in the malformed-mail corpus, and on thousands of deterministic
//! mutations of their XML parts. Where calamine panics (it indexes past its
//! shared-string table, and overflows in debug builds), there is nothing to
//! match: ours must then give an answer without panicking.
//!
//! No servers: `cargo nextest run -p mailagent-tests --test xlsx_reader`.

use std::io::{Cursor, Read, Write};

use calamine::{DataRef, Reader, Xlsx};
use form_processor::mime::{parse_mail, MimeLimits};
use form_processor::objectmap::{self, Book, Form, Sheet, MAP_SHEET};
use form_processor::reject::Reason;
use form_processor::value::Value;
use form_processor::workbook::{read_form, Limits};
use mailagent_tests::corpus;
use mailagent_tests::forms::{lease_workbook, Lease, MAP};
use rust_xlsxwriter::{ExcelDateTime, Format, Formula, Workbook};

fn limits() -> Limits {
    Limits {
        max_workbook_bytes: 10 << 20,
        max_decompressed_bytes: 20 << 20,
        max_sheets: 8,
        max_rows: 1000,
        max_cells: 10_000,
    }
}

/// What a reader made of a workbook.
#[derive(Debug, PartialEq)]
enum Outcome {
    Form(Form),
    Refused(Reason),
    /// The reader panicked: nothing to compare with.
    Panicked,
}

fn ours(bytes: &[u8]) -> Outcome {
    match read_form(bytes, &limits()) {
        Ok(form) => Outcome::Form(form),
        Err(r) if r.detail.contains("panicked") => Outcome::Panicked,
        Err(r) => Outcome::Refused(r.reason),
    }
}

// ------------------------------------------------- calamine, as it was used

fn cell_value(v: &DataRef<'_>) -> Option<Value> {
    match v {
        DataRef::Empty | DataRef::Error(_) => None,
        DataRef::Int(i) => Some(Value::Number(*i as f64)),
        DataRef::Float(f) => Some(Value::Number(*f)),
        DataRef::String(s) => (!s.is_empty()).then(|| Value::Text(s.clone())),
        DataRef::SharedString(s) => (!s.is_empty()).then(|| Value::Text(s.to_string())),
        DataRef::Bool(b) => Some(Value::Bool(*b)),
        DataRef::DateTime(dt) if dt.is_datetime() => match dt.as_datetime() {
            Some(t) => {
                let iso = t.to_string().replacen(' ', "T", 1);
                Some(Value::Date(match iso.strip_suffix("T00:00:00") {
                    Some(date) => date.to_string(),
                    None => iso,
                }))
            }
            None => Some(Value::Number(dt.as_f64())),
        },
        DataRef::DateTime(dt) => Some(Value::Number(dt.as_f64())),
        DataRef::DateTimeIso(s) => Some(Value::Date(s.clone())),
        DataRef::DurationIso(s) => Some(Value::Text(s.clone())),
    }
}

fn calamine_sheet<R: Read + std::io::Seek>(
    xlsx: &mut Xlsx<R>,
    name: &str,
    limits: &Limits,
    cells_left: &mut u64,
) -> Result<Sheet, Reason> {
    let mut reader = xlsx
        .worksheet_cells_reader(name)
        .map_err(|_| Reason::MalformedWorkbook)?;
    let mut sheet = Sheet::default();
    while let Some(cell) = reader.next_cell().map_err(|_| Reason::MalformedWorkbook)? {
        let (row, col) = cell.get_position();
        if row >= limits.max_rows {
            return Err(Reason::TooManyRows);
        }
        if *cells_left == 0 {
            return Err(Reason::TooManyCells);
        }
        *cells_left -= 1;
        if let Some(v) = cell_value(cell.get_value()) {
            sheet.cells.insert((row, col), v);
        }
    }
    Ok(sheet)
}

fn calamine_form(bytes: &[u8], limits: &Limits) -> Result<Form, Reason> {
    let mut xlsx: Xlsx<_> = Xlsx::new(Cursor::new(bytes)).map_err(|_| Reason::MalformedWorkbook)?;
    let names = xlsx.sheet_names();
    if names.len() as u64 > u64::from(limits.max_sheets) {
        return Err(Reason::TooManySheets);
    }
    if !names.iter().any(|n| n == MAP_SHEET) {
        return Err(Reason::NoObjectMap);
    }
    let mut cells_left = limits.max_cells;
    let map_sheet = calamine_sheet(&mut xlsx, MAP_SHEET, limits, &mut cells_left)?;
    let map = objectmap::parse(&map_sheet).map_err(|r| r.reason)?;
    let mut book = Book::new();
    for name in map.sheets() {
        if names.contains(&name) {
            let sheet = calamine_sheet(&mut xlsx, &name, limits, &mut cells_left)?;
            book.insert(name, sheet);
        }
    }
    objectmap::extract(&map, &book).map_err(|r| r.reason)
}

/// calamine on the workbook, behind the size and zip checks ours makes
/// first (the mutations below never touch the zip, only the parts inside).
fn reference(bytes: &[u8]) -> Outcome {
    let limits = limits();
    if bytes.len() as u64 > limits.max_workbook_bytes {
        return Outcome::Refused(Reason::WorkbookTooLarge);
    }
    if !bytes.starts_with(b"PK\x03\x04") {
        return Outcome::Refused(Reason::NotAWorkbook);
    }
    if zip::ZipArchive::new(Cursor::new(bytes)).is_err() {
        return Outcome::Refused(Reason::MalformedWorkbook);
    }
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let got = std::panic::catch_unwind(|| calamine_form(bytes, &limits));
    std::panic::set_hook(previous);
    match got {
        Ok(Ok(form)) => Outcome::Form(form),
        Ok(Err(reason)) => Outcome::Refused(reason),
        Err(_) => Outcome::Panicked,
    }
}

// ------------------------------------------------------------- workbooks

/// Writes one field's value into column B of the given row.
type WriteCell = Box<dyn Fn(&mut rust_xlsxwriter::Worksheet, u32)>;

/// A form whose fields cover every kind of cell: shared and rich strings,
/// escapes and whitespace, numbers with and without number formats, dates,
/// times, date-times and durations, booleans, formulas with cached number,
/// string, boolean and error results, and a field on an empty cell.
fn varied_workbook() -> Vec<u8> {
    let mut wb = Workbook::new();
    let cells: Vec<(&str, WriteCell)> = vec![
        (
            "text",
            Box::new(|s, r| drop(s.write_string(r, 1, "Main Street 1"))),
        ),
        (
            "escapes",
            Box::new(|s, r| drop(s.write_string(r, 1, "a & b <c> \"d\" 'e'"))),
        ),
        (
            "spaces",
            Box::new(|s, r| drop(s.write_string(r, 1, "  padded  "))),
        ),
        (
            "unicode",
            Box::new(|s, r| drop(s.write_string(r, 1, "Zürich — 東京 🏢"))),
        ),
        (
            "carriage",
            Box::new(|s, r| drop(s.write_string(r, 1, "line\r\nnext _x000D_"))),
        ),
        (
            "rich",
            Box::new(|s, r| {
                let bold = Format::new().set_bold();
                let plain = Format::default();
                drop(s.write_rich_string(r, 1, &[(&bold, "Bold "), (&plain, "and plain")]))
            }),
        ),
        ("integer", Box::new(|s, r| drop(s.write_number(r, 1, 42.0)))),
        (
            "fraction",
            Box::new(|s, r| drop(s.write_number(r, 1, -1200.125))),
        ),
        (
            "tiny",
            Box::new(|s, r| drop(s.write_number(r, 1, 1.5e-300))),
        ),
        (
            "currency",
            Box::new(|s, r| {
                let f = Format::new().set_num_format("\"$\"#,##0.00");
                drop(s.write_number_with_format(r, 1, 1234.5, &f))
            }),
        ),
        (
            "percent",
            Box::new(|s, r| {
                let f = Format::new().set_num_format("0.0%");
                drop(s.write_number_with_format(r, 1, 0.25, &f))
            }),
        ),
        (
            "date",
            Box::new(|s, r| {
                let f = Format::new().set_num_format("yyyy-mm-dd");
                let d = ExcelDateTime::from_ymd(2024, 3, 1).unwrap();
                drop(s.write_datetime_with_format(r, 1, &d, &f))
            }),
        ),
        (
            "datetime",
            Box::new(|s, r| {
                let f = Format::new().set_num_format("dd/mm/yyyy hh:mm:ss");
                let d = ExcelDateTime::from_ymd(1999, 12, 31)
                    .unwrap()
                    .and_hms_milli(23, 59, 58, 250)
                    .unwrap();
                drop(s.write_datetime_with_format(r, 1, &d, &f))
            }),
        ),
        (
            "time",
            Box::new(|s, r| {
                let f = Format::new().set_num_format("h:mm AM/PM");
                drop(s.write_number_with_format(r, 1, 0.75, &f))
            }),
        ),
        (
            "builtin-date",
            Box::new(|s, r| {
                let f = Format::new().set_num_format_index(14);
                drop(s.write_number_with_format(r, 1, 45352.0, &f))
            }),
        ),
        (
            "early-date",
            Box::new(|s, r| {
                let f = Format::new().set_num_format("d-mmm-yy");
                drop(s.write_number_with_format(r, 1, 59.0, &f))
            }),
        ),
        (
            "duration",
            Box::new(|s, r| {
                let f = Format::new().set_num_format("[h]:mm:ss");
                drop(s.write_number_with_format(r, 1, 1.75, &f))
            }),
        ),
        ("yes", Box::new(|s, r| drop(s.write_boolean(r, 1, true)))),
        ("no", Box::new(|s, r| drop(s.write_boolean(r, 1, false)))),
        (
            "formula-number",
            Box::new(|s, r| drop(s.write_formula(r, 1, Formula::new("=40+2").set_result("42")))),
        ),
        (
            "formula-text",
            Box::new(|s, r| {
                drop(s.write_formula(r, 1, Formula::new("=\"a\"&\"b\"").set_result("ab")))
            }),
        ),
        (
            "formula-bool",
            Box::new(|s, r| drop(s.write_formula(r, 1, Formula::new("=1=1").set_result("TRUE")))),
        ),
        (
            "formula-error",
            Box::new(|s, r| {
                drop(s.write_formula(r, 1, Formula::new("=1/0").set_result("#DIV/0!")))
            }),
        ),
        (
            "formula-empty",
            Box::new(|s, r| drop(s.write_formula(r, 1, "=A1"))),
        ),
        (
            "blank",
            Box::new(|s, r| drop(s.write_blank(r, 1, &Format::new().set_bold()))),
        ),
        ("missing", Box::new(|_, _| {})),
    ];
    let map = wb.add_worksheet();
    map.set_name(MAP).unwrap();
    map.write_string(0, 0, "Excel to Tririga").unwrap();
    map.write_string(0, 1, "triContract").unwrap();
    map.write_string(0, 2, "triLeaseAbstract").unwrap();
    for (i, (name, _)) in cells.iter().enumerate() {
        let r = i as u32 + 1;
        map.write_string(r, 0, "Field").unwrap();
        map.write_string(r, 1, *name).unwrap();
        map.write_string(r, 2, format!("Values!B{r}")).unwrap();
    }
    map.write_string(cells.len() as u32 + 1, 0, "End").unwrap();
    let values = wb.add_worksheet();
    values.set_name("Values").unwrap();
    for (i, (name, write)) in cells.iter().enumerate() {
        values.write_string(i as u32, 0, *name).unwrap();
        write(values, i as u32);
    }
    wb.save_to_buffer().unwrap()
}

/// Every workbook attached to a mail of the malformed-mail corpus.
fn corpus_workbooks() -> Vec<(String, Vec<u8>)> {
    let mime = MimeLimits {
        max_depth: 20,
        max_parts: 1000,
    };
    corpus::small()
        .into_iter()
        .filter_map(|e| {
            parse_mail(&e.raw, &mime)
                .ok()
                .map(|m| (e.name.to_string(), m))
        })
        .flat_map(|(name, mail)| {
            mail.workbooks
                .into_iter()
                .enumerate()
                .map(move |(i, w)| (format!("{name}#{i}"), w.bytes))
        })
        .collect()
}

fn bases() -> Vec<(String, Vec<u8>)> {
    let mut bases = vec![
        ("varied".to_string(), varied_workbook()),
        (
            "lease".to_string(),
            lease_workbook(&Lease {
                id: "L-1",
                ..Default::default()
            }),
        ),
        ("corpus-lease".to_string(), corpus::lease_xlsx("C-1")),
    ];
    // Shared strings with rich and phonetic runs, and an `<si>` without
    // any `<t>` before the ones used (calamine adds no entry for it, so
    // the indexes after it shift).
    let mut book = corpus::lease_book(corpus::Cell::Shared("1".into()));
    book.sheets[1].rows[1][1] = Some(corpus::Cell::Shared("2".into()));
    book.shared_strings = Some(
        r#"<sst xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"><si><t>zero</t></si><si><rPh><t>no text</t></rPh></si><si><r><t>C-</t></r><r><rPr><b/></rPr><t>SHARED</t></r><rPh><t>phonetic</t></rPh></si><si><t xml:space="preserve"> Main &amp; High </t></si></sst>"#
            .into(),
    );
    bases.push(("corpus-shared-strings".to_string(), book.xlsx()));
    bases.extend(corpus_workbooks());
    bases
}

#[test]
fn every_generated_and_corpus_workbook_reads_as_calamine_read_it() {
    let bases = bases();
    assert!(bases.len() > 20, "{} workbooks", bases.len());
    let mut compared = 0;
    for (name, bytes) in &bases {
        let (want, got) = (reference(bytes), ours(bytes));
        assert_ne!(got, Outcome::Panicked, "{name}");
        if want != Outcome::Panicked {
            assert_eq!(got, want, "{name}");
            compared += 1;
        }
    }
    // The varied workbook really is read (not refused by both).
    match ours(&bases[0].1) {
        Outcome::Form(form) => assert!(form.fields.len() > 20, "{:?}", form.fields),
        other => panic!("the varied workbook: {other:?}"),
    }
    println!("{compared} of {} workbooks compared", bases.len());
}

// ------------------------------------------------------------- mutations

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const SNIPPETS: &[&str] = &[
    "<r>",
    "</r>",
    "<t>x</t>",
    "<t xml:space=\"preserve\"> y </t>",
    "<rPh><t>p</t></rPh>",
    "<rPh>",
    "</si>",
    "<si>",
    "<si></si>",
    " t=\"s\"",
    " t=\"str\"",
    " t=\"e\"",
    " t=\"b\"",
    " t=\"n\"",
    " t=\"d\"",
    " t=\"inlineStr\"",
    " t=\"zz\"",
    " s=\"1\"",
    " s=\"99\"",
    " s=\"x\"",
    "<v>1</v>",
    "<v>45352.5</v>",
    "<v>abc</v>",
    "<v></v>",
    "<v>#N/A</v>",
    "<v>#BOGUS</v>",
    "<v>1<x/>2</v>",
    "<f>1+1</f>",
    "<is><t>y</t></is>",
    "&amp;",
    "&#65;",
    "&bogus;",
    "<![CDATA[z]]>",
    "<!-- c -->",
    "<c r=\"A1\">",
    "<c>",
    "</c>",
    "<c r=\"B2\"><v>7</v></c>",
    "<row r=\"3\">",
    "<row>",
    "</row>",
    " r=\"B2\"",
    " r=\"ZZ\"",
    " r=\"A1048577\"",
    " r=\"A99999999999\"",
    "<dimension ref=\"A1:B2\"/>",
    "<dimension ref=\"bad\"/>",
    "<dimension/>",
    "<workbookPr date1904=\"1\"/>",
    "<workbookPr date1904=\"true\"/>",
    "<numFmt numFmtId=\"164\" formatCode=\"dd/mm/yyyy\"/>",
    "<numFmt numFmtId=\"0\" formatCode=\"[h]:mm\"/>",
    " numFmtId=\"14\"",
    " numFmtId=\"46\"",
    " numFmtId=\"164\"",
    "<xf numFmtId=\"22\"/>",
    " state=\"hidden\"",
    " state=\"odd\"",
    "<sheet name=\"Extra\" sheetId=\"9\" r:id=\"rId1\"/>",
    "<sheet name=\"Lost\" sheetId=\"9\" r:id=\"rId404\"/>",
    "<definedName name=\"n\">Values!$A$1</definedName>",
    "<definedName name=\"n\">&bad;</definedName>",
    "<Relationship Id=\"rId1\" Target=\"/xl/worksheets/sheet1.xml\"/>",
    "<Relationship Id=\"rId2\" Target=\"elsewhere/sheet2.xml\"/>",
    "\"",
    "<",
    ">",
    "/>",
    "=",
    " ",
];

/// One random edit of one XML part of `book`; the zip is written anew.
fn mutate(book: &[u8], rng: &mut Rng) -> (String, Vec<u8>) {
    let mut zip = zip::ZipArchive::new(Cursor::new(book)).unwrap();
    let mut parts: Vec<(String, Vec<u8>)> = (0..zip.len())
        .map(|i| {
            let mut entry = zip.by_index(i).unwrap();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            (entry.name().to_string(), bytes)
        })
        .collect();
    let xml: Vec<usize> = parts
        .iter()
        .enumerate()
        .filter(|(_, (n, _))| n.starts_with("xl/") && n.ends_with(".xml") || n.ends_with(".rels"))
        .map(|(i, _)| i)
        .collect();
    let which = xml[rng.below(xml.len())];
    let (name, bytes) = &mut parts[which];
    let len = bytes.len();
    let at = rng.below(len + 1);
    let what = match rng.below(5) {
        0 => {
            let alphabet = b"<>/\"=& at1:srv";
            if at < len {
                bytes[at] = alphabet[rng.below(alphabet.len())];
            }
            format!("{name}: byte {at} changed")
        }
        1 => {
            let n = (1 + rng.below(24)).min(len - at.min(len));
            bytes.drain(at.min(len)..at.min(len) + n);
            format!("{name}: {n} bytes cut at {at}")
        }
        2 => {
            let n = (1 + rng.below(40)).min(len - at.min(len));
            let copy = bytes[at.min(len)..at.min(len) + n].to_vec();
            let to = rng.below(bytes.len() + 1);
            bytes.splice(to..to, copy);
            format!("{name}: {n} bytes from {at} copied to {to}")
        }
        3 => {
            // After a random '>' (between elements), most of the time.
            let gt: Vec<usize> = bytes
                .iter()
                .enumerate()
                .filter(|(_, b)| **b == b'>')
                .map(|(i, _)| i + 1)
                .collect();
            let at = if gt.is_empty() {
                at
            } else {
                gt[rng.below(gt.len())]
            };
            let snippet = SNIPPETS[rng.below(SNIPPETS.len())];
            bytes.splice(at..at, snippet.bytes());
            format!("{name}: {snippet:?} put after byte {at}")
        }
        _ => {
            // Inside a random start tag, before its end.
            let starts: Vec<usize> = bytes
                .windows(2)
                .enumerate()
                .filter(|(_, w)| w[0] != b'/' && w[1] == b'>')
                .map(|(i, _)| i + 1)
                .collect();
            let at = if starts.is_empty() {
                at
            } else {
                starts[rng.below(starts.len())]
            };
            let snippet = SNIPPETS[rng.below(SNIPPETS.len())];
            bytes.splice(at..at, snippet.bytes());
            format!("{name}: {snippet:?} put at byte {at}")
        }
    };
    let mut out = Vec::new();
    {
        let mut z = zip::ZipWriter::new(Cursor::new(&mut out));
        for (name, bytes) in &parts {
            z.start_file(name.as_str(), zip::write::SimpleFileOptions::default())
                .unwrap();
            z.write_all(bytes).unwrap();
        }
        z.finish().unwrap();
    }
    (what, out)
}

#[test]
fn mutated_workbooks_read_as_calamine_read_them() {
    let bases: Vec<(String, Vec<u8>)> = bases()
        .into_iter()
        .filter(|(_, b)| {
            zip::ZipArchive::new(Cursor::new(b.as_slice()))
                .is_ok_and(|z| z.index_for_name("xl/workbook.xml").is_some())
        })
        .collect();
    let rounds: usize = std::env::var("XLSX_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut forms, mut refused, mut panicked) = (0, 0, 0);
    for round in 0..rounds {
        let (base, book) = &bases[round % bases.len()];
        let (what, mutant) = mutate(book, &mut rng);
        let (want, got) = (reference(&mutant), ours(&mutant));
        assert_ne!(got, Outcome::Panicked, "round {round}, {base}, {what}");
        match want {
            Outcome::Panicked => panicked += 1,
            Outcome::Form(_) => forms += 1,
            Outcome::Refused(_) => refused += 1,
        }
        if want != Outcome::Panicked {
            assert_eq!(got, want, "round {round}, {base}, {what}");
        }
    }
    println!(
        "{rounds} mutants: {forms} read to a form, {refused} refused, {panicked} made calamine panic"
    );
    // The mutations reach both outcomes, so the comparison means something.
    assert!(
        forms > rounds / 10 && refused > rounds / 10,
        "{forms} / {refused}"
    );
}
