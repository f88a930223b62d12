//! Reading an offline form's `.xlsx` safely (§6, guard rails): size limits
//! before anything is parsed, the zip's declared sizes, then only the parts
//! a form needs — the shared strings, the cell formats, the workbook's sheet
//! list and the worksheets the object map names —, each inflated once under
//! a hard cap on the total (the zip-bomb check) and read by [`xlsx`] with
//! sheet, row and cell limits, keeping each cell's type.

use std::io::{Cursor, Read};
use std::sync::Arc;

use common::config::FormProcessorConfig;

use crate::objectmap::{self, Book, Form, Sheet, MAP_SHEET};
use crate::reject::{Checked, Reason, Rejection};
use crate::xlsx;

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

fn too_large(n: u64, limits: &Limits) -> Rejection {
    Rejection::new(
        Reason::DecompressedTooLarge,
        format!(
            "the workbook inflates to more than {n} bytes (limit {})",
            limits.max_decompressed_bytes
        ),
    )
}

/// An opened workbook zip. Its parts are inflated when asked for, each
/// once, and their total inflated size is held under
/// `max_decompressed_bytes`. Parts a form never needs (themes, document
/// properties, drawings, media, worksheets the map does not name) are
/// never inflated.
struct Package<'a> {
    zip: zip::ZipArchive<Cursor<&'a [u8]>>,
    limits: &'a Limits,
    inflated: u64,
}

impl<'a> Package<'a> {
    /// Opens the zip and checks its entry count and the declared sizes of
    /// all its entries (cheap; a central directory may lie, so [`part`]
    /// checks the real sizes as it inflates).
    ///
    /// [`part`]: Package::part
    fn open(bytes: &'a [u8], limits: &'a Limits) -> Checked<Self> {
        let mut zip = zip::ZipArchive::new(Cursor::new(bytes)).map_err(malformed)?;
        if zip.len() > MAX_ZIP_ENTRIES {
            return Err(malformed(format!("{} zip entries", zip.len())));
        }
        let mut declared: u64 = 0;
        for i in 0..zip.len() {
            if let Ok(entry) = zip.by_index_raw(i) {
                declared = declared.saturating_add(entry.size());
            }
        }
        if declared > limits.max_decompressed_bytes {
            return Err(too_large(declared, limits));
        }
        Ok(Self {
            zip,
            limits,
            inflated: 0,
        })
    }

    /// The inflated bytes of the part named `name` (matched without regard
    /// to ASCII case, as Excel's readers match it), or `None` when the zip
    /// has no such part. Inflation stops one byte past what the limit
    /// leaves, so a lying directory costs at most `max_decompressed_bytes`.
    fn part(&mut self, name: &str) -> Checked<Option<Arc<Vec<u8>>>> {
        let Some(i) = self
            .zip
            .file_names()
            .find(|n| n.eq_ignore_ascii_case(name))
            .and_then(|n| self.zip.index_for_name(n))
        else {
            return Ok(None);
        };
        let left = self.limits.max_decompressed_bytes - self.inflated;
        let key = template_part_key(&mut self.zip, i).map_err(malformed)?;
        let bytes = match key.as_ref().and_then(PartCache::get) {
            Some(cached) => cached,
            None => {
                let entry = self.zip.by_index(i).map_err(malformed)?;
                let mut inflated = Vec::with_capacity(entry.size().min(left) as usize + 1);
                entry
                    .take(left.saturating_add(1))
                    .read_to_end(&mut inflated)
                    .map_err(malformed)?;
                let inflated = Arc::new(inflated);
                if let Some(key) = key.filter(|_| inflated.len() as u64 <= left) {
                    PartCache::put(key, inflated.clone());
                }
                inflated
            }
        };
        self.inflated += bytes.len() as u64;
        if self.inflated > self.limits.max_decompressed_bytes {
            return Err(too_large(self.inflated, self.limits));
        }
        Ok(Some(bytes))
    }
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
    slots: Vec<(PartKey, Arc<Vec<u8>>)>,
    next: usize,
}

static PART_CACHE: std::sync::Mutex<PartCache> = std::sync::Mutex::new(PartCache {
    slots: Vec::new(),
    next: 0,
});

impl PartCache {
    fn get(key: &PartKey) -> Option<Arc<Vec<u8>>> {
        let cache = PART_CACHE.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .slots
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    fn put(key: PartKey, inflated: Arc<Vec<u8>>) {
        let mut cache = PART_CACHE.lock().unwrap_or_else(|e| e.into_inner());
        let slot = (key, inflated);
        if cache.slots.len() < PART_CACHE_SLOTS {
            cache.slots.push(slot);
        } else {
            let at = cache.next;
            cache.slots[at] = slot;
            cache.next = (at + 1) % PART_CACHE_SLOTS;
        }
    }
}

/// Reads a form from workbook bytes: guard rails, the object map, then the
/// worksheets it refers to.
pub fn read_form(bytes: &[u8], limits: &Limits) -> Checked<Form> {
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
    // A panic while reading hostile bytes is a malformed workbook, not a
    // crash to redeliver until the poison limit. The reader is written not
    // to panic (calamine 0.26, used until issue 15, did: tests/corpus keeps
    // those workbooks); this stays as the backstop. The panic hook stays
    // quiet for it: no stderr line per hostile mail, and no backtrace
    // symbolized (with RUST_BACKTRACE set that alone loads the debug info,
    // 200+ MB).
    let read = quiet_panics(|| std::panic::catch_unwind(|| read_cells(bytes, limits)));
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

/// The workbook-wide parts a sheet's cells are read with.
struct Parts {
    strings: Vec<String>,
    formats: Vec<xlsx::CellFormat>,
    workbook: xlsx::Workbook,
}

impl Parts {
    /// The shared strings, the cell formats (both optional), the
    /// workbook's relationships (required) and its sheet list, read in
    /// that order.
    fn read(package: &mut Package<'_>) -> Checked<Self> {
        let strings = match package.part("xl/sharedStrings.xml")? {
            Some(part) => xlsx::shared_strings(&part).map_err(malformed)?,
            None => Vec::new(),
        };
        let formats = match package.part("xl/styles.xml")? {
            Some(part) => xlsx::styles(&part).map_err(malformed)?,
            None => Vec::new(),
        };
        let relationships = match package.part("xl/_rels/workbook.xml.rels")? {
            Some(part) => xlsx::relationships(&part).map_err(malformed)?,
            None => return Err(malformed("there is no xl/_rels/workbook.xml.rels")),
        };
        let workbook = match package.part("xl/workbook.xml")? {
            Some(part) => xlsx::workbook(&part, &relationships).map_err(malformed)?,
            None => xlsx::Workbook::default(),
        };
        Ok(Self {
            strings,
            formats,
            workbook,
        })
    }
}

/// Reads one worksheet's non-empty cells within the row and cell budgets.
fn read_sheet(
    package: &mut Package<'_>,
    parts: &Parts,
    name: &str,
    cells_left: &mut u64,
) -> Checked<Sheet> {
    let limits = package.limits;
    let not_found = || malformed(format!("worksheet {name:?} not found"));
    let path = parts.workbook.path(name).ok_or_else(not_found)?;
    let xml = package.part(path)?.ok_or_else(not_found)?;
    let mut cells = xlsx::Cells::new(&xml, &parts.strings, &parts.formats, parts.workbook.is_1904)
        .map_err(malformed)?;
    let mut sheet = Sheet::default();
    while let Some(((row, col), value)) = cells.next_cell().map_err(malformed)? {
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
        if let Some(v) = value {
            sheet.cells.insert((row, col), v);
        }
    }
    Ok(sheet)
}

fn read_cells(bytes: &[u8], limits: &Limits) -> Checked<Form> {
    let mut package = Package::open(bytes, limits)?;
    let parts = Parts::read(&mut package)?;
    let sheets = &parts.workbook.sheets;
    if sheets.len() as u64 > u64::from(limits.max_sheets) {
        return Err(Rejection::new(
            Reason::TooManySheets,
            format!(
                "the workbook has {} worksheets, more than the limit of {}",
                sheets.len(),
                limits.max_sheets
            ),
        ));
    }
    if parts.workbook.path(MAP_SHEET).is_none() {
        return Err(Rejection::new(
            Reason::NoObjectMap,
            format!("the workbook has no {MAP_SHEET:?} worksheet"),
        ));
    }
    let mut cells_left = limits.max_cells;
    let map_sheet = read_sheet(&mut package, &parts, MAP_SHEET, &mut cells_left)?;
    let map = objectmap::parse(&map_sheet)?;
    let mut book = Book::new();
    for name in map.sheets() {
        if parts.workbook.path(&name).is_some() {
            let sheet = read_sheet(&mut package, &parts, &name, &mut cells_left)?;
            book.insert(name, sheet);
        }
    }
    objectmap::extract(&map, &book)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::Value;
    use rust_xlsxwriter::{ExcelDateTime, Format, Workbook};
    use std::io::Write;

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

    /// The parts of a workbook, in zip order, inflated.
    fn parts_of(book: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut zip = zip::ZipArchive::new(Cursor::new(book)).unwrap();
        (0..zip.len())
            .map(|i| {
                let mut entry = zip.by_index(i).unwrap();
                let mut bytes = Vec::new();
                entry.read_to_end(&mut bytes).unwrap();
                (entry.name().to_string(), bytes)
            })
            .collect()
    }

    fn zip_of(parts: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut z = zip::ZipWriter::new(Cursor::new(&mut out));
        for (name, bytes) in parts {
            z.start_file(name.as_str(), zip::write::SimpleFileOptions::default())
                .unwrap();
            z.write_all(bytes).unwrap();
        }
        z.finish().unwrap();
        out
    }

    /// The form workbook with one worksheet part replaced by 30 MB of
    /// spaces whose central directory entry and local header claim 100
    /// bytes (it is put first, so the first headers are its own).
    fn with_lying_sheet(book: &[u8], sheet: &str) -> Vec<u8> {
        let mut parts = parts_of(book);
        let at = parts.iter().position(|(n, _)| n == sheet).expect(sheet);
        let (name, _) = parts.remove(at);
        parts.insert(0, (name, vec![b' '; 30 << 20]));
        let mut bomb = zip_of(&parts);
        let patch = |bytes: &mut Vec<u8>, signature: &[u8], offset: usize| {
            let at = bytes
                .windows(4)
                .position(|w| w == signature)
                .expect("zip header");
            bytes[at + offset..at + offset + 4].copy_from_slice(&100u32.to_le_bytes());
        };
        patch(&mut bomb, b"PK\x03\x04", 22);
        patch(&mut bomb, b"PK\x01\x02", 24);
        assert!(bomb.len() < 256 * 1024, "bomb is {} bytes", bomb.len());
        bomb
    }

    /// The object map's sheet lies about its size: the declared-size check
    /// passes, the inflation stops at the limit.
    #[test]
    fn a_lying_zip_directory_is_stopped_at_the_inflation_limit() {
        let bomb = with_lying_sheet(&form_workbook(), "xl/worksheets/sheet1.xml");
        let got = read_form(&bomb, &limits()).unwrap_err();
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

    /// Only the parts a form needs are inflated: a worksheet the object map
    /// does not name is never read, so even a lying one costs nothing.
    #[test]
    fn a_worksheet_the_map_does_not_name_is_never_inflated() {
        let mut wb = Workbook::new();
        let mut plain = |name: &str, rows: &[&[&str]]| {
            let sheet = wb.add_worksheet();
            sheet.set_name(name).unwrap();
            for (r, row) in rows.iter().enumerate() {
                for (c, v) in row.iter().enumerate() {
                    sheet.write_string(r as u32, c as u16, *v).unwrap();
                }
            }
        };
        plain(
            MAP_SHEET,
            &[
                &["Excel to Tririga", "triContract", "triLeaseAbstract"],
                &["Field", "id", "Lease!B1"],
                &["End"],
            ],
        );
        plain("Lease", &[&["Lease ID", "L-7"]]);
        plain("Notes", &[&["not part of the form"]]);
        let book = wb.save_to_buffer().unwrap();
        let bomb = with_lying_sheet(&book, "xl/worksheets/sheet3.xml");
        let form = read_form(&bomb, &limits()).unwrap();
        assert_eq!(
            form.fields,
            vec![("id".to_string(), Value::Text("L-7".into()))]
        );
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
