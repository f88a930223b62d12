//! Reading an offline form's `.xlsx` safely (§6, guard rails): size limits
//! before anything is parsed, then the parts calamine reads inflated once,
//! with a hard cap (the zip-bomb check), into a stored zip that calamine's
//! streaming cell reader reads with sheet, row and cell limits, keeping
//! each cell's type.

use std::io::{Cursor, Read, Write};

use calamine::{DataRef, Reader, Xlsx};
use common::config::FormProcessorConfig;

use crate::objectmap::{self, Book, Form, Sheet, MAP_SHEET};
use crate::reject::{Checked, Reason, Rejection};
use crate::value::Value;

/// Guard-rail limits for one workbook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest attachment, bytes.
    pub max_workbook_bytes: u64,
    /// Largest total inflated size of the zip's entries, bytes.
    pub max_decompressed_bytes: u64,
    /// Most worksheets.
    pub max_sheets: u32,
    /// Rows past this (zero-based index) are refused.
    pub max_rows: u32,
    /// Most cells read across the workbook.
    pub max_cells: u64,
}

impl From<&FormProcessorConfig> for Limits {
    fn from(c: &FormProcessorConfig) -> Self {
        Self {
            max_workbook_bytes: c.max_workbook_bytes,
            max_decompressed_bytes: c.max_decompressed_bytes,
            max_sheets: c.max_sheets,
            max_rows: c.max_rows,
            max_cells: c.max_cells,
        }
    }
}

/// Most entries accepted in the zip (an xlsx has a few dozen).
const MAX_ZIP_ENTRIES: usize = 10_000;

fn malformed(e: impl std::fmt::Display) -> Rejection {
    Rejection::new(
        Reason::MalformedWorkbook,
        format!("cannot read the workbook: {e}"),
    )
}

/// Whether calamine reads this zip entry: the four workbook-wide parts it
/// opens in `Xlsx::new` and the sheet parts (`xl/worksheets/…`, chart and
/// dialog sheets; calamine refuses a sheet anywhere else). Themes, document
/// properties, drawings, media and the like are never read, so they are
/// neither inflated nor kept.
fn calamine_reads(name: &str) -> bool {
    const PARTS: [&str; 4] = [
        "xl/workbook.xml",
        "xl/_rels/workbook.xml.rels",
        "xl/sharedStrings.xml",
        "xl/styles.xml",
    ];
    const SHEET_DIRS: [&str; 3] = ["xl/worksheets/", "xl/chartsheets/", "xl/dialogsheets/"];
    if PARTS.iter().any(|p| p.eq_ignore_ascii_case(name)) {
        return true;
    }
    let lower = name.to_ascii_lowercase();
    SHEET_DIRS.iter().any(|d| {
        lower
            .strip_prefix(d)
            .is_some_and(|rest| !rest.contains('/') && rest.ends_with(".xml"))
    })
}

/// Checks the size and the zip structure, and inflates — once — the parts
/// calamine reads, into a new zip whose entries are stored (not
/// compressed), which calamine then reads without inflating again. A zip
/// whose declared sizes, or whose real inflated sizes, pass the limit is
/// refused; inflation stops at the limit, so a lying central directory
/// costs at most `max_decompressed_bytes` of memory.
///
/// Before issue 15 every entry was inflated into a counter and then
/// inflated again by calamine: about 30 % of the processor's time.
pub fn inflate_parts(bytes: &[u8], limits: &Limits) -> Checked<Vec<u8>> {
    if bytes.len() as u64 > limits.max_workbook_bytes {
        return Err(Rejection::new(
            Reason::WorkbookTooLarge,
            format!(
                "the workbook is {} bytes, more than the limit of {}",
                bytes.len(),
                limits.max_workbook_bytes
            ),
        ));
    }
    if !bytes.starts_with(b"PK\x03\x04") {
        return Err(Rejection::new(
            Reason::NotAWorkbook,
            "the attachment is not an xlsx (zip) file",
        ));
    }
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(malformed)?;
    if zip.len() > MAX_ZIP_ENTRIES {
        return Err(malformed(format!("{} zip entries", zip.len())));
    }
    let too_large = |n: u64| {
        Rejection::new(
            Reason::DecompressedTooLarge,
            format!(
                "the workbook inflates to more than {n} bytes (limit {})",
                limits.max_decompressed_bytes
            ),
        )
    };
    // The declared sizes first (cheap), then the real ones: a central
    // directory may lie.
    let mut declared: u64 = 0;
    let mut wanted = Vec::new();
    for i in 0..zip.len() {
        let Ok(entry) = zip.by_index_raw(i) else {
            continue;
        };
        declared = declared.saturating_add(entry.size());
        if calamine_reads(entry.name()) {
            wanted.push((i, entry.size()));
        }
    }
    if declared > limits.max_decompressed_bytes {
        return Err(too_large(declared));
    }
    let capacity = wanted.iter().map(|(_, n)| *n as usize + 128).sum::<usize>() + 1024;
    let mut out = zip::ZipWriter::new(Cursor::new(Vec::with_capacity(capacity)));
    let mut total: u64 = 0;
    for (i, _) in wanted {
        let (name, size) = {
            let raw = zip.by_index_raw(i).map_err(malformed)?;
            (raw.name().to_string(), raw.size())
        };
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(size >= u64::from(u32::MAX));
        out.start_file(name, options).map_err(malformed)?;
        // One byte past what is left: reading it means the limit is passed.
        let left = limits.max_decompressed_bytes - total;
        let key = template_part_key(&mut zip, i).map_err(malformed)?;
        let copied = match (key.as_ref().and_then(PartCache::get), key) {
            (Some(inflated), _) => {
                out.write_all(&inflated).map_err(malformed)?;
                inflated.len() as u64
            }
            (None, Some(key)) => {
                let mut inflated = Vec::new();
                zip.by_index(i)
                    .map_err(malformed)?
                    .take(left.saturating_add(1))
                    .read_to_end(&mut inflated)
                    .map_err(malformed)?;
                out.write_all(&inflated).map_err(malformed)?;
                let n = inflated.len() as u64;
                if n <= left {
                    PartCache::put(key, inflated);
                }
                n
            }
            (None, None) => {
                let entry = zip.by_index(i).map_err(malformed)?;
                std::io::copy(&mut entry.take(left.saturating_add(1)), &mut out)
                    .map_err(malformed)?
            }
        };
        total += copied;
        if total > limits.max_decompressed_bytes {
            return Err(too_large(total));
        }
    }
    Ok(out.finish().map_err(malformed)?.into_inner())
}

/// The workbook-wide parts that forms made from one template share byte
/// for byte: `xl/workbook.xml`, its `_rels`, `xl/styles.xml`.
fn template_part(name: &str) -> bool {
    [
        "xl/workbook.xml",
        "xl/_rels/workbook.xml.rels",
        "xl/styles.xml",
    ]
    .iter()
    .any(|p| p.eq_ignore_ascii_case(name))
}

/// Largest template part kept inflated, bytes (compressed and inflated).
const PART_CACHE_MAX: u64 = 64 * 1024;
/// How many template parts are kept.
const PART_CACHE_SLOTS: usize = 16;

/// What identifies a part's content exactly: its compression method, its
/// CRC-32 and its compressed bytes. The same deflate stream always inflates
/// to the same bytes, so a hit is the part itself, not a checksum match.
#[derive(PartialEq, Eq)]
struct PartKey {
    method: zip::CompressionMethod,
    crc32: u32,
    raw: Vec<u8>,
}

/// The key of entry `i` when it is a template part small enough to cache.
fn template_part_key<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    i: usize,
) -> zip::result::ZipResult<Option<PartKey>> {
    let mut entry = zip.by_index_raw(i)?;
    if !template_part(entry.name())
        || entry.size() > PART_CACHE_MAX
        || entry.compressed_size() > PART_CACHE_MAX
    {
        return Ok(None);
    }
    let (method, crc32) = (entry.compression(), entry.crc32());
    let mut raw = Vec::with_capacity(entry.compressed_size() as usize);
    entry.read_to_end(&mut raw)?;
    Ok(Some(PartKey { method, crc32, raw }))
}

/// Inflated template parts of recent workbooks (issue 15): a form mail's
/// workbook has seven deflate streams to inflate, three of them the same in
/// every form made from one template, and setting up each stream's Huffman
/// tables is a good part of the cost. A few slots, replaced round-robin,
/// shared by the parsing threads.
struct PartCache {
    slots: Vec<(PartKey, std::sync::Arc<Vec<u8>>)>,
    next: usize,
}

static PART_CACHE: std::sync::Mutex<PartCache> = std::sync::Mutex::new(PartCache {
    slots: Vec::new(),
    next: 0,
});

impl PartCache {
    fn get(key: &PartKey) -> Option<std::sync::Arc<Vec<u8>>> {
        let cache = PART_CACHE.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .slots
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    fn put(key: PartKey, inflated: Vec<u8>) {
        let mut cache = PART_CACHE.lock().unwrap_or_else(|e| e.into_inner());
        let slot = (key, std::sync::Arc::new(inflated));
        if cache.slots.len() < PART_CACHE_SLOTS {
            cache.slots.push(slot);
        } else {
            let at = cache.next;
            cache.slots[at] = slot;
            cache.next = (at + 1) % PART_CACHE_SLOTS;
        }
    }
}

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

/// Reads one worksheet's non-empty cells within the row and cell budgets.
fn read_sheet<R: Read + std::io::Seek>(
    xlsx: &mut Xlsx<R>,
    name: &str,
    limits: &Limits,
    cells_left: &mut u64,
) -> Checked<Sheet> {
    let mut reader = xlsx.worksheet_cells_reader(name).map_err(malformed)?;
    let mut sheet = Sheet::default();
    loop {
        let cell = match reader.next_cell() {
            Ok(Some(cell)) => cell,
            Ok(None) => break,
            Err(e) => return Err(malformed(e)),
        };
        let (row, col) = cell.get_position();
        if row >= limits.max_rows {
            return Err(Rejection::new(
                Reason::TooManyRows,
                format!(
                    "worksheet {name:?} has rows past the limit of {}",
                    limits.max_rows
                ),
            ));
        }
        if *cells_left == 0 {
            return Err(Rejection::new(
                Reason::TooManyCells,
                format!("the workbook has more than {} cells", limits.max_cells),
            ));
        }
        *cells_left -= 1;
        if let Some(v) = cell_value(cell.get_value()) {
            sheet.cells.insert((row, col), v);
        }
    }
    Ok(sheet)
}

/// Reads a form from workbook bytes: guard rails, the object map, then the
/// worksheets it refers to.
pub fn read_form(bytes: &[u8], limits: &Limits) -> Checked<Form> {
    let parts = inflate_parts(bytes, limits)?;
    // calamine 0.26 panics on some inconsistent workbooks (a shared-string
    // index past the table indexes a Vec): that is a malformed workbook, not
    // a crash to redeliver until the poison limit (tests/corpus).
    // The panic is expected and answered, so the panic hook stays quiet:
    // no stderr line per hostile mail, and no backtrace symbolized (with
    // RUST_BACKTRACE set that alone loads the debug info, 200+ MB).
    let read = quiet_panics(|| std::panic::catch_unwind(|| read_cells(&parts, limits)));
    read.unwrap_or_else(|_| {
        Err(malformed(
            "the workbook is inconsistent (the xlsx reader panicked)",
        ))
    })
}

thread_local! {
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the panic hook silenced on this thread; other threads'
/// panics are reported as before (the previous hook is kept and called).
fn quiet_panics<T>(f: impl FnOnce() -> T) -> T {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(|q| q.get()) {
                previous(info);
            }
        }));
    });
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            QUIET_PANICS.with(|q| q.set(self.0));
        }
    }
    let _reset = Reset(QUIET_PANICS.with(|q| q.replace(true)));
    f()
}

fn read_cells(bytes: &[u8], limits: &Limits) -> Checked<Form> {
    let mut xlsx: Xlsx<_> = Xlsx::new(Cursor::new(bytes)).map_err(malformed)?;
    let names = xlsx.sheet_names();
    if names.len() as u64 > u64::from(limits.max_sheets) {
        return Err(Rejection::new(
            Reason::TooManySheets,
            format!(
                "the workbook has {} worksheets, more than the limit of {}",
                names.len(),
                limits.max_sheets
            ),
        ));
    }
    if !names.iter().any(|n| n == MAP_SHEET) {
        return Err(Rejection::new(
            Reason::NoObjectMap,
            format!("the workbook has no {MAP_SHEET:?} worksheet"),
        ));
    }
    let mut cells_left = limits.max_cells;
    let map_sheet = read_sheet(&mut xlsx, MAP_SHEET, limits, &mut cells_left)?;
    let map = objectmap::parse(&map_sheet)?;
    let mut book = Book::new();
    for name in map.sheets() {
        if names.contains(&name) {
            let sheet = read_sheet(&mut xlsx, &name, limits, &mut cells_left)?;
            book.insert(name, sheet);
        }
    }
    objectmap::extract(&map, &book)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rust_xlsxwriter::{ExcelDateTime, Format, Workbook};

    fn limits() -> Limits {
        Limits {
            max_workbook_bytes: 10 << 20,
            max_decompressed_bytes: 20 << 20,
            max_sheets: 8,
            max_rows: 1000,
            max_cells: 10_000,
        }
    }

    fn form_workbook() -> Vec<u8> {
        let mut wb = Workbook::new();
        let map = wb.add_worksheet();
        map.set_name(MAP_SHEET).unwrap();
        let rows: &[&[&str]] = &[
            &["Excel to Tririga", "triContract", "triLeaseAbstract"],
            &["Field", "id", "Lease!B1"],
            &["Field", "amount", "Lease!B2"],
            &["Field", "active", "Lease!B3"],
            &["Field", "start", "Lease!B4"],
            &["Field", "empty", "Lease!B5"],
            &["End"],
        ];
        for (r, row) in rows.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                map.write_string(r as u32, c as u16, *v).unwrap();
            }
        }
        let lease = wb.add_worksheet();
        lease.set_name("Lease").unwrap();
        lease.write_string(0, 1, "L-7").unwrap();
        lease.write_number(1, 1, 1200.5).unwrap();
        lease.write_boolean(2, 1, true).unwrap();
        let date = ExcelDateTime::from_ymd(2024, 3, 1).unwrap();
        lease
            .write_datetime_with_format(3, 1, &date, &Format::new().set_num_format("yyyy-mm-dd"))
            .unwrap();
        wb.save_to_buffer().unwrap()
    }

    #[test]
    fn reads_typed_cells_and_leaves_empty_ones_out() {
        let form = read_form(&form_workbook(), &limits()).unwrap();
        assert_eq!(
            form.fields,
            vec![
                ("id".to_string(), Value::Text("L-7".into())),
                ("amount".to_string(), Value::Number(1200.5)),
                ("active".to_string(), Value::Bool(true)),
                ("start".to_string(), Value::Date("2024-03-01".into())),
            ]
        );
    }

    #[test]
    fn guard_rails_table() {
        let good = form_workbook();
        let truncated = good[..good.len() / 2].to_vec();
        let mut bomb = Vec::new();
        {
            let mut z = zip::ZipWriter::new(Cursor::new(&mut bomb));
            z.start_file("xl/zeros.xml", zip::write::SimpleFileOptions::default())
                .unwrap();
            let chunk = vec![0u8; 1 << 20];
            for _ in 0..30 {
                z.write_all(&chunk).unwrap();
            }
            z.finish().unwrap();
        }
        assert!(bomb.len() < 64 * 1024, "bomb is {} bytes", bomb.len());
        let small = Limits {
            max_workbook_bytes: 1024,
            ..limits()
        };
        let few_cells = Limits {
            max_cells: 3,
            ..limits()
        };
        let few_rows = Limits {
            max_rows: 2,
            ..limits()
        };
        let one_sheet = Limits {
            max_sheets: 1,
            ..limits()
        };
        let cases: Vec<(&[u8], Limits, Reason)> = vec![
            (&bomb, limits(), Reason::DecompressedTooLarge),
            (&truncated, limits(), Reason::MalformedWorkbook),
            (b"this is not a workbook", limits(), Reason::NotAWorkbook),
            (&good, small, Reason::WorkbookTooLarge),
            (&good, few_cells, Reason::TooManyCells),
            (&good, few_rows, Reason::TooManyRows),
            (&good, one_sheet, Reason::TooManySheets),
        ];
        for (bytes, limits, want) in cases {
            let got = read_form(bytes, &limits).unwrap_err();
            assert_eq!(got.reason, want, "{got}");
        }
    }

    /// A sheet part that inflates to 30 MB while its central directory and
    /// local header claim 100 bytes: the declared-size check passes, the
    /// inflation stops at the limit.
    #[test]
    fn a_lying_zip_directory_is_stopped_at_the_inflation_limit() {
        let mut bomb = Vec::new();
        {
            let mut z = zip::ZipWriter::new(Cursor::new(&mut bomb));
            z.start_file(
                "xl/worksheets/sheet1.xml",
                zip::write::SimpleFileOptions::default(),
            )
            .unwrap();
            let chunk = vec![b' '; 1 << 20];
            for _ in 0..30 {
                z.write_all(&chunk).unwrap();
            }
            z.finish().unwrap();
        }
        let patch = |bytes: &mut Vec<u8>, signature: &[u8], offset: usize| {
            let at = bytes
                .windows(4)
                .position(|w| w == signature)
                .expect("zip header");
            bytes[at + offset..at + offset + 4].copy_from_slice(&100u32.to_le_bytes());
        };
        patch(&mut bomb, b"PK\x03\x04", 22);
        patch(&mut bomb, b"PK\x01\x02", 24);
        let got = inflate_parts(&bomb, &limits()).unwrap_err();
        assert_eq!(got.reason, Reason::DecompressedTooLarge, "{got}");
    }

    /// The second workbook of a template reads its workbook-wide parts from
    /// the cache and gives the same form; a part whose bytes differ is not
    /// mistaken for a cached one.
    #[test]
    fn template_parts_come_from_the_cache_only_when_identical() {
        let book = form_workbook();
        let first = read_form(&book, &limits()).unwrap();
        let mut zip = zip::ZipArchive::new(Cursor::new(&book)).unwrap();
        let styles = (0..zip.len())
            .find(|&i| zip.by_index_raw(i).unwrap().name() == "xl/styles.xml")
            .unwrap();
        let key = template_part_key(&mut zip, styles).unwrap().unwrap();
        assert!(PartCache::get(&key).is_some(), "styles.xml was cached");
        assert_eq!(read_form(&book, &limits()).unwrap(), first);
        let mut other = key.raw.clone();
        other[0] ^= 1;
        let other = PartKey { raw: other, ..key };
        assert!(PartCache::get(&other).is_none());
    }

    /// The parts calamine never reads are neither inflated nor kept.
    #[test]
    fn only_the_parts_calamine_reads_are_kept() {
        let cases = [
            ("xl/workbook.xml", true),
            ("xl/_rels/workbook.xml.rels", true),
            ("xl/sharedStrings.xml", true),
            ("XL/SHAREDSTRINGS.XML", true),
            ("xl/styles.xml", true),
            ("xl/worksheets/sheet1.xml", true),
            ("xl/worksheets/_rels/sheet1.xml.rels", false),
            ("xl/chartsheets/sheet1.xml", true),
            ("xl/theme/theme1.xml", false),
            ("docProps/core.xml", false),
            ("[Content_Types].xml", false),
            ("xl/media/image1.png", false),
        ];
        for (name, want) in cases {
            assert_eq!(calamine_reads(name), want, "{name}");
        }
        let kept = inflate_parts(&form_workbook(), &limits()).unwrap();
        let zip = zip::ZipArchive::new(Cursor::new(&kept)).unwrap();
        let mut names: Vec<&str> = zip.file_names().collect();
        names.sort_unstable();
        assert!(names.iter().all(|n| calamine_reads(n)), "{names:?}");
        assert!(names.contains(&"xl/worksheets/sheet1.xml"), "{names:?}");
    }

    #[test]
    fn a_workbook_without_the_map_sheet_has_no_object_map() {
        let mut wb = Workbook::new();
        wb.add_worksheet().write_string(0, 0, "hello").unwrap();
        let bytes = wb.save_to_buffer().unwrap();
        assert_eq!(
            read_form(&bytes, &limits()).unwrap_err().reason,
            Reason::NoObjectMap
        );
    }
}
