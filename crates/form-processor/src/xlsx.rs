//! The SpreadsheetML parts a form is read from (issue 15): the shared
//! strings, the cell formats, the workbook's sheet list and a worksheet's
//! cells, each parsed from its inflated bytes with quick-xml's borrowing
//! slice reader.
//!
//! Until issue 15 calamine 0.26 read them. It reads every part through a
//! `BufReader` over the zip entry (a copy), builds a `String` for every
//! `<v>`, scans a cell's attributes once per attribute it looks for, and
//! opens parts a form never uses. This module reads the same parts with the
//! same rules — which element ends a string, which formats are dates,
//! which attribute values are unescaped and which are not, what is an
//! error — so a workbook reads to the same form and is refused for the same
//! reason: `workbook`'s differential test holds it to calamine on generated,
//! corpus and mutated workbooks. The one place it differs is where calamine
//! panicked (a shared-string index past the table, a row number that
//! overflows): here that is an error, or a wrapped number as in calamine's
//! release build.
//!
//! `detect_custom_number_format` and `builtin_format_by_id` follow
//! calamine's `formats.rs` (MIT), which ports them from openpyxl.

use std::borrow::Cow;
use std::collections::BTreeMap;

use quick_xml::events::attributes::{Attribute, Attributes};
use quick_xml::events::{BytesStart, Event};
use quick_xml::name::QName;
use quick_xml::Reader;

use crate::value::Value;

/// Why a part could not be read.
#[derive(Debug)]
pub struct XlsxError(String);

impl std::fmt::Display for XlsxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! from_error {
    ($($t:ty => $what:literal),* $(,)?) => {$(
        impl From<$t> for XlsxError {
            fn from(e: $t) -> Self {
                XlsxError(format!(concat!($what, ": {}"), e))
            }
        }
    )*};
}

from_error! {
    quick_xml::Error => "XML error",
    quick_xml::events::attributes::AttrError => "XML attribute error",
    std::num::ParseFloatError => "not a number",
    std::num::ParseIntError => "not an index",
}

type Result<T> = std::result::Result<T, XlsxError>;

fn error(what: impl Into<String>) -> XlsxError {
    XlsxError(what.into())
}

fn eof(expecting: &str) -> XlsxError {
    error(format!("unexpected end of XML, expecting </{expecting}>"))
}

/// A reader over one part, set up as calamine sets up its own: end names
/// not checked, text not trimmed, `<a/>` read as `<a></a>`.
fn xml(bytes: &[u8]) -> Reader<&[u8]> {
    let mut reader = Reader::from_reader(bytes);
    reader
        .check_end_names(false)
        .trim_text(false)
        .check_comments(false)
        .expand_empty_elements(true);
    reader
}

/// The first attribute named `name`; an attribute error before it is an
/// error, a repeated attribute name included. (quick-xml's own check for
/// repeats allocates a list per element; a cell's few attributes are
/// checked here on the stack, with the same outcome.)
fn attribute<'a>(mut attributes: Attributes<'a>, name: &[u8]) -> Result<Option<&'a [u8]>> {
    const ON_STACK: usize = 8;
    attributes.with_checks(false);
    let mut seen: [&[u8]; ON_STACK] = [&[]; ON_STACK];
    let mut more: Vec<&[u8]> = Vec::new();
    for (i, a) in attributes.enumerate() {
        let a = a?;
        let key = a.key.into_inner();
        if seen[..i.min(ON_STACK)].contains(&key) || more.contains(&key) {
            return Err(error(format!(
                "a duplicated attribute {:?}",
                String::from_utf8_lossy(key)
            )));
        }
        match seen.get_mut(i) {
            Some(slot) => *slot = key,
            None => more.push(key),
        }
        if let (true, Cow::Borrowed(value)) = (key == name, a.value) {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

/// The unescaped text up to the end tag named `name` (elements inside are
/// skipped, their text kept; CDATA is not text here).
fn text_until_end<'a>(xml: &mut Reader<&'a [u8]>, name: QName<'_>) -> Result<Cow<'a, str>> {
    let mut text: Cow<'a, str> = Cow::Borrowed("");
    loop {
        match xml.read_event()? {
            Event::Text(t) => {
                let t = t.unescape()?;
                if text.is_empty() {
                    text = t;
                } else {
                    text.to_mut().push_str(&t);
                }
            }
            Event::End(end) if end.name() == name => return Ok(text),
            Event::Eof => return Err(eof(&String::from_utf8_lossy(name.as_ref()))),
            _ => {}
        }
    }
}

/// A plain or rich-text string (`<si>` or `<is>`, whose full name is
/// `closing`): the first `<t>`, or with runs (`<r>`) every run's `<t>`;
/// phonetic runs (`<rPh>`) left out. `None` when there is no `<t>`.
fn string(xml: &mut Reader<&[u8]>, closing: &[u8]) -> Result<Option<String>> {
    let mut rich: Option<String> = None;
    let mut phonetic = false;
    loop {
        match xml.read_event()? {
            Event::Start(e) if e.local_name().as_ref() == b"r" => {
                rich.get_or_insert_with(String::new);
            }
            Event::Start(e) if e.local_name().as_ref() == b"rPh" => phonetic = true,
            Event::End(e) if e.local_name().as_ref() == closing => return Ok(rich),
            Event::End(e) if e.local_name().as_ref() == b"rPh" => phonetic = false,
            Event::Start(e) if e.local_name().as_ref() == b"t" && !phonetic => {
                let text = text_until_end(xml, e.name())?;
                match rich.as_mut() {
                    Some(rich) => rich.push_str(&text),
                    None => {
                        xml.read_to_end(QName(closing))?;
                        return Ok(Some(text.into_owned()));
                    }
                }
            }
            Event::Eof => return Err(eof(&String::from_utf8_lossy(closing))),
            _ => {}
        }
    }
}

/// `xl/sharedStrings.xml`: the table `t="s"` cells index. As in calamine,
/// an `<si>` without any `<t>` adds no entry.
pub fn shared_strings(bytes: &[u8]) -> Result<Vec<String>> {
    let mut xml = xml(bytes);
    let mut strings = Vec::new();
    loop {
        match xml.read_event()? {
            Event::Start(e) if e.local_name().as_ref() == b"si" => {
                if let Some(s) = string(&mut xml, e.name().as_ref())? {
                    strings.push(s);
                }
            }
            Event::End(e) if e.local_name().as_ref() == b"sst" => return Ok(strings),
            Event::Eof => return Err(eof("sst")),
            _ => {}
        }
    }
}

/// What a cell's number format makes of a number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CellFormat {
    /// A plain number.
    Other,
    /// A date or time of day.
    DateTime,
    /// A duration (`[h]:mm`): read as the number.
    TimeDelta,
}

/// Whether a custom number format code shows a date, a duration or
/// neither (its first section only).
fn detect_custom_number_format(format: &str) -> CellFormat {
    let mut escaped = false;
    let mut is_quote = false;
    let mut brackets = 0u8;
    let mut prev = ' ';
    let mut hms = false;
    let mut ap = false;
    for s in format.chars() {
        match (s, escaped, is_quote, ap, brackets) {
            (_, true, ..) => escaped = false,
            ('_' | '\\', ..) => escaped = true,
            ('"', _, true, _, _) => is_quote = false,
            (_, _, true, _, _) => (),
            ('"', _, _, _, _) => is_quote = true,
            (';', ..) => return CellFormat::Other,
            ('[', ..) => brackets = brackets.wrapping_add(1),
            (']', .., 1) if hms => return CellFormat::TimeDelta,
            (']', ..) => brackets = brackets.saturating_sub(1),
            ('a' | 'A', _, _, false, 0) => ap = true,
            ('p' | 'm' | '/' | 'P' | 'M', _, _, true, 0) => return CellFormat::DateTime,
            ('d' | 'm' | 'h' | 'y' | 's' | 'D' | 'M' | 'H' | 'Y' | 'S', _, _, false, 0) => {
                return CellFormat::DateTime
            }
            _ => {
                if !(hms && s.eq_ignore_ascii_case(&prev)) {
                    hms = prev == '[' && matches!(s, 'm' | 'h' | 's' | 'M' | 'H' | 'S');
                }
            }
        }
        prev = s;
    }
    CellFormat::Other
}

/// The built-in number formats (ids 14–22, 45–47) that show dates, times
/// and durations.
fn builtin_format_by_id(id: &[u8]) -> CellFormat {
    match id {
        b"14" | b"15" | b"16" | b"17" | b"18" | b"19" | b"20" | b"21" | b"22" | b"45" | b"47" => {
            CellFormat::DateTime
        }
        b"46" => CellFormat::TimeDelta,
        _ => CellFormat::Other,
    }
}

/// `xl/styles.xml`: the number format of each cell format (`<cellXfs>`),
/// indexed by a cell's `s`. Format codes are decoded, not unescaped, as
/// calamine reads them.
pub fn styles(bytes: &[u8]) -> Result<Vec<CellFormat>> {
    let mut xml = xml(bytes);
    let mut custom: BTreeMap<Vec<u8>, String> = BTreeMap::new();
    let mut formats = Vec::new();
    loop {
        match xml.read_event()? {
            Event::Start(e) if e.local_name().as_ref() == b"numFmts" => loop {
                match xml.read_event()? {
                    Event::Start(e) if e.local_name().as_ref() == b"numFmt" => {
                        let mut id = Vec::new();
                        let mut code = String::new();
                        for a in e.attributes() {
                            match a? {
                                Attribute {
                                    key: QName(b"numFmtId"),
                                    value,
                                } => id.extend_from_slice(&value),
                                Attribute {
                                    key: QName(b"formatCode"),
                                    value,
                                } => code = xml.decoder().decode(&value)?.into_owned(),
                                _ => {}
                            }
                        }
                        if !code.is_empty() {
                            custom.insert(id, code);
                        }
                    }
                    Event::End(e) if e.local_name().as_ref() == b"numFmts" => break,
                    Event::Eof => return Err(eof("numFmts")),
                    _ => {}
                }
            },
            Event::Start(e) if e.local_name().as_ref() == b"cellXfs" => loop {
                match xml.read_event()? {
                    Event::Start(e) if e.local_name().as_ref() == b"xf" => formats.push(
                        e.attributes()
                            .filter_map(|a| a.ok())
                            .find(|a| a.key == QName(b"numFmtId"))
                            .map_or(CellFormat::Other, |a| match custom.get(&*a.value) {
                                Some(code) => detect_custom_number_format(code),
                                None => builtin_format_by_id(&a.value),
                            }),
                    ),
                    Event::End(e) if e.local_name().as_ref() == b"cellXfs" => break,
                    Event::Eof => return Err(eof("cellXfs")),
                    _ => {}
                }
            },
            Event::End(e) if e.local_name().as_ref() == b"styleSheet" => return Ok(formats),
            Event::Eof => return Err(eof("styleSheet")),
            _ => {}
        }
    }
}

/// `xl/_rels/workbook.xml.rels`: relationship id → target.
pub fn relationships(bytes: &[u8]) -> Result<BTreeMap<Vec<u8>, String>> {
    let mut xml = xml(bytes);
    let mut relationships = BTreeMap::new();
    loop {
        match xml.read_event()? {
            Event::Start(e) if e.local_name().as_ref() == b"Relationship" => {
                let mut id = Vec::new();
                let mut target = String::new();
                for a in e.attributes() {
                    match a? {
                        Attribute {
                            key: QName(b"Id"),
                            value,
                        } => id.extend_from_slice(&value),
                        Attribute {
                            key: QName(b"Target"),
                            value,
                        } => target = xml.decoder().decode(&value)?.into_owned(),
                        _ => {}
                    }
                }
                relationships.insert(id, target);
            }
            Event::End(e) if e.local_name().as_ref() == b"Relationships" => {
                return Ok(relationships)
            }
            Event::Eof => return Err(eof("Relationships")),
            _ => {}
        }
    }
}

/// The workbook's sheets, in order, and its date system.
#[derive(Debug, Default)]
pub struct Workbook {
    /// Sheet name and part path (`xl/worksheets/sheet1.xml`).
    pub sheets: Vec<(String, String)>,
    /// Dates count from 1904 (`<workbookPr date1904="1">`).
    pub is_1904: bool,
}

impl Workbook {
    /// The part path of the first sheet named `name`.
    pub fn path(&self, name: &str) -> Option<&str> {
        self.sheets
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p.as_str())
    }
}

/// `xl/workbook.xml`: the sheets (each resolved through `relationships` to
/// a worksheet, chart sheet or dialog sheet part) and the date system.
/// Defined names are read only to refuse broken ones, as calamine does.
pub fn workbook(bytes: &[u8], relationships: &BTreeMap<Vec<u8>, String>) -> Result<Workbook> {
    let mut xml = xml(bytes);
    let mut book = Workbook::default();
    loop {
        match xml.read_event()? {
            Event::Start(e) if e.local_name().as_ref() == b"sheet" => {
                let mut name = String::new();
                let mut path = String::new();
                for a in e.attributes() {
                    let a = a?;
                    match a.key {
                        QName(b"name") => name = a.decode_and_unescape_value(&xml)?.into_owned(),
                        QName(b"state") => match a.decode_and_unescape_value(&xml)?.as_ref() {
                            "visible" | "hidden" | "veryHidden" => {}
                            v => return Err(error(format!("unknown sheet state {v:?}"))),
                        },
                        QName(b"r:id" | b"relationships:id") => {
                            let target = relationships
                                .get(&*a.value)
                                .ok_or_else(|| error("a sheet's relationship is missing"))?;
                            path = match target.strip_prefix('/') {
                                Some(rest) if rest.starts_with("xl/") => rest.to_string(),
                                _ if target.starts_with("xl/") => target.clone(),
                                _ => format!("xl/{target}"),
                            };
                        }
                        _ => {}
                    }
                }
                match path.split('/').nth(1) {
                    Some("worksheets" | "chartsheets" | "dialogsheets") => {}
                    _ => return Err(error(format!("sheet {name:?} is at {path:?}"))),
                }
                book.sheets.push((name, path));
            }
            Event::Start(e) if e.name().as_ref() == b"workbookPr" => {
                book.is_1904 = match e.try_get_attribute("date1904")? {
                    Some(a) => ["1", "true"].contains(&a.decode_and_unescape_value(&xml)?.as_ref()),
                    None => false,
                };
            }
            Event::Start(e) if e.local_name().as_ref() == b"definedName" => {
                if let Some(a) = e
                    .attributes()
                    .filter_map(|a| a.ok())
                    .find(|a| a.key == QName(b"name"))
                {
                    a.decode_and_unescape_value(&xml)?;
                    text_until_end(&mut xml, e.name())?;
                }
            }
            Event::End(e) if e.local_name().as_ref() == b"workbook" => return Ok(book),
            Event::Eof => return Err(eof("workbook")),
            _ => {}
        }
    }
}

/// `(row, column)`, both zero-based, of a reference such as `B12`; the
/// column is `None` when the reference has only a row. Arithmetic wraps on
/// absurd lengths, as calamine's release build does; the row limit then
/// refuses the cell.
fn row_and_column(reference: &[u8]) -> Result<(u32, Option<u32>)> {
    let (mut row, mut col) = (0u32, 0u32);
    let mut pow = 1u32;
    let mut reading_row = true;
    for &c in reference.iter().rev() {
        match c {
            b'0'..=b'9' => {
                if !reading_row {
                    return Err(error("a digit inside a column name"));
                }
                row = row.wrapping_add(u32::from(c - b'0').wrapping_mul(pow));
                pow = pow.wrapping_mul(10);
            }
            b'A'..=b'Z' | b'a'..=b'z' => {
                if reading_row {
                    if row == 0 {
                        return Err(error("a cell reference without a row"));
                    }
                    pow = 1;
                    reading_row = false;
                }
                let letter = u32::from(c.to_ascii_uppercase() - b'A') + 1;
                col = col.wrapping_add(letter.wrapping_mul(pow));
                pow = pow.wrapping_mul(26);
            }
            _ => return Err(error(format!("{:?} in a cell reference", c as char))),
        }
    }
    let row = row
        .checked_sub(1)
        .ok_or_else(|| error("a cell reference without a row"))?;
    Ok((row, col.checked_sub(1)))
}

fn cell_position(reference: &[u8]) -> Result<(u32, u32)> {
    match row_and_column(reference)? {
        (row, Some(col)) => Ok((row, col)),
        (_, None) => Err(error("a cell reference without a column")),
    }
}

/// A `<dimension ref>`: one or two cell references.
fn check_dimension(reference: &[u8]) -> Result<()> {
    let mut parts = 0;
    for part in reference.split(|&c| c == b':') {
        cell_position(part)?;
        parts += 1;
    }
    if parts > 2 {
        return Err(error(format!("a dimension of {parts} parts")));
    }
    Ok(())
}

/// The cell error values a `t="e"` cell may hold.
fn is_cell_error(v: &str) -> bool {
    matches!(
        v,
        "#DIV/0!" | "#N/A" | "#NAME?" | "#NULL!" | "#NUM!" | "#REF!" | "#VALUE!"
    )
}

const MS_PER_DAY: f64 = 24.0 * 60.0 * 60.0 * 1000.0;

/// A date-formatted serial number as an ISO date (`2024-03-01`) or date
/// and time (`2024-03-01T08:30:00`, milliseconds when there are any): from
/// 1899-12-30, or 1904-01-01 in the 1904 system, with Excel's phantom
/// 1900-02-29 (serials below 60 are a day off). The number itself when the
/// date is out of range.
fn date_value(serial: f64, is_1904: bool) -> Value {
    let days = if is_1904 { serial + 1462.0 } else { serial };
    let days = if days >= 60.0 { days } else { days + 1.0 };
    let epoch = chrono::NaiveDate::from_ymd_opt(1899, 12, 30)
        .expect("a valid date")
        .and_time(chrono::NaiveTime::MIN);
    let at = chrono::TimeDelta::try_milliseconds((days * MS_PER_DAY).round() as i64)
        .and_then(|d| epoch.checked_add_signed(d));
    match at {
        Some(t) => {
            let iso = t.to_string().replacen(' ', "T", 1);
            Value::Date(match iso.strip_suffix("T00:00:00") {
                Some(date) => date.to_string(),
                None => iso,
            })
        }
        None => Value::Number(serial),
    }
}

fn text(s: Cow<'_, str>) -> Option<Value> {
    (!s.is_empty()).then(|| Value::Text(s.into_owned()))
}

/// One cell as [`Cells::next_cell`] yields it: its zero-based (row,
/// column) and its value.
pub type Cell = ((u32, u32), Option<Value>);

/// A worksheet's cells in document order.
pub struct Cells<'a> {
    xml: Reader<&'a [u8]>,
    strings: &'a [String],
    formats: &'a [CellFormat],
    is_1904: bool,
    row: u32,
    col: u32,
}

impl<'a> Cells<'a> {
    /// Reads up to `<sheetData>`; a part without one (a chart sheet) is
    /// not a worksheet.
    pub fn new(
        bytes: &'a [u8],
        strings: &'a [String],
        formats: &'a [CellFormat],
        is_1904: bool,
    ) -> Result<Self> {
        let mut xml = xml(bytes);
        let mut first: Option<String> = None;
        loop {
            match xml.read_event()? {
                Event::Start(e) => match e.local_name().as_ref() {
                    b"dimension" => {
                        let mut found = false;
                        for a in e.attributes() {
                            let a = a?;
                            if a.key == QName(b"ref") {
                                check_dimension(&a.value)?;
                                found = true;
                                break;
                            }
                        }
                        if !found {
                            return Err(error("a <dimension> without ref"));
                        }
                    }
                    b"sheetData" => break,
                    other => {
                        first.get_or_insert_with(|| String::from_utf8_lossy(other).into_owned());
                    }
                },
                Event::Eof => {
                    return Err(match first {
                        Some(root) => error(format!("a <{root}> is not a worksheet")),
                        None => eof("worksheet"),
                    })
                }
                _ => {}
            }
        }
        Ok(Self {
            xml,
            strings,
            formats,
            is_1904,
            row: 0,
            col: 0,
        })
    }

    /// The next `<c>`: its position and value (`None` when empty, an error
    /// value, or a formula without a cached result); `None` after the
    /// last.
    pub fn next_cell(&mut self) -> Result<Option<Cell>> {
        loop {
            match self.xml.read_event()? {
                Event::Start(e) if e.local_name().as_ref() == b"row" => {
                    if let Some(r) = attribute(e.attributes(), b"r")? {
                        self.row = row_and_column(r)?.0;
                    }
                }
                Event::End(e) if e.local_name().as_ref() == b"row" => {
                    self.row = self.row.wrapping_add(1);
                    self.col = 0;
                }
                Event::Start(c) if c.local_name().as_ref() == b"c" => {
                    let position = match attribute(c.attributes(), b"r")? {
                        Some(r) => {
                            let (row, col) = cell_position(r)?;
                            self.col = col;
                            (row, col)
                        }
                        None => (self.row, self.col),
                    };
                    let mut value = None;
                    loop {
                        match self.xml.read_event()? {
                            Event::Start(e) => value = self.value(&e, &c)?,
                            Event::End(e) if e.local_name().as_ref() == b"c" => break,
                            Event::Eof => return Err(eof("c")),
                            _ => {}
                        }
                    }
                    self.col = self.col.wrapping_add(1);
                    return Ok(Some((position, value)));
                }
                Event::End(e) if e.local_name().as_ref() == b"sheetData" => return Ok(None),
                Event::Eof => return Err(eof("sheetData")),
                _ => {}
            }
        }
    }

    /// One child of `<c>`: an inline string, a value, or a formula (whose
    /// text is skipped).
    fn value(&mut self, e: &BytesStart<'_>, c: &BytesStart<'_>) -> Result<Option<Value>> {
        match e.local_name().as_ref() {
            b"is" => Ok(string(&mut self.xml, e.name().as_ref())?.and_then(|s| text(s.into()))),
            b"v" => {
                let v = text_until_end(&mut self.xml, e.name())?;
                self.typed(v, c)
            }
            b"f" => {
                self.xml.read_to_end(e.name())?;
                Ok(None)
            }
            _ => Err(error("expecting <v>, <f> or <is> in a cell")),
        }
    }

    /// A `<v>`'s text as the cell's type (`t`) and number format (`s`)
    /// make it.
    fn typed(&self, v: Cow<'_, str>, c: &BytesStart<'_>) -> Result<Option<Value>> {
        let format = match attribute(c.attributes(), b"s") {
            Ok(Some(style)) => {
                let id: usize = std::str::from_utf8(style)
                    .unwrap_or("0")
                    .parse()
                    .unwrap_or(0);
                self.formats.get(id).copied()
            }
            _ => Some(CellFormat::Other),
        };
        let number = |n: f64| match format {
            Some(CellFormat::DateTime) => date_value(n, self.is_1904),
            _ => Value::Number(n),
        };
        match attribute(c.attributes(), b"t")? {
            Some(b"s") => {
                let index: usize = v.parse()?;
                let s = self.strings.get(index).ok_or_else(|| {
                    error(format!(
                        "shared string {index} is past the table of {}",
                        self.strings.len()
                    ))
                })?;
                Ok((!s.is_empty()).then(|| Value::Text(s.clone())))
            }
            Some(b"b") => Ok(Some(Value::Bool(v != "0"))),
            Some(b"e") if is_cell_error(&v) => Ok(None),
            Some(b"e") => Err(error(format!("unknown cell error {v:?}"))),
            Some(b"d") => Ok(Some(Value::Date(v.into_owned()))),
            Some(b"str") => Ok(match v.parse() {
                Ok(n) => Some(Value::Number(n)),
                Err(_) => text(v),
            }),
            Some(b"n") if v.is_empty() => Ok(None),
            Some(b"n") => Ok(Some(number(v.parse()?))),
            None => Ok(match v.parse() {
                Ok(n) => Some(number(n)),
                Err(_) => text(v),
            }),
            Some(t) => Err(error(format!(
                "unknown cell type {:?}",
                String::from_utf8_lossy(t)
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `attribute` finds what quick-xml's checked iterator finds, and
    /// refuses where it refuses: a repeated name before the one looked
    /// for (on the stack or past it), not one after it.
    #[test]
    fn attribute_lookup_agrees_with_quick_xmls_checked_iterator() {
        fn checked(e: &BytesStart<'_>, name: &[u8]) -> std::result::Result<Option<Vec<u8>>, ()> {
            for a in e.attributes() {
                let a = a.map_err(drop)?;
                if a.key == QName(name) {
                    return Ok(Some(a.value.into_owned()));
                }
            }
            Ok(None)
        }
        let many: String = (0..12).map(|i| format!(" a{i}=\"{i}\"")).collect();
        let cases = [
            r#"<c r="A1" s="2" t="s">"#.to_string(),
            r#"<c s="1" s="2" r="A1">"#.to_string(),
            r#"<c r="A1" r="B2">"#.to_string(),
            r#"<c t="n" r="A1" t="s">"#.to_string(),
            format!("<c{many} r=\"C3\">"),
            format!("<c{many} a3=\"x\" r=\"C3\">"),
            format!("<c{many} a10=\"x\" r=\"C3\">"),
            format!("<c r=\"C3\"{many} a10=\"x\">"),
            r#"<c r="A1" broken>"#.to_string(),
            r#"<c broken r="A1">"#.to_string(),
        ];
        for case in &cases {
            let mut xml = xml(case.as_bytes());
            let Ok(Event::Start(e)) = xml.read_event() else {
                panic!("{case}")
            };
            for name in [b"r".as_slice(), b"s", b"t", b"a11"] {
                let ours = attribute(e.attributes(), name)
                    .map(|v| v.map(<[u8]>::to_vec))
                    .map_err(drop);
                assert_eq!(ours, checked(&e, name), "{case} {:?}", name);
            }
        }
    }

    #[test]
    fn references_read_as_calamine_reads_them() {
        assert_eq!(row_and_column(b"A1").unwrap(), (0, Some(0)));
        assert_eq!(row_and_column(b"b12").unwrap(), (11, Some(1)));
        assert_eq!(row_and_column(b"AA3").unwrap(), (2, Some(26)));
        assert_eq!(
            row_and_column(b"XFD1048576").unwrap(),
            (1_048_575, Some(16_383))
        );
        assert_eq!(row_and_column(b"7").unwrap(), (6, None));
        for bad in [&b"A0"[..], b"A", b"1A", b"A-1", b""] {
            assert!(row_and_column(bad).is_err(), "{:?}", bad);
        }
    }

    #[test]
    fn number_formats_table() {
        let cases = [
            ("DD/MM/YY", CellFormat::DateTime),
            ("H:MM:SS;@", CellFormat::DateTime),
            ("#,##0\\ [$\\u20bd-46D]", CellFormat::Other),
            ("[h]:mm:ss", CellFormat::TimeDelta),
            ("\"$\"#,##0_);[Red](\"$\"#,##0)", CellFormat::Other),
            ("[>=100][Magenta][s].00", CellFormat::TimeDelta),
            ("[>=100][Magenta]General", CellFormat::Other),
            ("ha/p\\\\m", CellFormat::DateTime),
            ("0.00", CellFormat::Other),
        ];
        for (code, want) in cases {
            assert_eq!(detect_custom_number_format(code), want, "{code}");
        }
        assert_eq!(builtin_format_by_id(b"14"), CellFormat::DateTime);
        assert_eq!(builtin_format_by_id(b"46"), CellFormat::TimeDelta);
        assert_eq!(builtin_format_by_id(b"2"), CellFormat::Other);
    }

    #[test]
    fn dates_in_both_systems_and_excels_phantom_leap_day() {
        let date = |serial, is_1904| date_value(serial, is_1904);
        assert_eq!(date(45352.0, false), Value::Date("2024-03-01".into()));
        assert_eq!(date(43890.0, true), Value::Date("2024-03-01".into()));
        assert_eq!(
            date(45352.5, false),
            Value::Date("2024-03-01T12:00:00".into())
        );
        assert_eq!(
            date(45352.0 + 1.5 / 86400.0, false),
            Value::Date("2024-03-01T00:00:01.500".into())
        );
        assert_eq!(date(1.0, false), Value::Date("1900-01-01".into()));
        assert_eq!(date(61.0, false), Value::Date("1900-03-01".into()));
        assert_eq!(
            date(f64::NEG_INFINITY, false),
            Value::Number(f64::NEG_INFINITY)
        );
    }

    #[test]
    fn rich_text_joins_its_runs_and_leaves_phonetic_runs_out() {
        let sst = br#"<sst><si><r><t>Main </t></r><r><rPr><b/></rPr><t>Street</t></r><rPh><t>x</t></rPh></si><si><t>a &amp; b</t><t>ignored</t></si><si><rPh><t>only</t></rPh></si><si><t/></si></sst>"#;
        assert_eq!(
            shared_strings(sst).unwrap(),
            vec![
                "Main Street".to_string(),
                "a & b".to_string(),
                String::new()
            ]
        );
        assert!(shared_strings(b"<sst><si><t>cut").is_err());
    }
}
