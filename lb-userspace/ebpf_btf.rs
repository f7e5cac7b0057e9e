//! Type names in an eBPF object's BTF that the kernel accepts.
//!
//! The kernel loads BTF only if every struct, union, enum, typedef, function and variable name
//! (and every member name) is a C identifier. bpf-linker 0.10.0 rewrites Rust's struct names
//! (`Global<u8>` becomes `Global_3C_u8_3E_`) but not union names, so aya-log's
//! `MaybeUninit<u8>` union made the kernel refuse the whole BTF: the program then loaded without
//! it (no typed maps in `bpftool`, a BTF dump in every start's log). bpf-linker 0.11 sanitises
//! unions too, but it links a system LLVM 22 or newer, which the machines we build on lack.
//!
//! [`sanitize_object`] replaces every byte of such a name that is not `[A-Za-z0-9_]` by `_`,
//! in place: the string table keeps its layout, so no offset anywhere in the object moves.
//! Shared (by `#[path]`) between lb-userspace's build script and its unit tests.

#![allow(dead_code)] // the build script and the tests each use a part

use std::ops::Range;

const BTF_MAGIC: u16 = 0xeb9f;
const HEADER_LEN: usize = 24;
/// One `struct btf_type`: name_off, info, size or type.
const TYPE_LEN: usize = 12;

/// BTF kinds (`BTF_KIND_*` in the kernel's `include/uapi/linux/btf.h`).
mod kind {
    pub const INT: u32 = 1;
    pub const ARRAY: u32 = 3;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const FWD: u32 = 7;
    pub const TYPEDEF: u32 = 8;
    pub const FUNC: u32 = 12;
    pub const FUNC_PROTO: u32 = 13;
    pub const VAR: u32 = 14;
    pub const DATASEC: u32 = 15;
    pub const DECL_TAG: u32 = 17;
    pub const ENUM64: u32 = 19;
    pub const MAX: u32 = ENUM64;
}

/// A malformed object or BTF section, with what was wrong.
#[derive(Debug, PartialEq, Eq)]
pub struct BtfError(pub String);

impl std::fmt::Display for BtfError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BtfError {}

fn err(what: impl Into<String>) -> BtfError {
    BtfError(what.into())
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, BtfError> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes([s[0], s[1]]))
        .ok_or_else(|| err(format!("truncated at byte {at}")))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| err(format!("truncated at byte {at}")))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, BtfError> {
    Ok(u64::from(u32_at(b, at)?) | (u64::from(u32_at(b, at + 4)?) << 32))
}

/// The byte range of section `name` in a little-endian ELF64 object, if it has one.
pub fn elf_section(elf: &[u8], name: &str) -> Result<Option<Range<usize>>, BtfError> {
    if elf.get(..6) != Some(&[0x7f, b'E', b'L', b'F', 2, 1]) {
        return Err(err("not a little-endian ELF64 object"));
    }
    let shoff = u64_at(elf, 0x28)? as usize;
    let shentsize = u16_at(elf, 0x3a)? as usize;
    let shnum = u16_at(elf, 0x3c)? as usize;
    let shstrndx = u16_at(elf, 0x3e)? as usize;
    let header = |i: usize| -> Result<(u32, Range<usize>), BtfError> {
        let at = shoff + i * shentsize;
        let offset = u64_at(elf, at + 24)? as usize;
        let size = u64_at(elf, at + 32)? as usize;
        if offset.checked_add(size).is_none_or(|end| end > elf.len()) {
            return Err(err(format!("section {i} lies outside the file")));
        }
        Ok((u32_at(elf, at)?, offset..offset + size))
    };
    let (_, names) = header(shstrndx)?;
    for i in 0..shnum {
        let (name_off, range) = header(i)?;
        let start = names.start + name_off as usize;
        let found = elf
            .get(start..names.end)
            .and_then(|s| s.split(|&b| b == 0).next())
            .is_some_and(|n| n == name.as_bytes());
        if found {
            return Ok(Some(range));
        }
    }
    Ok(None)
}

/// Where the names that must be C identifiers start in the string table, one per name.
fn identifier_names(btf: &[u8]) -> Result<(Range<usize>, Vec<u32>), BtfError> {
    if u16_at(btf, 0)? != BTF_MAGIC {
        return Err(err("the .BTF section has no BTF magic"));
    }
    let hdr_len = u32_at(btf, 4)? as usize;
    if hdr_len < HEADER_LEN {
        return Err(err(format!("BTF header of {hdr_len} bytes")));
    }
    let (type_off, type_len) = (u32_at(btf, 8)? as usize, u32_at(btf, 12)? as usize);
    let (str_off, str_len) = (u32_at(btf, 16)? as usize, u32_at(btf, 20)? as usize);
    let types = hdr_len + type_off..hdr_len + type_off + type_len;
    let strings = hdr_len + str_off..hdr_len + str_off + str_len;
    if types.end > btf.len() || strings.end > btf.len() {
        return Err(err("BTF types or strings lie outside the section"));
    }
    let mut names = Vec::new();
    let mut at = types.start;
    while at < types.end {
        let name_off = u32_at(btf, at)?;
        let info = u32_at(btf, at + 4)?;
        let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
        if !(1..=kind::MAX).contains(&kind) {
            return Err(err(format!("unknown BTF kind {kind} at type byte {at}")));
        }
        let (member_len, members_named) = match kind {
            kind::STRUCT | kind::UNION => (12, true),
            kind::ENUM => (8, true),
            kind::ENUM64 => (12, true),
            kind::FUNC_PROTO => (8, true),
            kind::DATASEC => (12, false),
            _ => (0, false),
        };
        let extra = match kind {
            kind::INT | kind::VAR | kind::DECL_TAG => 4,
            kind::ARRAY => 12,
            _ => vlen * member_len,
        };
        let named_kind = matches!(
            kind,
            kind::STRUCT
                | kind::UNION
                | kind::ENUM
                | kind::ENUM64
                | kind::FWD
                | kind::TYPEDEF
                | kind::FUNC
                | kind::VAR
        );
        if named_kind {
            names.push(name_off);
        }
        if members_named {
            for m in 0..vlen {
                names.push(u32_at(btf, at + TYPE_LEN + m * member_len)?);
            }
        }
        at += TYPE_LEN + extra;
    }
    if at != types.end {
        return Err(err("the last BTF type runs past the type section"));
    }
    Ok((strings, names))
}

/// Makes every type, function, variable and member name in `btf` (a whole `.BTF` section) a C
/// identifier, in place. Returns the names changed, as they were.
pub fn sanitize_btf(btf: &mut [u8]) -> Result<Vec<String>, BtfError> {
    let (strings, names) = identifier_names(btf)?;
    let mut changed = Vec::new();
    for off in names {
        let start = strings.start + off as usize;
        let len = btf
            .get(start..strings.end)
            .and_then(|s| s.iter().position(|&b| b == 0))
            .ok_or_else(|| err(format!("BTF name at string offset {off} is not terminated")))?;
        let name = &mut btf[start..start + len];
        let valid = |(i, b): (usize, &u8)| {
            *b == b'_' || (b.is_ascii_alphanumeric() && !(i == 0 && b.is_ascii_digit()))
        };
        if name.iter().enumerate().all(valid) {
            continue;
        }
        changed.push(String::from_utf8_lossy(name).into_owned());
        for (i, b) in name.iter_mut().enumerate() {
            if !valid((i, b)) {
                *b = b'_';
            }
        }
    }
    Ok(changed)
}

/// [`sanitize_btf`] on the `.BTF` section of an eBPF object (an object without one is left
/// as it is). Returns the names changed, as they were.
pub fn sanitize_object(elf: &mut [u8]) -> Result<Vec<String>, BtfError> {
    match elf_section(elf, ".BTF")? {
        Some(range) => sanitize_btf(&mut elf[range]),
        None => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BTF section: header, `types` (already encoded), then `strings`.
    fn btf(types: &[u32], strings: &[u8]) -> Vec<u8> {
        let type_len = (types.len() * 4) as u32;
        let mut b = Vec::new();
        b.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        for v in [
            HEADER_LEN as u32,
            0,
            type_len,
            type_len,
            strings.len() as u32,
        ] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        types
            .iter()
            .for_each(|t| b.extend_from_slice(&t.to_le_bytes()));
        b.extend_from_slice(strings);
        b
    }

    fn info(kind: u32, vlen: u32) -> u32 {
        kind << 24 | vlen
    }

    const STRINGS: &[u8] = b"\0MaybeUninit<u8>\0value\0Global_3C_u8_3E_\0.maps\0()\0";
    // Offsets into STRINGS.
    const UNION: u32 = 1;
    const VALUE: u32 = 17;
    const STRUCT: u32 = 23;
    const DATASEC: u32 = 41;
    const UNIT: u32 = 47;

    fn sample() -> Vec<u8> {
        btf(
            &[
                // [1] INT '()' size 0: not a name the kernel checks.
                UNIT,
                info(kind::INT, 0),
                0,
                0,
                // [2] UNION 'MaybeUninit<u8>' with member 'value' of type 1.
                UNION,
                info(kind::UNION, 1),
                1,
                VALUE,
                1,
                0,
                // [3] STRUCT 'Global_3C_u8_3E_' with member 'value' of type 2.
                STRUCT,
                info(kind::STRUCT, 1),
                1,
                VALUE,
                2,
                0,
                // [4] DATASEC '.maps' with one entry.
                DATASEC,
                info(kind::DATASEC, 1),
                0,
                3,
                0,
                1,
            ],
            STRINGS,
        )
    }

    #[test]
    fn a_union_name_becomes_an_identifier_in_place() {
        let mut b = sample();
        let before = b.clone();
        assert_eq!(sanitize_btf(&mut b).unwrap(), vec!["MaybeUninit<u8>"]);
        assert_eq!(b.len(), before.len());
        let strings = &b[b.len() - STRINGS.len()..];
        assert_eq!(
            strings,
            b"\0MaybeUninit_u8_\0value\0Global_3C_u8_3E_\0.maps\0()\0"
        );
        // Only those bytes changed; a second pass finds nothing.
        let differing = b.iter().zip(&before).filter(|(x, y)| x != y).count();
        assert_eq!(differing, 2);
        assert!(sanitize_btf(&mut b).unwrap().is_empty());
    }

    #[test]
    fn section_names_and_int_names_are_left_alone() {
        let mut b = sample();
        sanitize_btf(&mut b).unwrap();
        let strings = &b[b.len() - STRINGS.len()..];
        assert!(strings.ends_with(b"\0.maps\0()\0"));
    }

    #[test]
    fn malformed_btf_is_an_error_not_a_guess() {
        let mut b = sample();
        b[0] = 0;
        assert_eq!(
            sanitize_btf(&mut b).unwrap_err().to_string(),
            "the .BTF section has no BTF magic"
        );
        let mut b = sample();
        // The union claims two members: the types run past their section.
        b[HEADER_LEN + 5 * 4] = 2;
        assert!(sanitize_btf(&mut b).is_err());
        assert_eq!(
            sanitize_object(&mut [0u8; 64]).unwrap_err().to_string(),
            "not a little-endian ELF64 object"
        );
    }

    #[test]
    fn the_embedded_balancer_has_only_identifier_names_left() {
        let mut object = include_bytes!(concat!(env!("OUT_DIR"), "/lb-balancer")).to_vec();
        assert!(elf_section(&object, ".BTF").unwrap().is_some());
        assert_eq!(sanitize_object(&mut object).unwrap(), Vec::<String>::new());
    }
}
