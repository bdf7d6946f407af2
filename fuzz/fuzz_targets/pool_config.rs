//! `PoolConfig::from_json` (apipool::config): the `pool_config` object comes from the server, the
//! dashboard's config editor and users' files.
//!
//! Invariants: an accepted config validates, its limits build, its durations are positive and
//! finite, and it survives a JSON round trip unchanged (unknown fields included).
#![no_main]

use std::time::Duration;

use apipool::PoolConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let Ok(cfg) = PoolConfig::from_json(&value) else {
        return;
    };
    cfg.validate().expect("an accepted config validates");
    let limits = cfg.limits().expect("an accepted config has valid limits");
    assert_eq!(
        limits.len(),
        usize::from(cfg.rate_limit > 0) + cfg.rate_limits.len()
    );
    for l in &limits {
        assert!(l.limit() > 0 && !l.interval().is_zero(), "{l:?}");
    }
    let timeout = cfg.timeout_duration();
    assert!(!timeout.is_zero());
    assert_eq!(timeout, Duration::from_secs_f64(cfg.timeout));
    if let Some(w) = cfg.max_wait {
        assert_eq!(cfg.max_wait_duration(), Duration::from_secs_f64(w));
    } else {
        assert_eq!(cfg.max_wait_duration(), timeout);
    }
    let json = serde_json::to_value(&cfg).expect("serializes");
    let again = PoolConfig::from_json(&json).expect("a serialized config parses again");
    assert_eq!(again, cfg, "round trip through {json}");
});
