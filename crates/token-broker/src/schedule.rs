//! When to refresh a token (pure logic).

use std::time::Duration;

use common::config::TokenBrokerConfig;

/// The refresh lead for a token of `lifetime`: max(`refresh-lead-min`,
/// `refresh-lead-fraction` × lifetime), never more than
/// `refresh-max-fraction` × lifetime (so never earlier than half-life by default).
pub fn lead(lifetime: Duration, cfg: &TokenBrokerConfig) -> Duration {
    let by_fraction = lifetime.mul_f64(cfg.refresh_lead_fraction);
    let cap = lifetime.mul_f64(cfg.refresh_max_fraction);
    cfg.refresh_lead_min.max(by_fraction).min(cap)
}

/// When (epoch milliseconds) a token issued at `issued_at` and expiring at
/// `expires_at` (epoch seconds) is due for refresh.
pub fn refresh_due_ms(issued_at: u64, expires_at: u64, cfg: &TokenBrokerConfig) -> u64 {
    let lifetime = Duration::from_secs(expires_at.saturating_sub(issued_at));
    (expires_at * 1000).saturating_sub(lead(lifetime, cfg).as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(min: u64, fraction: f64, max: f64) -> TokenBrokerConfig {
        // The defaults, with tokens in clear so no key file is needed.
        let options = common::config::LoadOptions {
            path: None,
            env: vec![(
                "MAILAGENT_TOKEN_BROKER__TOKEN_ENCRYPTION".into(),
                "none".into(),
            )],
        };
        let mut c = common::config::load(&options, common::Component::FormProcessor)
            .map(|c| c.token_broker)
            .unwrap_or_else(|e| panic!("defaults load: {e}"));
        c.refresh_lead_min = Duration::from_secs(min);
        c.refresh_lead_fraction = fraction;
        c.refresh_max_fraction = max;
        c
    }

    #[test]
    fn lead_table() {
        let d = cfg(300, 0.2, 0.5);
        let cases = [
            // (lifetime s, expected lead s)
            (3600, 720), // 20 % of an hour
            (4500, 900), // Entra's 75 min
            (1200, 300), // the 5-minute floor
            (400, 200),  // never earlier than half-life
            (6, 3),
        ];
        for (lifetime, expected) in cases {
            assert_eq!(
                lead(Duration::from_secs(lifetime), &d),
                Duration::from_secs(expected),
                "lifetime {lifetime}"
            );
        }
        let half = cfg(0, 0.5, 0.5);
        assert_eq!(refresh_due_ms(100, 106, &half), 103_000);
    }
}
