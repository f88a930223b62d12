//! The offline form's object map (§6): the `Tririga Object Map` worksheet
//! interpreted into a record layout ([`parse`]), then applied to the
//! workbook's cells ([`extract`]). Both are pure functions over [`Sheet`]s.
//!
//! | tag | properties |
//! |---|---|
//! | `Excel to Tririga` | module, business object, action (optional) |
//! | `Field` | field name, `Sheet!Cell` (root) or column letter (association) |
//! | `Association` | name, module, business object, `Sheet!FirstRow` |
//! | `End` | closes the innermost open Association or root |

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::reject::{Checked, Reason, Rejection};
use crate::value::Value;

/// The worksheet holding the object map.
pub const MAP_SHEET: &str = "Tririga Object Map";

/// The cells of one worksheet: (row, column), both zero-based, to value.
/// Empty cells are absent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sheet {
    /// Non-empty cells.
    pub cells: BTreeMap<(u32, u32), Value>,
}

impl Sheet {
    /// The value at (row, col), zero-based.
    pub fn get(&self, row: u32, col: u32) -> Option<&Value> {
        self.cells.get(&(row, col))
    }

    /// The last row holding a value, if any.
    pub fn last_row(&self) -> Option<u32> {
        self.cells.keys().next_back().map(|(r, _)| *r)
    }
}

/// The worksheets read from a workbook, by name.
pub type Book = HashMap<String, Sheet>;

/// A root field: where its value is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldRef {
    /// Field name.
    pub name: String,
    /// Worksheet name.
    pub sheet: String,
    /// Zero-based row.
    pub row: u32,
    /// Zero-based column.
    pub col: u32,
}

/// An association: a table of child records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssociationMap {
    /// Association name.
    pub name: String,
    /// Module of the child records.
    pub module: String,
    /// Business object of the child records.
    pub business_object: String,
    /// Worksheet of the table.
    pub sheet: String,
    /// Zero-based first row of the table.
    pub first_row: u32,
    /// Field name and zero-based column, per child field.
    pub fields: Vec<(String, u32)>,
}

/// The layout of the record a form creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMap {
    /// Module of the root record.
    pub module: String,
    /// Business object of the root record.
    pub business_object: String,
    /// Action named by the map, if any.
    pub action: Option<String>,
    /// Root fields.
    pub fields: Vec<FieldRef>,
    /// Child tables.
    pub associations: Vec<AssociationMap>,
}

impl ObjectMap {
    /// Every worksheet the map refers to.
    pub fn sheets(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .fields
            .iter()
            .map(|f| f.sheet.clone())
            .chain(self.associations.iter().map(|a| a.sheet.clone()))
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// Field name to value, in map order; absent (empty) cells are left out.
pub type Fields = Vec<(String, Value)>;

/// A child record read from an association's table.
#[derive(Debug, Clone, PartialEq)]
pub struct Child {
    /// Association name.
    pub association: String,
    /// Module.
    pub module: String,
    /// Business object.
    pub business_object: String,
    /// Its fields.
    pub fields: Fields,
}

/// The record a form describes, with its values.
#[derive(Debug, Clone, PartialEq)]
pub struct Form {
    /// Module of the root record.
    pub module: String,
    /// Business object of the root record.
    pub business_object: String,
    /// Action named by the map, if any.
    pub action: Option<String>,
    /// Root fields.
    pub fields: Fields,
    /// Child records.
    pub children: Vec<Child>,
}

impl Form {
    /// The root field of that name.
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.fields.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }
}

fn malformed(detail: String) -> Rejection {
    Rejection::new(Reason::MalformedMap, detail)
}

/// A cell as map text (tags and properties are text; numbers are accepted
/// where a name is expected and printed plainly).
fn text(v: &Value) -> String {
    match v {
        Value::Text(s) | Value::Date(s) => s.trim().to_string(),
        other => other.canonical(),
    }
}

/// Parses a column name (`B`, `AA`, `$C`) into a zero-based index.
pub fn parse_column(s: &str) -> Option<u32> {
    let s = s.trim().trim_start_matches('$');
    if s.is_empty() || s.len() > 3 || !s.bytes().all(|b| b.is_ascii_alphabetic()) {
        return None;
    }
    let mut col: u32 = 0;
    for b in s.bytes() {
        col = col * 26 + u32::from(b.to_ascii_uppercase() - b'A' + 1);
    }
    (col <= 16_384).then(|| col - 1)
}

/// Parses `Sheet!B2` (`'My Sheet'!$B$2` too) into sheet, zero-based row and
/// column.
pub fn parse_cell_ref(s: &str) -> Option<(String, u32, u32)> {
    let s = s.trim();
    let bang = s.rfind('!')?;
    let (sheet, cell) = (&s[..bang], &s[bang + 1..]);
    let sheet = match sheet.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')) {
        Some(quoted) => quoted.replace("''", "'"),
        None => sheet.to_string(),
    };
    if sheet.is_empty() {
        return None;
    }
    let cell = cell.replace('$', "");
    let split = cell.find(|c: char| c.is_ascii_digit())?;
    let col = parse_column(&cell[..split])?;
    let row: u32 = cell[split..].parse().ok()?;
    if row == 0 || row > 1_048_576 {
        return None;
    }
    Some((sheet, row - 1, col))
}

struct OpenAssociation {
    map: AssociationMap,
    row: u32,
}

/// Interprets the object map worksheet. Tags and names are case-sensitive.
pub fn parse(sheet: &Sheet) -> Checked<ObjectMap> {
    // Rows in order, each as its cells left to right.
    let mut rows: BTreeMap<u32, Vec<(u32, &Value)>> = BTreeMap::new();
    for ((r, c), v) in &sheet.cells {
        rows.entry(*r).or_default().push((*c, v));
    }
    let mut root: Option<ObjectMap> = None;
    let mut closed = false;
    let mut open: Option<OpenAssociation> = None;
    let mut root_row = 0;
    // Field names seen in the root and in the open association: a set, not a
    // scan of the fields so far (a 100,000-row map was quadratic; tests/corpus).
    let mut root_names: HashSet<String> = HashSet::new();
    let mut assoc_names: HashSet<String> = HashSet::new();
    for (r, cells) in rows {
        let line = r + 1;
        let (tag_col, tag_value) = cells[0];
        let tag = text(tag_value);
        if tag.is_empty() {
            continue;
        }
        let prop = |i: u32| -> Option<String> {
            sheet
                .get(r, tag_col + i)
                .map(text)
                .filter(|s| !s.is_empty())
        };
        let need = |i: u32, what: &str| -> Checked<String> {
            prop(i).ok_or_else(|| malformed(format!("row {line}: {tag} needs {what}")))
        };
        if closed {
            return Err(malformed(format!("row {line}: {tag} after the root's End")));
        }
        match tag.as_str() {
            "Excel to Tririga" => {
                if root.is_some() {
                    return Err(malformed(format!(
                        "row {line}: a second Excel to Tririga inside the root"
                    )));
                }
                root_row = line;
                root = Some(ObjectMap {
                    module: need(1, "a module")?,
                    business_object: need(2, "a business object")?,
                    action: prop(3),
                    fields: Vec::new(),
                    associations: Vec::new(),
                });
            }
            "Field" => {
                let name = need(1, "a field name")?;
                let target = need(2, "a cell reference")?;
                if let Some(assoc) = open.as_mut() {
                    let col = parse_column(&target).ok_or_else(|| {
                        malformed(format!(
                            "row {line}: bad column {target:?} for field {name}"
                        ))
                    })?;
                    if !assoc_names.insert(name.clone()) {
                        return Err(malformed(format!("row {line}: field {name} mapped twice")));
                    }
                    assoc.map.fields.push((name, col));
                } else if let Some(root) = root.as_mut() {
                    let (sheet, row, col) = parse_cell_ref(&target).ok_or_else(|| {
                        malformed(format!(
                            "row {line}: bad cell reference {target:?} for field {name}"
                        ))
                    })?;
                    if !root_names.insert(name.clone()) {
                        return Err(malformed(format!("row {line}: field {name} mapped twice")));
                    }
                    root.fields.push(FieldRef {
                        name,
                        sheet,
                        row,
                        col,
                    });
                } else {
                    return Err(malformed(format!(
                        "row {line}: Field outside Excel to Tririga"
                    )));
                }
            }
            "Association" => {
                if root.is_none() {
                    return Err(malformed(format!(
                        "row {line}: Association outside Excel to Tririga"
                    )));
                }
                if open.is_some() {
                    return Err(malformed(format!(
                        "row {line}: nested Association is not supported"
                    )));
                }
                let name = need(1, "a name")?;
                let module = need(2, "a module")?;
                let business_object = need(3, "a business object")?;
                let target = need(4, "a Sheet!FirstRow reference")?;
                let (sheet, first_row, _) = parse_cell_ref(&target).ok_or_else(|| {
                    malformed(format!(
                        "row {line}: bad cell reference {target:?} for association {name}"
                    ))
                })?;
                assoc_names.clear();
                open = Some(OpenAssociation {
                    map: AssociationMap {
                        name,
                        module,
                        business_object,
                        sheet,
                        first_row,
                        fields: Vec::new(),
                    },
                    row: line,
                });
            }
            "End" => {
                if let Some(assoc) = open.take() {
                    if let Some(root) = root.as_mut() {
                        root.associations.push(assoc.map);
                    }
                } else if root.is_some() {
                    closed = true;
                } else {
                    return Err(malformed(format!("row {line}: End without an open root")));
                }
            }
            other => return Err(malformed(format!("row {line}: unknown tag {other:?}"))),
        }
    }
    if let Some(assoc) = open {
        return Err(malformed(format!(
            "association {} opened at row {} is not closed by End",
            assoc.map.name, assoc.row
        )));
    }
    match root {
        None => Err(malformed("no Excel to Tririga root".into())),
        Some(_) if !closed => Err(malformed(format!(
            "root opened at row {root_row} is not closed by End"
        ))),
        Some(root) => Ok(root),
    }
}

/// Reads the map's cells from the workbook: root fields, and one child per
/// row of each association's table until its first empty row.
pub fn extract(map: &ObjectMap, book: &Book) -> Checked<Form> {
    let sheet = |name: &str| {
        book.get(name).ok_or_else(|| {
            malformed(format!(
                "the map refers to worksheet {name:?}, which does not exist"
            ))
        })
    };
    let mut fields = Vec::new();
    for f in &map.fields {
        if let Some(v) = sheet(&f.sheet)?.get(f.row, f.col) {
            fields.push((f.name.clone(), v.clone()));
        }
    }
    let mut children = Vec::new();
    for a in &map.associations {
        let table = sheet(&a.sheet)?;
        let last = table.last_row().unwrap_or(0);
        let mut row = a.first_row;
        while row <= last {
            let child: Fields = a
                .fields
                .iter()
                .filter_map(|(name, col)| table.get(row, *col).map(|v| (name.clone(), v.clone())))
                .collect();
            if child.is_empty() {
                break;
            }
            children.push(Child {
                association: a.name.clone(),
                module: a.module.clone(),
                business_object: a.business_object.clone(),
                fields: child,
            });
            row += 1;
        }
    }
    Ok(Form {
        module: map.module.clone(),
        business_object: map.business_object.clone(),
        action: map.action.clone(),
        fields,
        children,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Value {
        Value::Text(s.into())
    }

    /// A sheet from rows of optional text cells, starting at A1.
    fn sheet(rows: &[&[&str]]) -> Sheet {
        let mut s = Sheet::default();
        for (r, row) in rows.iter().enumerate() {
            for (c, cell) in row.iter().enumerate() {
                if !cell.is_empty() {
                    s.cells.insert((r as u32, c as u32), t(cell));
                }
            }
        }
        s
    }

    const GOOD: &[&[&str]] = &[
        &[
            "Excel to Tririga",
            "triContract",
            "triLeaseAbstract",
            "CREATE",
        ],
        &["Field", "triIdTX", "Lease!B1"],
        &["", "Field", "triNameTX", "'Lease'!$B$2"],
        &[],
        &[
            "Association",
            "Payments",
            "triPayment",
            "triPaymentSchedule",
            "Payments!A2",
        ],
        &["Field", "triAmountNU", "B"],
        &["Field", "triDueDA", "$C"],
        &["End"],
        &["End"],
    ];

    #[test]
    fn parses_a_root_with_fields_and_an_association() {
        let map = parse(&sheet(GOOD)).unwrap();
        assert_eq!(map.module, "triContract");
        assert_eq!(map.business_object, "triLeaseAbstract");
        assert_eq!(map.action.as_deref(), Some("CREATE"));
        assert_eq!(
            map.fields,
            vec![
                FieldRef {
                    name: "triIdTX".into(),
                    sheet: "Lease".into(),
                    row: 0,
                    col: 1
                },
                FieldRef {
                    name: "triNameTX".into(),
                    sheet: "Lease".into(),
                    row: 1,
                    col: 1
                },
            ]
        );
        assert_eq!(map.associations.len(), 1);
        let a = &map.associations[0];
        assert_eq!(
            (a.name.as_str(), a.sheet.as_str(), a.first_row),
            ("Payments", "Payments", 1)
        );
        assert_eq!(
            a.fields,
            vec![("triAmountNU".into(), 1), ("triDueDA".into(), 2)]
        );
        assert_eq!(
            map.sheets(),
            vec!["Lease".to_string(), "Payments".to_string()]
        );
    }

    #[test]
    fn malformed_maps_are_rejected_with_what_is_wrong() {
        let cases: &[(&[&[&str]], &str)] = &[
            (&[], "no Excel to Tririga root"),
            (
                &[
                    &["Excel to Tririga", "m", "bo"],
                    &["Feild", "x", "S!A1"],
                    &["End"],
                ],
                "unknown tag \"Feild\"",
            ),
            (&[&["excel to tririga", "m", "bo"], &["End"]], "unknown tag"),
            (
                &[&["Excel to Tririga", "m", "bo"], &["Field", "x", "S!A1"]],
                "not closed by End",
            ),
            (
                &[
                    &["Excel to Tririga", "m", "bo"],
                    &["Association", "a", "m", "b", "S!A2"],
                ],
                "association a opened at row 2 is not closed",
            ),
            (
                &[
                    &["Excel to Tririga", "m", "bo"],
                    &["Association", "a", "m", "b", "S!A2"],
                    &["End"],
                ],
                "root opened at row 1 is not closed",
            ),
            (
                &[
                    &["Excel to Tririga", "m", "bo"],
                    &["Field", "x", "B2"],
                    &["End"],
                ],
                "bad cell reference \"B2\"",
            ),
            (
                &[
                    &["Excel to Tririga", "m", "bo"],
                    &["Field", "x", "S!2B"],
                    &["End"],
                ],
                "bad cell reference",
            ),
            (
                &[
                    &["Excel to Tririga", "m", "bo"],
                    &["Field", "x", "S!A0"],
                    &["End"],
                ],
                "bad cell reference",
            ),
            (
                &[
                    &["Excel to Tririga", "m", "bo"],
                    &["Association", "a", "m", "b", "S!A2"],
                    &["Field", "x", "S!A1"],
                    &["End"],
                    &["End"],
                ],
                "bad column",
            ),
            (
                &[&["Excel to Tririga", "m"], &["End"]],
                "needs a business object",
            ),
            (&[&["Field", "x", "S!A1"]], "Field outside"),
            (&[&["End"]], "End without an open root"),
            (
                &[
                    &["Excel to Tririga", "m", "bo"],
                    &["End"],
                    &["Field", "x", "S!A1"],
                ],
                "after the root's End",
            ),
            (
                &[
                    &["Excel to Tririga", "m", "bo"],
                    &["Field", "x", "S!A1"],
                    &["Field", "x", "S!A2"],
                    &["End"],
                ],
                "mapped twice",
            ),
            (
                &[
                    &["Excel to Tririga", "m", "bo"],
                    &["Association", "a", "m", "b", "S!A2"],
                    &["Association", "c", "m", "b", "S!A2"],
                    &["End"],
                    &["End"],
                    &["End"],
                ],
                "nested Association",
            ),
        ];
        for (rows, want) in cases {
            let err = parse(&sheet(rows)).unwrap_err();
            assert_eq!(err.reason, Reason::MalformedMap);
            assert!(
                err.detail.contains(want),
                "{rows:?}: {} should contain {want}",
                err.detail
            );
        }
    }

    #[test]
    fn cell_references_table() {
        let cases = [
            ("Lease!B2", Some(("Lease", 1, 1))),
            ("'My Sheet'!$AA$10", Some(("My Sheet", 9, 26))),
            ("'It''s'!A1", Some(("It's", 0, 0))),
            ("A!XFD1048576", Some(("A", 1_048_575, 16_383))),
            ("A!XFE1", None),
            ("A!B", None),
            ("!B2", None),
            ("Lease", None),
            ("A!B1048577", None),
        ];
        for (input, want) in cases {
            let got = parse_cell_ref(input);
            assert_eq!(got, want.map(|(s, r, c)| (s.to_string(), r, c)), "{input}");
        }
        assert_eq!(parse_column("a"), Some(0));
        assert_eq!(parse_column("Z"), Some(25));
        assert_eq!(parse_column("1"), None);
    }

    #[test]
    fn extract_reads_typed_values_and_child_rows_until_an_empty_row() {
        let map = parse(&sheet(GOOD)).unwrap();
        let mut lease = Sheet::default();
        lease.cells.insert((0, 1), t("L-1"));
        // B2 (triNameTX) empty: absent, not an empty string.
        let mut pay = Sheet::default();
        for (r, amount) in [(1u32, 10.5), (2, 20.0), (3, 30.0)] {
            pay.cells.insert((r, 1), Value::Number(amount));
            pay.cells
                .insert((r, 2), Value::Date(format!("2024-0{r}-01")));
        }
        pay.cells.insert((5, 1), Value::Number(99.0)); // after an empty row: not read
        let book: Book = [("Lease".to_string(), lease), ("Payments".to_string(), pay)].into();
        let form = extract(&map, &book).unwrap();
        assert_eq!(form.fields, vec![("triIdTX".to_string(), t("L-1"))]);
        assert_eq!(form.field("triNameTX"), None);
        assert_eq!(form.children.len(), 3);
        assert_eq!(
            form.children[2].fields[0],
            ("triAmountNU".to_string(), Value::Number(30.0))
        );
        assert_eq!(form.children[0].association, "Payments");
        let missing: Book = HashMap::new();
        assert_eq!(
            extract(&map, &missing).unwrap_err().reason,
            Reason::MalformedMap
        );
    }
}
