//! What the model learns from: a backend's recent [`Sample`]s in a [`Window`], and their means
//! ([`Observed`]) for the policy's comparisons between backends.
use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// One observation of one backend over a short interval (for example one probe interval).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Time of the observation in seconds on any clock shared by the nodes (only differences
    /// matter; the model never reads a clock itself).
    pub t_secs: f64,
    /// New flows (or requests) per second given to the backend.
    pub load: f64,
    /// Probe latency in milliseconds, failed probes counted at the probe timeout.
    pub latency_ms: f64,
    /// Share of failed probes, 0..=1.
    pub errors: f64,
    /// SYNs the clients retried (nobody answered the first), per second.
    pub syn_retries_per_s: f64,
    /// RSTs sent by clients, per second.
    pub rsts_per_s: f64,
}

impl Sample {
    pub(crate) fn usable(&self) -> bool {
        self.t_secs.is_finite()
            && self.load.is_finite()
            && self.load >= 0.0
            && self.latency_ms.is_finite()
            && self.latency_ms > 0.0
    }
}

/// A backend's recent samples: at most `max_len`, none older than `max_age_secs` before the
/// newest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Window {
    max_age_secs: f64,
    max_len: usize,
    samples: VecDeque<Sample>,
}

impl Window {
    pub fn new(max_age_secs: f64, max_len: usize) -> Self {
        Window {
            max_age_secs,
            max_len: max_len.max(1),
            samples: VecDeque::new(),
        }
    }

    /// Adds a sample; ignores one with a non-finite or negative load, a latency that is not
    /// positive, or a time before the newest sample's.
    pub fn push(&mut self, s: Sample) {
        if !s.usable() || self.samples.back().is_some_and(|b| s.t_secs < b.t_secs) {
            return;
        }
        self.samples.push_back(s);
        while self.samples.len() > self.max_len {
            self.samples.pop_front();
        }
        let oldest = s.t_secs - self.max_age_secs;
        while self.samples.front().is_some_and(|f| f.t_secs < oldest) {
            self.samples.pop_front();
        }
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn clear(&mut self) {
        self.samples.clear();
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.iter().copied().collect()
    }

    /// The highest load among the usable samples, if any.
    pub fn peak_load(&self) -> Option<f64> {
        self.samples.iter().map(|s| s.load).max_by(f64::total_cmp)
    }

    /// Means over the samples of the last `secs` seconds (before the newest), if any.
    pub fn observed(&self, secs: f64) -> Option<Observed> {
        let newest = self.samples.back()?.t_secs;
        let recent: Vec<Sample> = self
            .samples
            .iter()
            .filter(|s| s.t_secs >= newest - secs)
            .copied()
            .collect();
        Observed::mean(&recent)
    }
}

/// What a backend did recently (means over a few samples).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Observed {
    pub load: f64,
    pub latency_ms: f64,
    pub error_rate: f64,
    pub syn_retries_per_s: f64,
    pub rsts_per_s: f64,
    /// Samples averaged.
    pub n: usize,
}

impl Observed {
    pub fn mean(samples: &[Sample]) -> Option<Observed> {
        let ok: Vec<&Sample> = samples.iter().filter(|s| s.usable()).collect();
        if ok.is_empty() {
            return None;
        }
        let n = ok.len() as f64;
        let m = |f: fn(&Sample) -> f64| ok.iter().map(|s| f(s)).sum::<f64>() / n;
        Some(Observed {
            load: m(|s| s.load),
            latency_ms: m(|s| s.latency_ms),
            error_rate: m(|s| s.errors),
            syn_retries_per_s: m(|s| s.syn_retries_per_s),
            rsts_per_s: m(|s| s.rsts_per_s),
            n: ok.len(),
        })
    }

    /// Retried SYNs per new flow (`None` below one new flow per second: too noisy).
    pub fn syn_retry_ratio(&self) -> Option<f64> {
        (self.load >= 1.0).then(|| self.syn_retries_per_s / self.load)
    }

    /// Client RSTs per new flow (`None` below one new flow per second).
    pub fn rst_ratio(&self) -> Option<f64> {
        (self.load >= 1.0).then(|| self.rsts_per_s / self.load)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learning::testkit::*;

    #[test]
    fn window_keeps_recent_samples() {
        let mut w = Window::new(10.0, 5);
        for k in 0..8 {
            w.push(sample(k as f64, 1.0, 1.0));
        }
        assert_eq!(w.len(), 5, "count bound");
        w.push(sample(20.0, 1.0, 1.0));
        assert_eq!(w.len(), 1, "age bound");
        w.push(sample(19.0, 1.0, 1.0));
        w.push(sample(21.0, f64::INFINITY, 1.0));
        assert_eq!(w.len(), 1, "out of order and unusable samples are ignored");
        w.push(sample(22.0, 3.0, 5.0));
        let o = w.observed(5.0).unwrap();
        assert_eq!((o.n, o.load, o.latency_ms), (2, 2.0, 3.0));
    }
}
