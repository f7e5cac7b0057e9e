//! Maglev tables remembered between their users. A learning step builds the table of the
//! current weights (the one the last step applied), of the proposal and of a few shortened
//! proposals, and applying the result builds the chosen one again in the datapath: at 65537
//! slots each build costs milliseconds, the larger part of the agent's CPU. The few most recent
//! tables are kept, keyed by everything a table depends on, so a repeat costs a copy.
//! `maglev::build` is a pure function, so the cache cannot change a result.
use std::collections::VecDeque;
use std::sync::Mutex;

use lb_common::maglev::{self, Backend, BuildError};

/// Tables kept: the current, the proposed and the shortened tries of one step, with room for a
/// second VIP stepping in between.
const KEPT: usize = 6;

struct Entry {
    backends: Vec<Backend>,
    size: u32,
    table: Vec<u32>,
}

static CACHE: Mutex<VecDeque<Entry>> = Mutex::new(VecDeque::new());

/// `maglev::build(backends, size)`, from the cache when the same input was built recently.
pub fn build(backends: &[Backend], size: u32) -> Result<Vec<u32>, BuildError> {
    // The table does not depend on the order of `backends`; the key should not either.
    let mut key = backends.to_vec();
    key.sort_unstable_by_key(|b| (b.family, b.addr, b.id, b.weight));
    {
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = cache
            .iter()
            .position(|e| e.size == size && e.backends == key)
        {
            let e = cache.remove(pos).expect("found above");
            let table = e.table.clone();
            cache.push_front(e);
            return Ok(table);
        }
    }
    let table = maglev::build(&key, size)?;
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    cache.push_front(Entry {
        backends: key,
        size,
        table: table.clone(),
    });
    cache.truncate(KEPT);
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::FAMILY_V4;

    fn b(i: u8, weight: u32) -> Backend {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[10, 0, 0, i]);
        Backend {
            addr,
            family: FAMILY_V4,
            id: u32::from(i),
            weight,
        }
    }

    #[test]
    fn cached_tables_equal_fresh_builds_in_any_order() {
        let size = 65537;
        let a = [b(1, 100), b(2, 250), b(3, 75)];
        let first = build(&a, size).unwrap();
        assert_eq!(first, maglev::build(&a, size).unwrap());
        let reversed: Vec<Backend> = a.iter().rev().copied().collect();
        assert_eq!(
            build(&reversed, size).unwrap(),
            first,
            "a hit in another order"
        );
        // Another weight, another size, another id: other tables, never the cached one.
        let w = [b(1, 100), b(2, 251), b(3, 75)];
        assert_eq!(build(&w, size).unwrap(), maglev::build(&w, size).unwrap());
        assert_ne!(build(&w, size).unwrap(), first);
        assert_eq!(build(&a, 251).unwrap(), maglev::build(&a, 251).unwrap());
        let mut ids = a;
        ids[0].id = 9;
        let t = build(&ids, size).unwrap();
        assert!(t.contains(&9) && !t.contains(&1));
        // Errors are not cached, and stay errors.
        assert!(build(&a, 65536).is_err());
        assert!(build(&a, 65536).is_err());
        // Many other inputs push it out; it is then rebuilt, identical.
        for i in 0..(KEPT as u32 + 2) {
            build(&[b(1, 1 + i), b(2, 2)], size).unwrap();
        }
        assert_eq!(build(&a, size).unwrap(), first);
    }
}
