//! Retry policies and the backoff delay between attempts.
//!
//! The delay before the n-th retry (n = 1 after the first failed attempt) is
//!
//! | strategy      | delay                               |
//! |---------------|-------------------------------------|
//! | `fixed`       | interval                            |
//! | `linear`      | interval × n                        |
//! | `exponential` | interval × multiplier^(n−1)         |
//!
//! and is never more than `backoff_max_ms` when that is set. Jitter then spreads the delay
//! d so that tasks that failed together do not all come back at the same moment, with u
//! drawn uniformly from [0, 1):
//!
//! | `jitter` | delay            |
//! |----------|------------------|
//! | `none`   | d                |
//! | `full`   | u × d            |
//! | `equal`  | d/2 + u × d/2    |
//!
//! `max_retry_count` counts retries after the first attempt, so a task gets at most
//! `max_retry_count + 1` attempts.
//!
//! Everything here is a pure function of the policy, the retry number and, for jitter, the
//! random draw the caller passes in; nothing here reads a clock or a random source.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How the delay grows from one retry to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// The same delay before every retry.
    Fixed,
    /// The delay grows by the interval with every retry.
    Linear,
    /// The delay is multiplied by the multiplier with every retry.
    #[default]
    Exponential,
}

impl std::str::FromStr for Strategy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fixed" => Ok(Strategy::Fixed),
            "linear" => Ok(Strategy::Linear),
            "exponential" => Ok(Strategy::Exponential),
            other => Err(format!(
                "unknown backoff strategy `{other}`, expected fixed, linear or exponential"
            )),
        }
    }
}

/// How the delay is randomised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    /// Exactly the computed delay.
    #[default]
    None,
    /// Anywhere between zero and the computed delay.
    Full,
    /// Anywhere between half the computed delay and all of it.
    Equal,
}

impl std::str::FromStr for Jitter {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Jitter::None),
            "full" => Ok(Jitter::Full),
            "equal" => Ok(Jitter::Equal),
            other => Err(format!(
                "unknown jitter `{other}`, expected none, full or equal"
            )),
        }
    }
}

/// When and how often a failed task is tried again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// How the delay grows. Default `exponential`.
    pub backoff: Strategy,
    /// The base delay, in milliseconds. Default 1000; 0 retries at once.
    pub backoff_interval_ms: u64,
    /// The growth factor of `exponential` (ignored otherwise). Default 2.0; must be ≥ 1.
    pub backoff_multiplier: f64,
    /// The longest delay, in milliseconds, whatever the strategy gives. Default: no cap.
    pub backoff_max_ms: Option<u64>,
    /// How the delay is randomised. Default `none`.
    pub jitter: Jitter,
    /// Retries after the first attempt. Default 3; 0 means a single attempt.
    pub max_retry_count: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            backoff: Strategy::Exponential,
            backoff_interval_ms: 1000,
            backoff_multiplier: 2.0,
            backoff_max_ms: None,
            jitter: Jitter::None,
            max_retry_count: 3,
        }
    }
}

impl RetryPolicy {
    /// The most attempts a task with this policy may get.
    pub fn max_attempts(&self) -> u32 {
        self.max_retry_count.saturating_add(1)
    }

    /// Whether a failure of attempt `attempt` (1-based) may still be retried.
    pub fn allows_retry_after(&self, attempt: u32) -> bool {
        attempt < self.max_attempts()
    }

    /// The delay before retry number `retry` (1 for the retry after the first attempt).
    /// Saturates instead of overflowing, so any policy gives a finite delay.
    pub fn delay(&self, retry: u32) -> Duration {
        let retry = retry.max(1);
        let interval = self.backoff_interval_ms;
        let ms = match self.backoff {
            Strategy::Fixed => interval,
            Strategy::Linear => interval.saturating_mul(u64::from(retry)),
            Strategy::Exponential => {
                let exponent = i32::try_from(retry - 1).unwrap_or(i32::MAX);
                let factor = self.backoff_multiplier.powi(exponent);
                let ms = interval as f64 * factor;
                // `as` saturates for floats: infinity becomes u64::MAX.
                ms as u64
            }
        };
        let ms = match self.backoff_max_ms {
            Some(cap) => ms.min(cap),
            None => ms,
        };
        Duration::from_millis(ms)
    }

    /// The delay before retry number `retry` with jitter applied, `unit` being a random draw
    /// from [0, 1) (values outside are clamped into it).
    pub fn jittered_delay(&self, retry: u32, unit: f64) -> Duration {
        let delay = self.delay(retry);
        let unit = if unit.is_finite() {
            unit.clamp(0.0, 1.0)
        } else {
            0.0
        };
        match self.jitter {
            Jitter::None => delay,
            Jitter::Full => delay.mul_f64(unit),
            Jitter::Equal => delay / 2 + (delay / 2).mul_f64(unit),
        }
    }

    /// Checks values no strategy can use, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if !self.backoff_multiplier.is_finite() || self.backoff_multiplier < 1.0 {
            return Err(format!(
                "backoff_multiplier {} is invalid: it must be a finite number of at least 1",
                self.backoff_multiplier
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(backoff: Strategy, interval: u64, multiplier: f64, cap: Option<u64>) -> RetryPolicy {
        RetryPolicy {
            backoff,
            backoff_interval_ms: interval,
            backoff_multiplier: multiplier,
            backoff_max_ms: cap,
            jitter: Jitter::None,
            max_retry_count: 5,
        }
    }

    #[test]
    fn jitter_spreads_the_delay_within_its_documented_range() {
        let base = policy(Strategy::Fixed, 1000, 2.0, None);
        // (jitter, random draw) → delay in ms
        let cases = [
            (Jitter::None, 0.3, 1000),
            (Jitter::Full, 0.0, 0),
            (Jitter::Full, 0.25, 250),
            (Jitter::Full, 0.999, 999),
            (Jitter::Equal, 0.0, 500),
            (Jitter::Equal, 0.5, 750),
            (Jitter::Full, 7.0, 1000),
            (Jitter::Full, f64::NAN, 0),
        ];
        for (jitter, unit, expected) in cases {
            let p = RetryPolicy {
                jitter,
                ..base.clone()
            };
            let got = p.jittered_delay(1, unit).as_millis();
            assert_eq!(got, expected, "{jitter:?} with u = {unit}");
        }
        assert_eq!("equal".parse::<Jitter>(), Ok(Jitter::Equal));
        assert!("some".parse::<Jitter>().unwrap_err().contains("`some`"));
    }

    #[test]
    fn delays_follow_the_documented_formulas() {
        let cases = [
            (
                policy(Strategy::Fixed, 200, 2.0, None),
                [200, 200, 200, 200],
            ),
            (
                policy(Strategy::Linear, 200, 2.0, None),
                [200, 400, 600, 800],
            ),
            (
                policy(Strategy::Exponential, 200, 2.0, None),
                [200, 400, 800, 1600],
            ),
            (
                policy(Strategy::Exponential, 100, 3.0, None),
                [100, 300, 900, 2700],
            ),
            (
                policy(Strategy::Exponential, 200, 2.0, Some(500)),
                [200, 400, 500, 500],
            ),
            (policy(Strategy::Linear, 0, 2.0, None), [0, 0, 0, 0]),
        ];
        for (policy, expected) in cases {
            let got: Vec<u64> = (1..=4)
                .map(|n| policy.delay(n).as_millis() as u64)
                .collect();
            assert_eq!(got, expected, "{policy:?}");
        }
    }

    #[test]
    fn huge_retries_saturate_instead_of_overflowing() {
        let exp = policy(Strategy::Exponential, u64::MAX / 2, 10.0, None);
        assert_eq!(exp.delay(u32::MAX), Duration::from_millis(u64::MAX));
        let lin = policy(Strategy::Linear, u64::MAX / 2, 1.0, None);
        assert_eq!(lin.delay(3), Duration::from_millis(u64::MAX));
    }

    #[test]
    fn max_retry_count_counts_retries_after_the_first_attempt() {
        let p = RetryPolicy {
            max_retry_count: 2,
            ..RetryPolicy::default()
        };
        assert_eq!(p.max_attempts(), 3);
        assert!(p.allows_retry_after(1));
        assert!(p.allows_retry_after(2));
        assert!(!p.allows_retry_after(3));
        let once = RetryPolicy {
            max_retry_count: 0,
            ..RetryPolicy::default()
        };
        assert!(!once.allows_retry_after(1));
    }

    #[test]
    fn multiplier_below_one_is_rejected() {
        let bad = policy(Strategy::Exponential, 100, 0.5, None);
        assert!(bad.validate().unwrap_err().contains("backoff_multiplier"));
        assert!(
            policy(Strategy::Exponential, 100, f64::NAN, None)
                .validate()
                .is_err()
        );
    }
}
