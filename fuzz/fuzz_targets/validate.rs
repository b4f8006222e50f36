//! Untrusted input: a string a user gives the CLI or any client puts in an API request,
//! checked by the validators both ends share (`vane_proto::validate`): names, hostnames,
//! ports, environment pairs, sizes, rates, CPUs, process counts, path variables and their
//! expansion, redirects, volumes, root directories and capabilities. Input: the string
//! (UTF-8); for capability sets, lists split at '|' and ','. Asserts: no panic; what a
//! validator accepts has the properties it promises (a name is a DNS label, a port
//! prints and parses back to itself, limits are within their bounds, accepted paths are
//! absolute and without '..', expansion succeeds exactly when the variables are known).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vane_proto::validate::{self, PortSpec, CAPABILITIES, VARIABLES};

fn is_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// An absolute path (or one starting with `{state}`) without `..` components.
fn is_safe_path(p: &str) -> bool {
    (p.starts_with('/') || p.starts_with("{state}")) && !p.split('/').any(|c| c == "..")
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if validate::name("name", s).is_ok() {
        assert!(is_label(s));
    }
    if validate::hostname(s).is_ok() {
        assert!(s.len() <= 253 && s.split('.').all(is_label));
    }
    match s.parse::<PortSpec>() {
        Ok(p) => {
            assert_ne!(p.port, 0);
            assert_eq!(p.to_string().parse::<PortSpec>(), Ok(p));
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    if let Ok((k, v)) = validate::env_pair(s) {
        assert!(!k.is_empty() && !k.contains('=') && !s.contains('\0'));
        assert_eq!(format!("{k}={v}"), s);
    }
    if let Ok(bytes) = validate::size(s) {
        assert!(bytes >= 4 << 20);
    }
    if let Ok(bits) = validate::rate(s) {
        assert!((8_000..10_000_000_000_000).contains(&bits));
    }
    if let Ok(millis) = validate::cpus(s) {
        assert!((10..=4_096_000).contains(&millis));
    }
    if let Ok(n) = validate::pids(s) {
        assert!(n >= 2);
    }
    let known = validate::variables("value", s);
    let values: Vec<(&str, &str)> = VARIABLES.iter().map(|v| (*v, "x")).collect();
    let expanded = validate::expand("value", s, &values);
    assert_eq!(known.is_ok(), expanded.is_ok());
    if let Ok((target, source)) = validate::redirect(s) {
        assert!(target.starts_with('/') && is_safe_path(&target) && is_safe_path(&source));
        assert!(!target.trim_end_matches('/').is_empty());
    }
    if let Ok(v) = validate::volume(s) {
        assert!(is_safe_path(&v.host) && v.inside.starts_with('/') && is_safe_path(&v.inside));
        // As the CLI and stores write it back, it reads the same.
        assert_eq!(validate::volume(&v.to_string()).ok(), Some(v));
    }
    if validate::rootfs(s).is_ok() {
        assert!(is_safe_path(s) && !s.trim_end_matches('/').is_empty());
    }
    if let Ok(bit) = validate::capability(s) {
        assert!(bit.count_ones() == 1 || bit == (1 << CAPABILITIES.len()) - 1);
    }
    let (add, drop) = s.split_once('|').unwrap_or((s, ""));
    let list = |l: &str| -> Vec<String> { l.split(',').map(str::to_string).collect() };
    if let Ok(set) = validate::capability_set(&list(add), &list(drop)) {
        assert!(set < 1 << CAPABILITIES.len());
        assert_eq!(
            validate::capability_names(set).len(),
            set.count_ones() as usize
        );
    }
});
