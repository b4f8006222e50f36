//! How commands print: aligned tables, pretty JSON, and sizes, rates and limits in human
//! units.

use serde::Serialize;

use vane_proto::api::Limits;

use crate::cli::{ListArg, Output};

/// Prints a listing as `how` asks: JSON of the items, each item's key alone (`-q`), or a
/// table of their rows.
pub(super) fn listing<T: Serialize>(
    how: ListArg,
    items: Vec<T>,
    header: &[&str],
    key: impl Fn(&T) -> String,
    row: impl FnMut(T) -> Vec<String>,
) {
    if how.output == Output::Json {
        json(&items);
    } else if how.quiet {
        for item in &items {
            println!("{}", one_line(&key(item)));
        }
    } else {
        table(header, items.into_iter().map(row).collect());
    }
}

/// Prints rows as aligned columns under a header, one line per row whatever the cells hold.
pub(super) fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|row| row.iter().map(|cell| one_line(cell)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}   "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// A cell on one line: newlines, tabs and other control characters (a command's script, a
/// name from a tenant's terminal) escaped as Rust writes them (`\n`, `\u{1b}`), so a row
/// cannot break the table or move the terminal's cursor.
pub(super) fn one_line(cell: &str) -> String {
    if !cell.chars().any(char::is_control) {
        return cell.to_string();
    }
    cell.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

pub(super) fn json<T: Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serializes"));
}

/// Bytes in binary units, as limits are given (`256M`).
pub(super) fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["", "K", "M", "G", "T"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}{}", UNITS[u])
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

pub(super) fn human_rate(bits: u64) -> String {
    match bits {
        b if b >= 1_000_000_000 && b % 1_000_000 == 0 => format!("{}Gbit", b as f64 / 1e9),
        b if b >= 1_000_000 => format!("{}Mbit", b as f64 / 1e6),
        b if b >= 1000 => format!("{}kbit", b as f64 / 1e3),
        b => format!("{b}bit"),
    }
}

pub(super) fn limits_summary(l: &Limits) -> String {
    let mut parts = Vec::new();
    if let Some(m) = l.memory {
        parts.push(format!("mem={}", human_bytes(m)));
    }
    if let Some(c) = l.cpu_millis {
        parts.push(format!("cpus={}", c as f64 / 1000.0));
    }
    if let Some(p) = l.pids {
        parts.push(format!("pids={p}"));
    }
    if let Some(b) = l.bandwidth {
        parts.push(format!("bw={}", human_rate(b)));
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

/// How long ago `then` was, both Unix seconds, in the largest whole unit (`42s`, `5m`,
/// `3h`, `2d`).
pub(super) fn age(now: u64, then: u64) -> String {
    let s = now.saturating_sub(then);
    match s {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::{age, one_line};

    #[test]
    fn ages_are_in_their_largest_whole_unit() {
        assert_eq!(age(100, 58), "42s");
        assert_eq!(age(4000, 100), "1h");
        assert_eq!(age(1000, 100), "15m");
        assert_eq!(age(3 * 86_400 + 5, 0), "3d");
        assert_eq!(age(0, 10), "0s");
    }

    #[test]
    fn cells_with_control_characters_stay_on_one_line() {
        assert_eq!(one_line("sleep infinity"), "sleep infinity");
        assert_eq!(one_line("x\ny\tz"), "x\\ny\\tz");
        assert_eq!(one_line("\u{1b}[2J"), "\\u{1b}[2J");
        assert_eq!(one_line("h\u{e9}llo"), "h\u{e9}llo");
    }
}
