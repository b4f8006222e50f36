//! The one edit vane makes to CRIU's images before a restore: the dumped tree's user and UTS
//! namespaces are dropped from them, so that CRIU, run inside the user namespace the
//! restoring agent made, restores the tree into that namespace (with that host's id range)
//! and into a UTS namespace carrying the name the agent sets. An image cannot choose its id
//! mapping: whatever it holds, there is no user namespace left in it to restore.
//!
//! An image file is `IMG_COMMON_MAGIC` and the file's own magic (the inventory: its own
//! alone), then entries, each a little-endian `u32` length and a protobuf message
//! (criu/include/magic.h, images/*.proto).
//! The inventory holds one `inventory_entry`, whose field 3 (`root_ids`) is the root task's
//! `task_kobj_ids_entry`; `ids-1.img` holds the root task's own ids (it is PID 1 of its
//! namespace).

use std::path::Path;

const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const INVENTORY_MAGIC: u32 = 0x5831_3116;
const IDS_MAGIC: u32 = 0x5443_2030;
const CORE_MAGIC: u32 = 0x5505_3847;
/// `core_entry.thread_core`, and its `cg_set`.
const THREAD_CORE: u32 = 5;
const THREAD_CG_SET: u32 = 16;
/// `inventory_entry.root_ids`.
const ROOT_IDS: u32 = 3;
/// `task_kobj_ids_entry` fields: the namespaces the restoring CRIU lends the tree its own.
const UTS_NS_ID: u32 = 8;
const USER_NS_ID: u32 = 10;
const CGROUP_NS_ID: u32 = 11;
const INHERITED: [u32; 3] = [UTS_NS_ID, USER_NS_ID, CGROUP_NS_ID];
/// Image files of the namespaces the tree inherits instead.
const DROPPED_PREFIXES: [&str; 3] = ["userns-", "utsns-", "cgroupns-"];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(Vec<u8>),
    Fixed32([u8; 4]),
}

fn varint(buf: &[u8], at: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*at).ok_or("truncated varint")?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint too long".into())
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn decode(buf: &[u8]) -> Result<Vec<(u32, Value)>, String> {
    let mut at = 0;
    let mut fields = Vec::new();
    while at < buf.len() {
        let key = varint(buf, &mut at)?;
        let field = u32::try_from(key >> 3).map_err(|_| "bad field number")?;
        let take = |at: &mut usize, n: usize| -> Result<Vec<u8>, String> {
            let end = at.checked_add(n).filter(|e| *e <= buf.len());
            let end = end.ok_or("truncated field")?;
            let v = buf[*at..end].to_vec();
            *at = end;
            Ok(v)
        };
        let value = match key & 7 {
            0 => Value::Varint(varint(buf, &mut at)?),
            1 => Value::Fixed64(take(&mut at, 8)?.try_into().expect("8 bytes")),
            2 => {
                let n = varint(buf, &mut at)?;
                Value::Bytes(take(
                    &mut at,
                    usize::try_from(n).map_err(|_| "bad length")?,
                )?)
            }
            5 => Value::Fixed32(take(&mut at, 4)?.try_into().expect("4 bytes")),
            t => return Err(format!("unknown wire type {t}")),
        };
        fields.push((field, value));
    }
    Ok(fields)
}

fn encode(fields: &[(u32, Value)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (field, value) in fields {
        let wire = match value {
            Value::Varint(_) => 0,
            Value::Fixed64(_) => 1,
            Value::Bytes(_) => 2,
            Value::Fixed32(_) => 5,
        };
        put_varint(&mut out, (u64::from(*field) << 3) | wire);
        match value {
            Value::Varint(v) => put_varint(&mut out, *v),
            Value::Fixed64(b) => out.extend_from_slice(b),
            Value::Bytes(b) => {
                put_varint(&mut out, b.len() as u64);
                out.extend_from_slice(b);
            }
            Value::Fixed32(b) => out.extend_from_slice(b),
        }
    }
    out
}

/// The header and the single entry of an image file whose magic is `magic`: most images
/// start with `IMG_COMMON_MAGIC` and their own, the inventory with its own alone.
fn read_entry(path: &Path, magic: u32) -> Result<(Vec<u8>, Vec<u8>), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let word = |i: usize| {
        bytes
            .get(i * 4..i * 4 + 4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
    };
    let header = match (word(0), word(1)) {
        (Some(IMG_COMMON_MAGIC), Some(m)) if m == magic => 8,
        (Some(m), _) if m == magic => 4,
        _ => return Err(format!("{}: not the expected CRIU image", path.display())),
    };
    let truncated = || format!("{}: truncated", path.display());
    let len = word(header / 4).ok_or_else(truncated)? as usize;
    let entry = bytes
        .get(header + 4..header + 4 + len)
        .ok_or_else(truncated)?
        .to_vec();
    Ok((bytes[..header].to_vec(), entry))
}

fn write_entry(path: &Path, header: &[u8], entry: &[u8]) -> Result<(), String> {
    let mut bytes = Vec::with_capacity(header.len() + 4 + entry.len());
    bytes.extend_from_slice(header);
    bytes.extend_from_slice(&(entry.len() as u32).to_le_bytes());
    bytes.extend_from_slice(entry);
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn varint_field(fields: &[(u32, Value)], field: u32) -> Option<u64> {
    fields.iter().find_map(|(f, v)| match v {
        Value::Varint(x) if *f == field => Some(*x),
        _ => None,
    })
}

/// Makes the images in `dir` restore into the restoring CRIU's own user, UTS and cgroup
/// namespaces: the inventory's root namespaces become the root task's, so CRIU sees no
/// namespace of those kinds to create, and their images are removed.
pub fn inherit_namespaces(dir: &Path) -> Result<(), String> {
    let ids = decode(&read_entry(&dir.join("ids-1.img"), IDS_MAGIC)?.1)?;
    let inventory_path = dir.join("inventory.img");
    let (header, inventory) = read_entry(&inventory_path, INVENTORY_MAGIC)?;
    let mut inventory = decode(&inventory)?;
    let root = inventory
        .iter_mut()
        .find(|(f, _)| *f == ROOT_IDS)
        .ok_or("images: the inventory names no root namespaces")?;
    let Value::Bytes(root_bytes) = &root.1 else {
        return Err("images: malformed inventory".into());
    };
    let mut root_ids = decode(root_bytes)?;
    for field in INHERITED {
        let Some(own) = varint_field(&ids, field) else {
            continue;
        };
        root_ids.retain(|(f, _)| *f != field);
        root_ids.push((field, Value::Varint(own)));
    }
    root_ids.sort_by_key(|(f, _)| *f);
    root.1 = Value::Bytes(encode(&root_ids));
    write_entry(&inventory_path, &header, &encode(&inventory))?;
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if DROPPED_PREFIXES.iter().any(|p| name.starts_with(p)) {
            std::fs::remove_file(e.path()).map_err(|e| format!("{name}: {e}"))?;
        }
    }
    Ok(())
}

/// Takes the cgroup set out of every thread's core image. vane restores with
/// `--manage-cgroups=ignore` (the agent puts the tree in the instance's cgroups), yet CRIU
/// 4.2.1 still moves each thread whose recorded set differs from its process's, and they do
/// differ for a tree dumped in a cgroup namespace (a thread's cgroups are read inside it, the
/// process's outside): the move then fails. Without a set, a thread stays with its process.
pub fn forget_thread_cgroups(dir: &Path) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("core-") && name.ends_with(".img")) {
            continue;
        }
        let (header, core) = read_entry(&e.path(), CORE_MAGIC)?;
        let mut core = decode(&core)?;
        for (field, value) in core.iter_mut() {
            if let (THREAD_CORE, Value::Bytes(bytes)) = (*field, &mut *value) {
                let mut thread = decode(bytes)?;
                thread.retain(|(f, _)| *f != THREAD_CG_SET);
                *bytes = encode(&thread);
            }
        }
        write_entry(&e.path(), &header, &encode(&core))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(user: u64, uts: u64) -> Vec<u8> {
        encode(&[
            (1, Value::Varint(1)),
            (2, Value::Varint(2)),
            (3, Value::Varint(3)),
            (4, Value::Varint(4)),
            (UTS_NS_ID, Value::Varint(uts)),
            (USER_NS_ID, Value::Varint(user)),
        ])
    }

    #[test]
    fn root_namespaces_become_the_root_tasks() {
        let dir = tempfile::tempdir().unwrap();
        let common = [IMG_COMMON_MAGIC.to_le_bytes(), IDS_MAGIC.to_le_bytes()].concat();
        write_entry(&dir.path().join("ids-1.img"), &common, &ids(7, 9)).unwrap();
        let inventory = encode(&[
            (1, Value::Varint(2)),
            (ROOT_IDS, Value::Bytes(ids(4_026_531_837, 4_026_531_838))),
            (8, Value::Varint(300_000)),
        ]);
        let inv = dir.path().join("inventory.img");
        write_entry(&inv, &INVENTORY_MAGIC.to_le_bytes(), &inventory).unwrap();
        std::fs::write(dir.path().join("userns-13.img"), b"x").unwrap();
        std::fs::write(dir.path().join("utsns-14.img"), b"x").unwrap();
        std::fs::write(dir.path().join("pages-1.img"), b"x").unwrap();
        inherit_namespaces(dir.path()).unwrap();
        let (header, back) = read_entry(&inv, INVENTORY_MAGIC).unwrap();
        assert_eq!(header, INVENTORY_MAGIC.to_le_bytes());
        let back = decode(&back).unwrap();
        assert_eq!(varint_field(&back, 8), Some(300_000));
        let Some((_, Value::Bytes(root))) = back.iter().find(|(f, _)| *f == ROOT_IDS) else {
            panic!("no root ids");
        };
        let root = decode(root).unwrap();
        assert_eq!(varint_field(&root, USER_NS_ID), Some(7));
        assert_eq!(varint_field(&root, UTS_NS_ID), Some(9));
        assert_eq!(varint_field(&root, 1), Some(1));
        assert!(!dir.path().join("userns-13.img").exists());
        assert!(!dir.path().join("utsns-14.img").exists());
        assert!(dir.path().join("pages-1.img").exists());
    }

    #[test]
    fn threads_forget_their_cgroup_sets() {
        let dir = tempfile::tempdir().unwrap();
        let thread = encode(&[(1, Value::Varint(5)), (THREAD_CG_SET, Value::Varint(3))]);
        let core = encode(&[
            (1, Value::Varint(1)),
            (THREAD_CORE, Value::Bytes(thread)),
            (9, Value::Fixed32([1, 2, 3, 4])),
        ]);
        let header = [IMG_COMMON_MAGIC.to_le_bytes(), CORE_MAGIC.to_le_bytes()].concat();
        let path = dir.path().join("core-12.img");
        write_entry(&path, &header, &core).unwrap();
        forget_thread_cgroups(dir.path()).unwrap();
        let (h, back) = read_entry(&path, CORE_MAGIC).unwrap();
        assert_eq!(h, header);
        let back = decode(&back).unwrap();
        assert_eq!(back.len(), 3);
        let Some((_, Value::Bytes(t))) = back.iter().find(|(f, _)| *f == THREAD_CORE) else {
            panic!("no thread core");
        };
        assert_eq!(decode(t).unwrap(), vec![(1, Value::Varint(5))]);
    }

    #[test]
    fn foreign_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ids-1.img"), b"not an image at all").unwrap();
        assert!(inherit_namespaces(dir.path()).is_err());
        let mut long = vec![0xffu8; 11];
        long.push(1);
        assert!(decode(&long).is_err());
    }
}
