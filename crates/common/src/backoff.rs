//! Capped exponential backoff with full jitter, shared by every reconnect and
//! retry loop.

use std::time::Duration;

use rand::Rng;

/// A backoff schedule: attempt n waits a random time in
/// `[0, min(cap, initial * 2^n)]` ("full jitter").
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// A schedule starting at `initial`, never above `cap`.
    pub fn new(initial: Duration, cap: Duration) -> Self {
        Self {
            initial,
            cap,
            attempt: 0,
        }
    }

    /// The ceiling of the next wait, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 2u32.saturating_pow(self.attempt.min(30));
        self.initial.saturating_mul(factor).min(self.cap)
    }

    /// The next wait, jittered, and advances the schedule.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let millis = ceiling.as_millis() as u64;
        Duration::from_millis(rand::thread_rng().gen_range(0..=millis))
    }

    /// Attempts made since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Starts again from `initial` (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Full-jitter backoff as a pure function of the attempt number (0-based),
/// for schedules whose attempt count is shared through Redis: returns the
/// ceiling `min(cap, initial × 2^attempt)` and a wait drawn uniformly from
/// `[0, ceiling]`.
pub fn full_jitter(initial: Duration, cap: Duration, attempt: u32) -> (Duration, Duration) {
    let ceiling = initial
        .saturating_mul(2u32.saturating_pow(attempt.min(30)))
        .min(cap);
    let wait = Duration::from_millis(rand::thread_rng().gen_range(0..=ceiling.as_millis() as u64));
    (ceiling, wait)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_grows_then_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let mut ceilings = Vec::new();
        for _ in 0..6 {
            ceilings.push(b.ceiling().as_millis());
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(1));
        }
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(100));
    }

    #[test]
    fn full_jitter_ceilings_grow_and_cap() {
        let (i, cap) = (Duration::from_millis(300), Duration::from_secs(1));
        let ceilings: Vec<u128> = (0..4)
            .map(|a| full_jitter(i, cap, a).0.as_millis())
            .collect();
        assert_eq!(ceilings, vec![300, 600, 1000, 1000]);
        for a in 0..10 {
            let (ceiling, wait) = full_jitter(i, cap, a);
            assert!(wait <= ceiling);
        }
    }
}
