//! The tracked-flow filter (`CT_FILTER`): two bits per flow in one word (a blocked Bloom
//! filter) that say "`CT` may hold this flow", so that a bare SYN skips its `CT` probe when it
//! certainly does not (the datapath side is in the balancer's `maps.rs`; the layout in
//! `lb_common::CT_FILTER_BITS` and `ct_filter_slot`). `CT` here stands for both established
//! tables, `CT4` (IPv4) and `CT` (IPv6): the filter is keyed by the flow hash, which is the
//! same for either.
//!
//! The datapath sets a flow's bits in both halves after it inserts the flow into `CT`. Bits of
//! flows `CT` no longer holds (evicted, removed) would pile up, so lbd rebuilds the half SYNs
//! do not read with every scan of `CT`: zero it, scan, set each entry's bits, then make it the
//! one read. No flow of `CT` is ever missing from the half read: a flow inserted before the
//! zeroing is found by the scan; one inserted after it sets its own bits after its insert, so
//! if the zeroing clears them again the insert came before the scan, which finds it.
//!
//! The map is fresh with every loaded program and starts with every bit set (all SYNs probe):
//! a program loaded over pinned tables must not miss their flows before the first rebuild.
use lb_common::{
    ct_filter_slot, flow_hash, FlowKey, CT_FILTER_ACTIVE, CT_FILTER_ENTRIES, CT_FILTER_WORDS,
};
use std::os::fd::{AsRawFd as _, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a half stays untouched after it stopped being the one read, before a rebuild may
/// zero it: a program that read the selector just before the switch finishes in microseconds.
const QUIET_AFTER_SWITCH: Duration = Duration::from_millis(10);

/// `CT_FILTER`, mapped into lbd's memory.
pub struct CtFilter {
    /// `CT_FILTER_ENTRIES` words.
    words: *mut AtomicU64,
    /// One rebuild at a time; when the last switch happened.
    rebuild: Mutex<Option<Instant>>,
}

// SAFETY: the mapping is shared memory written only with atomic operations (the datapath's
// are atomic too); it lives until `drop` unmaps it.
unsafe impl Send for CtFilter {}
// SAFETY: as above.
unsafe impl Sync for CtFilter {}

impl Drop for CtFilter {
    fn drop(&mut self) {
        // SAFETY: the mapping `map` made, of this length, used by nothing after this.
        unsafe { libc::munmap(self.words.cast(), mapped_len()) };
    }
}

/// What one rebuild found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FilterFill {
    /// Entries of `CT` the rebuild's scan found (0 for [`CtFilter::fill`]).
    pub scanned: u64,
    /// Bits set in the half now read (of `CT_FILTER_BITS`).
    pub bits_set: u64,
    /// The share of SYNs of tuples `CT` does not hold that still probe it.
    pub probe_share: f64,
}

/// A rebuild under way: the half being rebuilt, zeroed; [`Rebuild::finish`] makes it the one
/// read. Dropped unfinished (a failed scan), it changes nothing that is read.
pub struct Rebuild<'a> {
    filter: &'a CtFilter,
    half: u32,
    _lock: std::sync::MutexGuard<'a, Option<Instant>>,
}

impl CtFilter {
    /// Maps the `CT_FILTER` array (created `BPF_F_MMAPABLE`) of a freshly loaded program and
    /// sets every bit.
    pub(super) fn map(fd: BorrowedFd<'_>) -> anyhow::Result<Self> {
        // SAFETY: a shared read-write mapping of an mmapable BPF array, as long as its values;
        // the kernel checks the length and the map's flags.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_len(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            anyhow::bail!(
                "mapping the tracked-flow filter CT_FILTER into memory: {}",
                std::io::Error::last_os_error()
            );
        }
        let f = CtFilter {
            words: p.cast(),
            rebuild: Mutex::new(None),
        };
        for w in f.words() {
            w.store(u64::MAX, Ordering::Relaxed);
        }
        f.selector().store(0, Ordering::Release);
        Ok(f)
    }

    fn all(&self) -> &[AtomicU64] {
        // SAFETY: `CT_FILTER_ENTRIES` 8-byte words, mapped for as long as `self` lives, only
        // ever accessed atomically.
        unsafe { std::slice::from_raw_parts(self.words, CT_FILTER_ENTRIES as usize) }
    }

    /// Both halves.
    fn words(&self) -> &[AtomicU64] {
        &self.all()[..(2 * CT_FILTER_WORDS) as usize]
    }

    /// The words of one half (the halves are interleaved: `ct_filter_slot`).
    fn half(&self, half: u32) -> impl Iterator<Item = &AtomicU64> {
        self.words().iter().skip(half as usize).step_by(2)
    }

    /// `key`'s word in `half`, and the mask of its bits.
    fn word_of(&self, key: &FlowKey, half: u32) -> (&AtomicU64, u64) {
        let (entry, mask) = ct_filter_slot(flow_hash(key));
        (&self.all()[(entry + half) as usize], mask)
    }

    /// Sets `key`'s bits in `half`.
    fn set(&self, key: &FlowKey, half: u32) {
        let (w, mask) = self.word_of(key, half);
        w.fetch_or(mask, Ordering::Relaxed);
    }

    fn selector(&self) -> &AtomicU64 {
        &self.all()[CT_FILTER_ACTIVE as usize]
    }

    /// The half the datapath reads (0 or 1).
    pub fn active(&self) -> u32 {
        (self.selector().load(Ordering::Acquire) & 1) as u32
    }

    /// Sets `key`'s bits in both halves, as the datapath does when it inserts a flow into
    /// `CT`: for entries lbd or a test writes itself, after writing them.
    pub fn mark(&self, key: &FlowKey) {
        for half in 0..2 {
            self.set(key, half);
        }
    }

    /// Whether a SYN of `key` would probe `CT` now (its bits are set in the half read).
    pub fn may_be_tracked(&self, key: &FlowKey) -> bool {
        let (w, mask) = self.word_of(key, self.active());
        w.load(Ordering::Relaxed) & mask == mask
    }

    /// Bits set in the half read, and the share of untracked flows' SYNs that would probe
    /// `CT`: both of a SYN's bits are in one random word, so it is the mean over the words of
    /// the square of their share of bits set.
    pub fn fill(&self) -> FilterFill {
        let (mut bits_set, mut squares) = (0u64, 0f64);
        for w in self.half(self.active()) {
            let n = w.load(Ordering::Relaxed).count_ones();
            bits_set += u64::from(n);
            squares += (f64::from(n) / 64.0).powi(2);
        }
        FilterFill {
            scanned: 0,
            bits_set,
            probe_share: squares / f64::from(CT_FILTER_WORDS),
        }
    }

    /// Starts a rebuild of the half not read, if none is under way (`None` then): zeroes it.
    /// The caller scans `CT`, [`Rebuild::mark`]s every entry, then calls [`Rebuild::finish`].
    pub fn begin_rebuild(&self) -> Option<Rebuild<'_>> {
        let lock = self.rebuild.try_lock().ok()?;
        if let Some(at) = *lock {
            let quiet = at.elapsed();
            if quiet < QUIET_AFTER_SWITCH {
                std::thread::sleep(QUIET_AFTER_SWITCH - quiet);
            }
        }
        let half = 1 - self.active();
        for w in self.half(half) {
            w.store(0, Ordering::Relaxed);
        }
        // The zeroing is complete before the scan reads the first entry.
        std::sync::atomic::fence(Ordering::SeqCst);
        Some(Rebuild {
            filter: self,
            half,
            _lock: lock,
        })
    }
}

impl Rebuild<'_> {
    /// An entry of `CT` found by the scan.
    pub fn mark(&self, key: &FlowKey) {
        self.filter.set(key, self.half);
    }

    /// The scan is complete (it found `scanned` entries): the rebuilt half is the one read
    /// from now on.
    pub fn finish(mut self, scanned: u64) -> FilterFill {
        self.filter
            .selector()
            .store(self.half as u64, Ordering::SeqCst);
        *self._lock = Some(Instant::now());
        FilterFill {
            scanned,
            ..self.filter.fill()
        }
    }
}

/// The mapping's length: the array's values, whole pages.
fn mapped_len() -> usize {
    // SAFETY: a query without side effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    (CT_FILTER_ENTRIES as usize * 8).div_ceil(page) * page
}
