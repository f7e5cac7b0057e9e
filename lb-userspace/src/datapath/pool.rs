//! Allocation of Maglev tables inside the shared ring pool (one big BPF array).
//!
//! A table update writes the new table into a fresh region and then swaps the VIP's map entry
//! to point at it, so the datapath sees either the old table or the new one, never a mix. The
//! old region is quarantined for a while before reuse: a packet that read the old VIP entry
//! just before the swap may still index into it.
use std::time::{Duration, Instant};

/// How long a released region stays untouched. XDP programs run for microseconds; this is
/// generous on purpose.
pub const QUARANTINE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub offset: u32,
    pub size: u32,
}

#[derive(Debug, Clone)]
pub struct RingPool {
    size: u32,
    /// Free ranges, sorted by offset, coalesced.
    free: Vec<Region>,
    quarantined: Vec<(Instant, Region)>,
}

impl RingPool {
    pub fn new(size: u32) -> Self {
        RingPool {
            size,
            free: vec![Region { offset: 0, size }],
            quarantined: Vec::new(),
        }
    }

    pub fn capacity(&self) -> u32 {
        self.size
    }

    /// First-fit allocation of `size` slots.
    pub fn alloc(&mut self, size: u32) -> Option<Region> {
        self.release_matured(Instant::now());
        let i = self.free.iter().position(|r| r.size >= size)?;
        let r = self.free[i];
        if r.size == size {
            self.free.remove(i);
        } else {
            self.free[i] = Region {
                offset: r.offset + size,
                size: r.size - size,
            };
        }
        Some(Region {
            offset: r.offset,
            size,
        })
    }

    /// Gives a region back after the quarantine.
    pub fn release(&mut self, r: Region) {
        self.quarantined.push((Instant::now(), r));
    }

    /// Gives a region back at once (it was never published to the datapath).
    pub fn release_now(&mut self, r: Region) {
        let i = self.free.partition_point(|f| f.offset < r.offset);
        self.free.insert(i, r);
        let mut merged: Vec<Region> = Vec::with_capacity(self.free.len());
        for f in self.free.drain(..) {
            match merged.last_mut() {
                Some(last) if last.offset + last.size == f.offset => last.size += f.size,
                _ => merged.push(f),
            }
        }
        self.free = merged;
    }

    /// Marks a region as in use (when resuming from pinned maps). False if it is not free.
    pub fn reserve(&mut self, r: Region) -> bool {
        let Some(i) = self
            .free
            .iter()
            .position(|f| f.offset <= r.offset && r.offset + r.size <= f.offset + f.size)
        else {
            return false;
        };
        let f = self.free.remove(i);
        if r.offset + r.size < f.offset + f.size {
            let end = r.offset + r.size;
            self.free.insert(
                i,
                Region {
                    offset: end,
                    size: f.offset + f.size - end,
                },
            );
        }
        if f.offset < r.offset {
            self.free.insert(
                i,
                Region {
                    offset: f.offset,
                    size: r.offset - f.offset,
                },
            );
        }
        true
    }

    fn release_matured(&mut self, now: Instant) {
        let (ready, waiting): (Vec<_>, Vec<_>) = self
            .quarantined
            .drain(..)
            .partition(|(t, _)| now.duration_since(*t) >= QUARANTINE);
        self.quarantined = waiting;
        for (_, r) in ready {
            self.release_now(r);
        }
    }

    /// Slots currently free (not counting quarantined ones).
    pub fn free_slots(&self) -> u32 {
        self.free.iter().map(|r| r.size).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_coalesce() {
        let mut p = RingPool::new(100);
        let a = p.alloc(30).unwrap();
        let b = p.alloc(30).unwrap();
        let c = p.alloc(40).unwrap();
        assert_eq!((a.offset, b.offset, c.offset), (0, 30, 60));
        assert!(p.alloc(1).is_none());
        p.release_now(b);
        p.release_now(a);
        assert_eq!(
            p.alloc(60),
            Some(Region {
                offset: 0,
                size: 60
            })
        );
    }

    #[test]
    fn reserve_splits_free_space() {
        let mut p = RingPool::new(100);
        assert!(p.reserve(Region {
            offset: 40,
            size: 20
        }));
        assert!(
            !p.reserve(Region {
                offset: 50,
                size: 20
            }),
            "overlaps a reserved region"
        );
        assert_eq!(
            p.alloc(40),
            Some(Region {
                offset: 0,
                size: 40
            })
        );
        assert_eq!(
            p.alloc(40),
            Some(Region {
                offset: 60,
                size: 40
            })
        );
        assert_eq!(p.free_slots(), 0);
    }

    #[test]
    fn quarantined_regions_are_not_reused_at_once() {
        let mut p = RingPool::new(10);
        let a = p.alloc(10).unwrap();
        p.release(a);
        assert!(
            p.alloc(10).is_none(),
            "a just-released region must not be handed out"
        );
        p.release_matured(Instant::now() + QUARANTINE);
        assert_eq!(p.alloc(10), Some(a));
    }
}
