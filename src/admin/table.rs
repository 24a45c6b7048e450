//! Result sets the console sends: RowDescription, DataRows, CommandComplete, all in text format.

use bytes::{BufMut, BytesMut};

/// A column's type as the client sees it.
#[derive(Clone, Copy)]
pub enum Kind {
    Text,
    /// int8: counts, sizes, microseconds.
    Int,
}

/// One cell: text, or NULL.
pub type Cell = Option<String>;

pub fn text(value: impl Into<String>) -> Cell {
    Some(value.into())
}

pub fn int(value: impl Into<i128>) -> Cell {
    Some(value.into().to_string())
}

pub const NULL: Cell = None;

/// A result set being written into `out`.
pub struct Table<'a> {
    out: &'a mut BytesMut,
    columns: usize,
}

impl<'a> Table<'a> {
    /// Starts a result set with these columns.
    pub fn new(out: &'a mut BytesMut, columns: &[(&str, Kind)]) -> Table<'a> {
        let start = begin(out, b'T');
        out.put_i16(columns.len() as i16);
        for (name, kind) in columns {
            out.put_slice(name.as_bytes());
            out.put_u8(0);
            out.put_i32(0); // table oid
            out.put_i16(0); // column number
            let (oid, size) = match kind {
                Kind::Text => (25, -1),
                Kind::Int => (20, 8),
            };
            out.put_i32(oid);
            out.put_i16(size);
            out.put_i32(-1); // type modifier
            out.put_i16(0); // text format
        }
        end(out, start);
        Table {
            out,
            columns: columns.len(),
        }
    }

    /// Adds a row; it must have one cell per column.
    pub fn row(&mut self, cells: Vec<Cell>) {
        debug_assert_eq!(cells.len(), self.columns);
        let start = begin(self.out, b'D');
        self.out.put_i16(cells.len() as i16);
        for cell in &cells {
            match cell {
                Some(v) => {
                    self.out.put_i32(v.len() as i32);
                    self.out.put_slice(v.as_bytes());
                }
                None => self.out.put_i32(-1),
            }
        }
        end(self.out, start);
    }

    /// Ends the result set with CommandComplete `SHOW`.
    pub fn finish(self) {
        command_complete(self.out, "SHOW");
    }
}

/// Starts a message: its tag and a length filled in by [`end`].
fn begin(out: &mut BytesMut, tag: u8) -> usize {
    out.put_u8(tag);
    let start = out.len();
    out.put_i32(0);
    start
}

fn end(out: &mut BytesMut, start: usize) {
    let len = (out.len() - start) as i32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn command_complete(out: &mut BytesMut, tag: &str) {
    let start = begin(out, b'C');
    out.put_slice(tag.as_bytes());
    out.put_u8(0);
    end(out, start);
}

pub fn empty_query(out: &mut BytesMut) {
    let start = begin(out, b'I');
    end(out, start);
}

/// A NOTICE with a message and an optional detail.
pub fn notice(out: &mut BytesMut, message: &str, detail: Option<&str>) {
    let start = begin(out, b'N');
    for (field, value) in [
        (b'S', Some("NOTICE")),
        (b'V', Some("NOTICE")),
        (b'C', Some("00000")),
        (b'M', Some(message)),
        (b'D', detail),
    ] {
        if let Some(value) = value {
            out.put_u8(field);
            out.put_slice(value.as_bytes());
            out.put_u8(0);
        }
    }
    out.put_u8(0);
    end(out, start);
}

/// `2026-12-02 14:05:09 UTC`, as PgBouncer shows times.
pub fn timestamp(at: std::time::SystemTime) -> String {
    let secs = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamps_are_calendar_dates() {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_764_684_309);
        assert_eq!(super::timestamp(at), "2025-12-02 14:05:09 UTC");
        assert_eq!(
            super::timestamp(std::time::UNIX_EPOCH),
            "1970-01-01 00:00:00 UTC"
        );
    }
}
