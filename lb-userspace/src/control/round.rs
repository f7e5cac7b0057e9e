//! How floats appear in the JSON API: rounded to what they mean, in one place. A latency of
//! `1.0590160000000002` ms prints as `1.059` (microseconds are the resolution that means
//! something); rates, weights and fit statistics get a precision of their own. Only the
//! serialization rounds: values inside lbd keep their full precision.
use crate::learning::{Fit, Observed};
use serde::{Serialize, Serializer};

/// Decimals of a duration in milliseconds: microseconds.
pub const MS_DECIMALS: i32 = 3;
/// Decimals of a per-second rate, a load, a weight or a duration in seconds.
pub const RATE_DECIMALS: i32 = 3;
/// Decimals of a share or a coefficient of determination (0..=1).
pub const RATIO_DECIMALS: i32 = 4;
/// Significant digits of regression coefficients, whose scale depends on the load's.
pub const COEF_DIGITS: i32 = 6;

/// `x` rounded to `decimals` decimals (non-finite values unchanged).
pub fn decimals(x: f64, decimals: i32) -> f64 {
    if !x.is_finite() {
        return x;
    }
    let f = 10f64.powi(decimals);
    let r = (x * f).round() / f;
    // Values too large to scale stay as they are.
    if r.is_finite() {
        r
    } else {
        x
    }
}

/// `x` rounded to `digits` significant digits (non-finite values and 0 unchanged).
pub fn significant(x: f64, digits: i32) -> f64 {
    if !x.is_finite() || x == 0.0 {
        return x;
    }
    let magnitude = x.abs().log10().floor() as i32;
    decimals(x, (digits - 1 - magnitude).clamp(-300, 300))
}

pub fn ms<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
    decimals(*x, MS_DECIMALS).serialize(s)
}

pub fn opt_ms<S: Serializer>(x: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    x.map(|x| decimals(x, MS_DECIMALS)).serialize(s)
}

pub fn rate<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
    decimals(*x, RATE_DECIMALS).serialize(s)
}

pub fn opt_rate<S: Serializer>(x: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    x.map(|x| decimals(x, RATE_DECIMALS)).serialize(s)
}

pub fn opt_ratio<S: Serializer>(x: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    x.map(|x| decimals(x, RATIO_DECIMALS)).serialize(s)
}

/// A weight in configured units: [`RATE_DECIMALS`] decimals, and a whole weight as an integer
/// (`1`, not `1.0`), so that a VIP without learning prints its weights as it always did and a
/// learned one shows its fraction (`0.73`).
pub fn weight<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
    let r = decimals(*x, RATE_DECIMALS);
    if r.fract() == 0.0 && (0.0..=u32::MAX as f64).contains(&r) {
        (r as u64).serialize(s)
    } else {
        r.serialize(s)
    }
}

pub fn opt_weight<S: Serializer>(x: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
    match x {
        Some(x) => weight(x, s),
        None => s.serialize_none(),
    }
}

/// A fit with its coefficients to [`COEF_DIGITS`] significant digits, R² to
/// [`RATIO_DECIMALS`], loads to [`RATE_DECIMALS`].
pub fn opt_fit<S: Serializer>(x: &Option<Fit>, s: S) -> Result<S::Ok, S::Error> {
    x.map(|f| Fit {
        intercept: significant(f.intercept, COEF_DIGITS),
        slope: significant(f.slope, COEF_DIGITS),
        r2: decimals(f.r2, RATIO_DECIMALS),
        rmse: significant(f.rmse, COEF_DIGITS),
        n: f.n,
        load_min: decimals(f.load_min, RATE_DECIMALS),
        load_max: decimals(f.load_max, RATE_DECIMALS),
        load_mean: decimals(f.load_mean, RATE_DECIMALS),
        load_cv: decimals(f.load_cv, RATIO_DECIMALS),
    })
    .serialize(s)
}

/// Observed means: latency to microseconds, rates to [`RATE_DECIMALS`], the error share to
/// [`RATIO_DECIMALS`].
pub fn opt_observed<S: Serializer>(x: &Option<Observed>, s: S) -> Result<S::Ok, S::Error> {
    x.map(|o| Observed {
        load: decimals(o.load, RATE_DECIMALS),
        latency_ms: decimals(o.latency_ms, MS_DECIMALS),
        error_rate: decimals(o.error_rate, RATIO_DECIMALS),
        syn_retries_per_s: decimals(o.syn_retries_per_s, RATE_DECIMALS),
        rsts_per_s: decimals(o.rsts_per_s, RATE_DECIMALS),
        n: o.n,
    })
    .serialize(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_what_the_value_means() {
        assert_eq!(decimals(1.0590160000000002, MS_DECIMALS), 1.059);
        assert_eq!(decimals(-0.00049, MS_DECIMALS), -0.0);
        assert_eq!(decimals(f64::INFINITY, MS_DECIMALS), f64::INFINITY);
        assert_eq!(significant(-0.0012345678, 6), -0.00123457);
        assert_eq!(significant(1234567.8, 6), 1234570.0);
        assert_eq!(significant(0.0, 6), 0.0);

        #[derive(Serialize)]
        struct T {
            #[serde(serialize_with = "opt_ms")]
            last_probe_ms: Option<f64>,
            #[serde(serialize_with = "opt_ms")]
            none_ms: Option<f64>,
            #[serde(serialize_with = "rate")]
            packets_per_second: f64,
            #[serde(serialize_with = "opt_ratio")]
            r2: Option<f64>,
            #[serde(serialize_with = "weight")]
            whole: f64,
            #[serde(serialize_with = "opt_weight")]
            learned: Option<f64>,
        }
        let json = serde_json::to_string(&T {
            last_probe_ms: Some(1.0590160000000002),
            none_ms: None,
            packets_per_second: 1234.56789012,
            r2: Some(0.987654321),
            whole: 1.0,
            learned: Some(0.72999999),
        })
        .unwrap();
        assert_eq!(
            json,
            r#"{"last_probe_ms":1.059,"none_ms":null,"packets_per_second":1234.568,"r2":0.9877,"whole":1,"learned":0.73}"#
        );
    }
}
