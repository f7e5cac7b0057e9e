//! Helpers of the learning tests: synthetic backends, models, policies and closed loops.
#![allow(dead_code)]
use std::net::{IpAddr, Ipv4Addr};

use crate::health::HealthStatus;
use crate::learning::*;

/// Deterministic noise in [-1, 1] (splitmix64 of the index and a seed).
pub(crate) fn noise(i: u64, seed: u64) -> f64 {
    let mut z = i
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(seed.wrapping_mul(0xbf58_476d_1ce4_e5b9));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

/// Triangle wave in [-1, 1] with the given period.
pub(crate) fn tri(k: u64, period: u64) -> f64 {
    let x = (k % period) as f64 / period as f64;
    if x < 0.5 {
        4.0 * x - 1.0
    } else {
        3.0 - 4.0 * x
    }
}

/// M/M/1 latency (ms) at `load` for service rate `mu`, with ±`noise_frac` relative noise;
/// at or beyond capacity, the 1 s probe timeout.
pub(crate) fn mm1_ms(mu: f64, load: f64, noise_frac: f64, i: u64, seed: u64) -> f64 {
    if load >= mu {
        return 1000.0;
    }
    (1000.0 / (mu - load) * (1.0 + noise_frac * noise(i, seed))).min(1000.0)
}

/// Latency (ms) of `workers` workers of `service_ms` each at `load` per second: M/D/c by
/// halving Sakasegawa's M/M/c queueing delay; flat well below capacity, like the bench's
/// worker pools. At or past capacity, the probe timeout.
pub(crate) fn workers_ms(workers: f64, service_ms: f64, load: f64) -> f64 {
    let rho = load * service_ms / 1000.0 / workers;
    if rho >= 0.99 {
        return 400.0;
    }
    let wait =
        0.5 * service_ms * rho.powf((2.0 * (workers + 1.0)).sqrt() - 1.0) / (workers * (1.0 - rho));
    (service_ms + wait).min(400.0)
}

pub(crate) fn sample(t: f64, load: f64, latency_ms: f64) -> Sample {
    Sample {
        t_secs: t,
        load,
        latency_ms,
        errors: 0.0,
        syn_retries_per_s: 0.0,
        rsts_per_s: 0.0,
    }
}

/// `n` samples of an M/M/1 backend with loads swept between 20% and 80% of `mu`.
pub(crate) fn series(mu: f64, n: u64, seed: u64) -> Vec<Sample> {
    (0..n)
        .map(|k| {
            let load = mu * (0.5 + 0.3 * tri(k, 24));
            sample(k as f64, load, mm1_ms(mu, load, 0.02, k, seed))
        })
        .collect()
}

pub(crate) fn addr(id: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, (id >> 8) as u8, id as u8))
}

pub(crate) fn input(id: u32, configured: u32, fit: Result<Fit, Refusal>) -> BackendInput {
    BackendInput {
        id,
        addr: addr(id),
        configured_weight: configured,
        current_weight: table_weight(configured),
        pinned: None,
        learning: true,
        health: HealthStatus::Up,
        fit,
        observed: None,
        peak_load: None,
        probe_timeout_ms: None,
        service_check: None,
    }
}

/// An exact M/M/1 model of service rate `mu`.
pub(crate) fn mm1_fit(mu: f64) -> Fit {
    Fit {
        intercept: mu,
        slope: -1.0,
        r2: 0.99,
        rmse: 0.1,
        n: 100,
        load_min: 0.2 * mu,
        load_max: 0.8 * mu,
        load_mean: 0.5 * mu,
        load_cv: 0.35,
    }
}

pub(crate) fn observed(load: f64, latency_ms: f64) -> Observed {
    Observed {
        load,
        latency_ms,
        error_rate: 0.0,
        syn_retries_per_s: 0.0,
        rsts_per_s: 0.0,
        n: 10,
    }
}

/// A prime table size that keeps table builds cheap in unoptimised tests.
pub(crate) const SMALL_M: u32 = 10_007;

pub(crate) fn policy() -> WeightPolicy {
    WeightPolicy {
        table_size: SMALL_M,
        ..WeightPolicy::default()
    }
}

/// `policy()` without a disruption budget, for tests about something else.
pub(crate) fn unbudgeted() -> WeightPolicy {
    WeightPolicy {
        disruption_budget: 1.0,
        ..policy()
    }
}

/// Feeds each decision's weights and state back; returns every decision.
pub(crate) fn run(
    inputs: &mut [BackendInput],
    p: &WeightPolicy,
    state: &mut PolicyState,
    steps: usize,
) -> Vec<Decision> {
    (0..steps)
        .map(|_| {
            let d = decide(inputs, p, state);
            apply(inputs, &d);
            *state = d.state.clone();
            d
        })
        .collect()
}

pub(crate) fn apply(inputs: &mut [BackendInput], d: &Decision) {
    for b in inputs.iter_mut() {
        b.current_weight = d.backends.iter().find(|x| x.id == b.id).unwrap().weight;
    }
}

pub(crate) fn weight(d: &Decision, id: u32) -> u32 {
    d.backends.iter().find(|b| b.id == id).unwrap().weight
}

pub(crate) fn reasons(d: &Decision, id: u32) -> &[Reason] {
    &d.backends.iter().find(|b| b.id == id).unwrap().reasons
}

/// Four backends of configured weight `configured` with models of 100 per second, each seen
/// at 50 per second and 20 ms: a healthy pool, for a test to spoil one of.
pub(crate) fn healthy_pool(configured: u32) -> Vec<BackendInput> {
    (1..=4)
        .map(|id| {
            let mut b = input(id, configured, Ok(mm1_fit(100.0)));
            b.observed = Some(observed(50.0, 20.0));
            b
        })
        .collect()
}

/// Four backends with models; `slow` of them now answer 20× slower than predicted.
pub(crate) fn outlier_pool(slow: u32, p: &WeightPolicy) -> Vec<Decision> {
    let mut inputs = healthy_pool(100);
    for b in inputs.iter_mut().take(slow as usize) {
        // Predicted 20 ms at load 50; observed up to 400 ms.
        b.observed = Some(observed(50.0, 300.0 + 20.0 * f64::from(b.id)));
    }
    let mut state = PolicyState::default();
    run(&mut inputs, p, &mut state, p.outlier_steps as usize + 12)
}

/// A policy state two steps in, backend 3 drained by the model since step 1.
pub(crate) fn third_drained_at_step_1() -> PolicyState {
    let drained = BackendMemory {
        drained_at: Some(1),
        drains: 1,
        ..BackendMemory::default()
    };
    PolicyState {
        step: 2,
        backends: [(3, drained)].into_iter().collect(),
    }
}

/// Backends 1 and 2 with models (50 per second at the 100 ms target, at 50 per second and
/// 20 ms); backend 3 without one, its latency flat (10 ms at 50 per second).
pub(crate) fn two_fitted_and_a_flat_one() -> Vec<BackendInput> {
    let mut inputs: Vec<BackendInput> = (1..=2)
        .map(|id| {
            let mut b = input(id, 1, Ok(mm1_fit(60.0)));
            b.observed = Some(observed(50.0, 20.0));
            b
        })
        .collect();
    let mut flat = input(3, 1, Err(Refusal::PoorFit { r2: 0.1, need: 0.6 }));
    flat.observed = Some(observed(50.0, 10.0));
    inputs.push(flat);
    inputs
}
