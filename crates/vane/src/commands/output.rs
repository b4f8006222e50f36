//! How commands print: aligned tables, pretty JSON, and sizes, rates and limits in human
//! units.

use serde::Serialize;

use vane_proto::api::Limits;

/// Prints rows as aligned columns under a header.
pub(super) fn table(header: &[&str], rows: Vec<Vec<String>>) {
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
