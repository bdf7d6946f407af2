//! Engine tests on a hand-driven clock: every time is an explicit `Instant`.

use super::*;
use crate::test_stats::chi_square_by_weight;

fn t0() -> Instant {
    Instant::now()
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// `n` calls per second, with no safety margin (the window is exactly one second).
fn exact_per_second(n: u32) -> RateLimit {
    RateLimit::per_second(n)
        .unwrap()
        .with_margin(Duration::ZERO)
}

/// The default settings with `limits` configured.
fn limited(limits: Vec<RateLimit>) -> Settings {
    Settings {
        limits,
        ..Settings::default()
    }
}

fn engine(n: u32, strategy: Strategy, settings: Settings, origin: Instant) -> Engine {
    let mut e = Engine::new(settings, strategy, Some(42), origin);
    for i in 0..n {
        e.add_key(Arc::from(format!("k{i}")), 1, None, origin);
    }
    e
}

fn grant(e: &mut Engine, now: Instant) -> LeaseToken {
    match e.acquire(now, &[]) {
        Acquire::Granted(t) => t,
        other => panic!("expected a lease, got {other:?}"),
    }
}

#[test]
fn round_robin_visits_every_key_in_turn() {
    let o = t0();
    let mut e = engine(4, Strategy::RoundRobin, Settings::default(), o);
    let picks: Vec<u32> = (0..8)
        .map(|_| {
            let t = grant(&mut e, o);
            e.report(t, Some(Outcome::Success), o);
            t.idx
        })
        .collect();
    assert_eq!(picks, vec![0, 1, 2, 3, 0, 1, 2, 3]);
}

#[test]
fn random_is_roughly_uniform() {
    let o = t0();
    let mut e = engine(5, Strategy::Random, Settings::default(), o);
    let mut counts = [0u32; 5];
    for _ in 0..50_000 {
        let t = grant(&mut e, o);
        counts[t.idx as usize] += 1;
        e.report(t, Some(Outcome::Success), o);
    }
    for c in counts {
        assert!((9_000..11_000).contains(&c), "{counts:?}");
    }
}

#[test]
fn least_used_spreads_in_flight_calls() {
    let o = t0();
    let mut e = engine(3, Strategy::LeastUsed, Settings::default(), o);
    let held: Vec<LeaseToken> = (0..6).map(|_| grant(&mut e, o)).collect();
    let mut per_key = [0; 3];
    for t in &held {
        per_key[t.idx as usize] += 1;
    }
    assert_eq!(per_key, [2, 2, 2]);
    // Free one call on key 1: it now has the fewest in flight and is picked next.
    let on_key1 = *held.iter().find(|t| t.idx == 1).unwrap();
    e.report(on_key1, Some(Outcome::Success), o);
    assert_eq!(grant(&mut e, o).idx, 1);
}

#[test]
fn weighted_follows_weights() {
    let o = t0();
    let mut e = Engine::new(Settings::default(), Strategy::Weighted, Some(3), o);
    e.add_key(Arc::from("light"), 1, None, o);
    e.add_key(Arc::from("heavy"), 3, None, o);
    let mut heavy = 0;
    for _ in 0..40_000 {
        let t = grant(&mut e, o);
        heavy += t.idx;
        e.report(t, Some(Outcome::Success), o);
    }
    assert!(
        (29_000..31_000).contains(&heavy),
        "heavy picked {heavy} of 40000"
    );
}

#[test]
fn rate_limit_cools_the_key_and_it_comes_back_by_itself() {
    let o = t0();
    let mut e = engine(1, Strategy::Random, Settings::default(), o);
    let t = grant(&mut e, o);
    e.report(t, Some(Outcome::rate_limited(Some(ms(1500)))), o);
    let r = e.explain(0, o).unwrap();
    assert!(matches!(
        r.state,
        KeyState::Cooling {
            reason: CoolReason::RateLimited,
            ..
        }
    ));
    assert!(r.skipped_because.unwrap().contains("rate limit"));
    match e.acquire(o + ms(10), &[]) {
        Acquire::Wait { until: Some(u) } => assert_eq!(u, o + ms(1500)),
        other => panic!("{other:?}"),
    }
    assert_eq!(grant(&mut e, o + ms(1500)).idx, 0);
    assert_eq!(e.explain(0, o + ms(1500)).unwrap().state, KeyState::Active);
}

#[test]
fn rate_limit_without_retry_after_uses_the_default_cooldown() {
    let o = t0();
    let settings = Settings {
        default_cooldown: ms(700),
        ..Settings::default()
    };
    let mut e = engine(1, Strategy::Random, settings, o);
    let t = grant(&mut e, o);
    e.report(t, Some(Outcome::rate_limited(None)), o);
    assert_eq!(
        e.acquire(o, &[]),
        Acquire::Wait {
            until: Some(o + ms(700))
        }
    );
}

#[test]
fn seed_behaviour_archives_on_rate_limit_when_asked() {
    let o = t0();
    let settings = Settings {
        archive_on_rate_limit: true,
        ..Settings::default()
    };
    let mut e = engine(1, Strategy::Random, settings, o);
    let t = grant(&mut e, o);
    e.report(t, Some(Outcome::rate_limited(Some(ms(10)))), o);
    assert_eq!(e.acquire(o + ms(3_600_000), &[]), Acquire::NoUsableKeys);
}

#[test]
fn ban_at_threshold_then_readmission() {
    let o = t0();
    let settings = Settings {
        ban_threshold: 3,
        ban_duration: Duration::from_secs(300),
        ..Settings::default()
    };
    let mut e = engine(2, Strategy::RoundRobin, settings, o);
    // Two failures on key 0, a success in between resets the count.
    for outcome in [
        Outcome::Failed,
        Outcome::Failed,
        Outcome::Success,
        Outcome::Failed,
        Outcome::Timeout,
    ] {
        let t = grant(&mut e, o);
        assert_eq!(t.idx, 0);
        e.report(t, Some(outcome), o);
        let t = grant(&mut e, o);
        assert_eq!(t.idx, 1);
        e.report(t, Some(Outcome::Success), o);
    }
    assert_eq!(e.explain(0, o).unwrap().consecutive_failures, 2);
    let t = grant(&mut e, o);
    e.report(t, Some(Outcome::Failed), o);
    let r = e.explain(0, o).unwrap();
    assert!(matches!(r.state, KeyState::Banned { .. }), "{r:?}");
    assert!(
        r.skipped_because
            .unwrap()
            .contains("banned after 3 consecutive failures")
    );
    for _ in 0..5 {
        let t = grant(&mut e, o + ms(1000));
        assert_eq!(t.idx, 1, "a banned key is skipped");
        e.report(t, Some(Outcome::Success), o);
    }
    let later = o + Duration::from_secs(300);
    let r = e.explain(0, later).unwrap();
    assert_eq!(r.state, KeyState::Active);
    assert!(r.available);
    let picks: Vec<u32> = (0..2)
        .map(|_| {
            let t = grant(&mut e, later);
            e.report(t, Some(Outcome::Success), later);
            t.idx
        })
        .collect();
    assert!(picks.contains(&0), "re-admitted after the ban: {picks:?}");
    assert_eq!(e.explain(0, later).unwrap().consecutive_failures, 0);
}

#[test]
fn not_key_related_does_not_punish() {
    let o = t0();
    let settings = Settings {
        ban_threshold: 1,
        ..Settings::default()
    };
    let mut e = engine(1, Strategy::Random, settings, o);
    for _ in 0..10 {
        let t = grant(&mut e, o);
        e.report(t, Some(Outcome::NotKeyRelated), o);
    }
    assert_eq!(e.explain(0, o).unwrap().state, KeyState::Active);
}

#[test]
fn invalid_key_is_archived_until_reset() {
    let o = t0();
    let mut e = engine(2, Strategy::RoundRobin, Settings::default(), o);
    let t = grant(&mut e, o);
    assert_eq!(t.idx, 0);
    e.report(t, Some(Outcome::InvalidKey), o);
    let r = e.explain(0, o).unwrap();
    assert_eq!(
        r.state,
        KeyState::Archived {
            reason: ArchiveReason::InvalidKey
        }
    );
    assert!(r.skipped_because.unwrap().contains("invalid"));
    for _ in 0..4 {
        assert_eq!(grant(&mut e, o + Duration::from_secs(86_400)).idx, 1);
    }
    e.reset(0, o);
    assert_eq!(e.explain(0, o).unwrap().state, KeyState::Active);
}

#[test]
fn disabled_keys_are_skipped_until_enabled_and_all_gone_means_no_usable_keys() {
    let o = t0();
    let mut e = engine(2, Strategy::Random, Settings::default(), o);
    e.disable(0);
    e.disable(1);
    assert_eq!(e.acquire(o, &[]), Acquire::NoUsableKeys);
    assert_eq!(
        e.explain(1, o).unwrap().skipped_because.as_deref(),
        Some("disabled by hand")
    );
    e.enable(1, o);
    assert_eq!(grant(&mut e, o).idx, 1);
}

#[test]
fn configured_window_is_never_exceeded_and_wait_time_is_exact() {
    let o = t0();
    let lim = exact_per_second(3);
    let settings = limited(vec![lim]);
    let mut e = engine(1, Strategy::Random, settings, o);
    for i in 0..3 {
        let t = grant(&mut e, o + ms(i * 100));
        e.report(t, Some(Outcome::Success), o + ms(i * 100 + 5));
    }
    // Fourth call in the same second must wait until the first (finished at 5 ms) leaves the window.
    assert_eq!(
        e.acquire(o + ms(300), &[]),
        Acquire::Wait {
            until: Some(o + ms(1005))
        }
    );
    assert!(
        e.explain(0, o + ms(300))
            .unwrap()
            .skipped_because
            .unwrap()
            .contains("window is full")
    );
    let t = grant(&mut e, o + ms(1005));
    // The call in flight counts as taking a place in the window until it finishes.
    assert_eq!(
        e.acquire(o + ms(1005), &[]),
        Acquire::Wait {
            until: Some(o + ms(1105))
        }
    );
    e.report(t, Some(Outcome::Success), o + ms(1010));
    assert_eq!(
        e.acquire(o + ms(1010), &[]),
        Acquire::Wait {
            until: Some(o + ms(1105))
        }
    );
}

#[test]
fn calls_in_flight_fill_the_window_until_they_finish() {
    let o = t0();
    let settings = limited(vec![RateLimit::per_second(2).unwrap()]);
    let mut e = engine(1, Strategy::Random, settings, o);
    let a = grant(&mut e, o);
    let _b = grant(&mut e, o);
    assert_eq!(e.acquire(o, &[]), Acquire::Wait { until: None });
    assert!(
        e.explain(0, o)
            .unwrap()
            .skipped_because
            .unwrap()
            .contains("in flight")
    );
    // A call that takes 300 ms may have reached the upstream as late as its end.
    e.report(a, Some(Outcome::Success), o + ms(300));
    assert_eq!(
        e.acquire(o + ms(300), &[]),
        Acquire::Wait {
            until: Some(o + ms(1300))
        }
    );
}

#[test]
fn several_windows_combine() {
    let o = t0();
    let settings = limited(vec![
        exact_per_second(2),
        RateLimit::per_minute(3)
            .unwrap()
            .with_margin(Duration::ZERO),
    ]);
    let mut e = engine(1, Strategy::Random, settings, o);
    for at in [o, o, o + ms(1000)] {
        if at > o {
            assert_eq!(
                e.acquire(o, &[]),
                Acquire::Wait {
                    until: Some(o + ms(1000))
                }
            );
        }
        let t = grant(&mut e, at);
        e.report(t, Some(Outcome::Success), at);
    }
    // Per-minute window (3) is now full until the first call is a minute old.
    assert_eq!(
        e.acquire(o + ms(1000), &[]),
        Acquire::Wait {
            until: Some(o + ms(60_000))
        }
    );
}

#[test]
fn max_in_flight_waits_for_a_release() {
    let o = t0();
    let settings = Settings {
        max_in_flight: 2,
        ..Settings::default()
    };
    let mut e = engine(1, Strategy::Random, settings, o);
    let a = grant(&mut e, o);
    let _b = grant(&mut e, o);
    assert_eq!(e.acquire(o, &[]), Acquire::Wait { until: None });
    assert!(
        e.explain(0, o)
            .unwrap()
            .skipped_because
            .unwrap()
            .contains("in-flight limit")
    );
    e.report(a, None, o);
    grant(&mut e, o);
}

#[test]
fn avoid_prefers_other_keys_but_falls_back() {
    let o = t0();
    let mut e = engine(3, Strategy::Random, Settings::default(), o);
    for _ in 0..200 {
        let t = match e.acquire(o, &[0, 1]) {
            Acquire::Granted(t) => t,
            other => panic!("{other:?}"),
        };
        assert_eq!(t.idx, 2);
        e.report(t, Some(Outcome::Success), o);
    }
    e.disable(2);
    let t = match e.acquire(o, &[0, 1]) {
        Acquire::Granted(t) => t,
        other => panic!("{other:?}"),
    };
    assert!(t.idx < 2, "falls back to an avoided key rather than wait");
}

/// Serves `n` calls granted every `gap` ms from `o`, each reported a success `took` ms later.
fn serve(e: &mut Engine, o: Instant, (n, gap, took): (u64, u64, u64)) {
    for i in 0..n {
        let t = grant(e, o + ms(i * gap));
        e.report(t, Some(Outcome::Success), o + ms(i * gap + took));
    }
}

/// Key 0 serves `n` calls granted every `gap` ms from `o`, each reported a success `took` ms
/// later; then a call at `refused_at` ms is refused with `Retry-After: retry_after` ms. The limit
/// the engine learned from it.
fn serve_then_refuse(
    e: &mut Engine,
    o: Instant,
    (n, gap, took): (u64, u64, u64),
    refused_at: u64,
    retry_after: u64,
) -> (u32, Duration) {
    serve(e, o, (n, gap, took));
    let t = grant(e, o + ms(refused_at));
    e.report(
        t,
        Some(Outcome::rate_limited(Some(ms(retry_after)))),
        o + ms(refused_at),
    );
    e.explain(0, o + ms(refused_at))
        .unwrap()
        .learned_limit
        .expect("a limit is learned")
}

/// Asks for a key every millisecond from `from` until `to`, reporting each grant as a success at
/// once; the times of the grants.
fn grants_each_ms(e: &mut Engine, from: Instant, to: Instant) -> Vec<Instant> {
    let mut granted = Vec::new();
    let mut now = from;
    while now < to {
        if let Acquire::Granted(t) = e.acquire(now, &[]) {
            granted.push(now);
            e.report(t, Some(Outcome::Success), now);
        }
        now += ms(1);
    }
    granted
}

#[test]
fn learns_the_limit_from_a_429_and_stops_hammering() {
    let o = t0();
    let mut e = engine(1, Strategy::Random, Settings::default(), o);
    // The upstream allows 5 per second. Five successes, then a 429 saying "free at t=1s".
    let learned = serve_then_refuse(&mut e, o, (5, 10, 5), 60, 940);
    assert_eq!(learned, (5, ms(1000)));
    // From the cooldown's end the key is paced to 5 per learned window: no burst of 429s.
    let granted = grants_each_ms(&mut e, o + ms(1000), o + ms(1990)).len();
    assert!(granted <= 5, "granted {granted} in the second window");
    assert!(granted >= 4, "granted only {granted}");
}

#[test]
fn late_success_reports_from_the_learning_epoch_still_count() {
    let o = t0();
    let mut e = engine(1, Strategy::Random, Settings::default(), o);
    let early: Vec<LeaseToken> = (0..4).map(|i| grant(&mut e, o + ms(i))).collect();
    e.report(early[0], Some(Outcome::Success), o + ms(10));
    let t = grant(&mut e, o + ms(11));
    e.report(t, Some(Outcome::rate_limited(Some(ms(989)))), o + ms(12));
    for t in &early[1..] {
        e.report(*t, Some(Outcome::Success), o + ms(20));
    }
    assert_eq!(
        e.explain(0, o + ms(20)).unwrap().learned_limit.unwrap().0,
        4
    );
}

#[test]
fn scope_cools_when_several_keys_are_refused_together() {
    let o = t0();
    let mut e = Engine::new(Settings::default(), Strategy::RoundRobin, Some(1), o);
    e.add_key(Arc::from("a1"), 1, Some("acct"), o);
    e.add_key(Arc::from("a2"), 1, Some("acct"), o);
    e.add_key(Arc::from("a3"), 1, Some("acct"), o);
    e.add_key(Arc::from("b1"), 1, None, o);
    let t1 = grant(&mut e, o);
    let t2 = grant(&mut e, o);
    e.report(t1, Some(Outcome::rate_limited(Some(ms(5000)))), o);
    e.report(t2, Some(Outcome::rate_limited(Some(ms(5000)))), o + ms(100));
    // a3 was never refused, but its scope is cooling: only b1 serves.
    for _ in 0..4 {
        let t = grant(&mut e, o + ms(200));
        assert_eq!(t.idx, 3);
        e.report(t, Some(Outcome::Success), o + ms(200));
    }
    let r = e.explain(2, o + ms(200)).unwrap();
    assert!(
        r.skipped_because
            .unwrap()
            .contains("scope 'acct' is cooling")
    );
    assert_eq!(r.state, KeyState::Active, "the key itself is not punished");
    let later = o + ms(5200);
    let picks: Vec<u32> = (0..4).map(|_| grant(&mut e, later).idx).collect();
    assert!(picks.contains(&2), "scope restored: {picks:?}");
}

#[test]
fn scope_wide_marker_cools_the_scope_at_once_and_scope_limits_hold() {
    let o = t0();
    let mut e = Engine::new(Settings::default(), Strategy::RoundRobin, Some(1), o);
    e.define_scope("acct", vec![exact_per_second(3)], 0);
    for name in ["a1", "a2"] {
        e.add_key(Arc::from(name), 1, Some("acct"), o);
    }
    // Scope limit 3/s across both keys.
    for _ in 0..3 {
        let t = grant(&mut e, o);
        e.report(t, Some(Outcome::Success), o);
    }
    assert_eq!(
        e.acquire(o, &[]),
        Acquire::Wait {
            until: Some(o + ms(1000))
        }
    );
    let t = grant(&mut e, o + ms(1000));
    e.report(
        t,
        Some(Outcome::RateLimited {
            retry_after: Some(ms(2000)),
            scope_wide: true,
        }),
        o + ms(1000),
    );
    assert_eq!(
        e.acquire(o + ms(1001), &[]),
        Acquire::Wait {
            until: Some(o + ms(3000))
        }
    );
}

#[test]
fn removed_keys_ignore_late_reports_and_slots_are_reused() {
    let o = t0();
    let mut e = engine(2, Strategy::RoundRobin, Settings::default(), o);
    let t = grant(&mut e, o);
    assert_eq!(t.idx, 0);
    e.remove_key(0);
    e.report(t, Some(Outcome::Failed), o);
    assert_eq!(e.len(), 1);
    assert_eq!(e.in_flight(), 0);
    let idx = e.add_key(Arc::from("new"), 1, None, o);
    assert_eq!(idx, 0);
    let r = e.explain(0, o).unwrap();
    assert_eq!(&*r.identifier, "new");
    assert_eq!(r.failures, 0);
}

#[test]
fn strategy_switch_keeps_membership() {
    let o = t0();
    let mut e = engine(3, Strategy::Random, Settings::default(), o);
    e.disable(1);
    e.set_strategy(Strategy::RoundRobin);
    let picks: Vec<u32> = (0..4).map(|_| grant(&mut e, o).idx).collect();
    assert_eq!(picks, vec![0, 2, 0, 2]);
}

#[test]
fn exhausted_pool_reports_the_earliest_free_time() {
    let o = t0();
    let mut e = engine(2, Strategy::Random, Settings::default(), o);
    let a = grant(&mut e, o);
    let b = grant(&mut e, o);
    let (first, second) = if a.idx == 0 { (a, b) } else { (b, a) };
    e.report(first, Some(Outcome::rate_limited(Some(ms(3000)))), o);
    e.report(second, Some(Outcome::rate_limited(Some(ms(2000)))), o);
    assert_eq!(
        e.acquire(o, &[]),
        Acquire::Wait {
            until: Some(o + ms(2000))
        }
    );
}

#[test]
fn a_key_learning_its_limit_keeps_one_tally_line_and_no_log() {
    let o = t0();
    let mut e = engine(1, Strategy::Random, Settings::default(), o);
    // Thousands of calls and no refusal: nothing grows (the log of every completion time grew
    // to 512 per key, 400 MB in a 100,000-key pool).
    serve(&mut e, o, (5_000, 1, 0));
    assert_eq!(e.slots[0].log.capacity(), 0);
    assert_eq!(
        e.tallies[0].buckets().iter().map(|b| b.1).sum::<u32>(),
        5_000
    );
}

#[test]
fn a_limit_learned_from_a_steady_epoch_paces_from_the_epochs_calls() {
    let o = t0();
    let mut e = engine(1, Strategy::Random, Settings::default(), o);
    // The upstream allows 10 per second (sliding): calls every 100 ms for 2 s, all served, then
    // a burst the upstream refuses at 2.0 s, free again at 2.1 s. The epoch began at 0 (20
    // calls), so the learned limit is 20 per 2.1 s and the key's window holds those calls.
    let learned = serve_then_refuse(&mut e, o, (20, 100, 1), 2_000, 100);
    assert_eq!(learned, (20, ms(2_100)));
    // Back at 2.1 s: the window still counts the epoch's calls (at their buckets' times, never
    // earlier than they finished), so the key is paced, not handed a burst of 20.
    let granted = grants_each_ms(&mut e, o + ms(2_100), o + ms(3_000));
    assert!(
        granted.len() <= 10,
        "{} granted in 0.9 s after coming back: {granted:?}",
        granted.len()
    );
    assert!(!granted.is_empty(), "the key comes back");
}

#[test]
fn a_key_that_stops_learning_keeps_its_history_under_configured_limits() {
    let o = t0();
    let mut e = engine(1, Strategy::Random, Settings::default(), o);
    serve(&mut e, o, (3, 1, 0));
    // A limit of 3 per second is configured: the three calls just made fill the window.
    e.apply_settings(limited(vec![exact_per_second(3)]));
    assert_eq!(
        e.acquire(o + ms(3), &[]),
        Acquire::Wait {
            until: Some(o + ms(1000))
        }
    );
}

#[test]
fn apply_settings_keeps_history() {
    let o = t0();
    let mut e = engine(1, Strategy::Random, Settings::default(), o);
    e.apply_settings(limited(vec![exact_per_second(100)]));
    serve(&mut e, o, (3, 0, 0));
    e.apply_settings(limited(vec![exact_per_second(3)]));
    assert_eq!(
        e.acquire(o, &[]),
        Acquire::Wait {
            until: Some(o + ms(1000))
        }
    );
}

#[test]
fn hot_slot_is_two_cache_lines() {
    // A pick in a large pool touches the hot slot (and the key's log tail) only: keep it at two
    // aligned cache lines. Adding a field here means moving a rarely-read one to `Cold`.
    assert_eq!(align_of::<Slot>(), 64);
    assert_eq!(size_of::<Slot>(), 128);
}

#[test]
fn slot_state_round_trips_through_tag_and_reason() {
    let mut s = Slot::new(0, NO_SCOPE, 0);
    let states = [
        State::Active,
        State::Cooling {
            until: 7,
            reason: CoolReason::RateLimited,
        },
        State::Cooling {
            until: 9,
            reason: CoolReason::QuotaExhausted,
        },
        State::Banned { until: 11 },
        State::Archived(ArchiveReason::InvalidKey),
        State::Archived(ArchiveReason::RateLimited),
        State::Archived(ArchiveReason::Unusable),
        State::Archived(ArchiveReason::Manual),
        State::Disabled,
    ];
    for st in states {
        s.set_state(st);
        assert_eq!(s.state(), st);
    }
}

#[test]
fn keys_without_limits_keep_no_log_and_limited_keys_keep_one_window() {
    let o = t0();
    // Nothing to enforce and nothing to learn: no completion times are kept.
    let settings = Settings {
        learn: false,
        ..Settings::default()
    };
    let mut e = engine(1, Strategy::RoundRobin, settings, o);
    serve(&mut e, o, (100, 1, 0));
    assert_eq!(e.slots[0].log.len(), 0);
    // A limit of 5: only the last 5 completions are kept (the window never needs more).
    let settings = limited(vec![RateLimit::new(5, Duration::from_millis(10)).unwrap()]);
    let mut e = engine(1, Strategy::RoundRobin, settings, o);
    for i in 0..100 {
        let now = o + ms(i * 10);
        let t = grant(&mut e, now);
        e.report(t, Some(Outcome::Success), now);
    }
    assert_eq!(e.slots[0].log.len(), 5);
    assert_eq!(e.slots[0].log.capacity(), 8);
}

/// An engine that looks ahead whatever its size.
fn grant_ahead(e: &mut Engine, now: Instant) -> LeaseToken {
    let _ = e.look_ahead();
    grant(e, now)
}

fn ahead_engine(strategy: Strategy, settings: Settings, weights: &[u32], o: Instant) -> Engine {
    let mut e = Engine::new(settings, strategy, Some(42), o);
    e.set_ahead_from(0);
    for (i, &w) in weights.iter().enumerate() {
        e.add_key(Arc::from(format!("k{i}")), w, None, o);
    }
    e
}

#[test]
fn picks_drawn_ahead_keep_random_and_weighted_distributions() {
    let o = t0();
    for (strategy, weights) in [
        (Strategy::Random, vec![1u32; 7]),
        (Strategy::Weighted, vec![1, 1, 1, 1]),
        (Strategy::Weighted, vec![1, 2, 3, 10]),
        (Strategy::Weighted, vec![1, 99]),
    ] {
        let mut e = ahead_engine(strategy, Settings::default(), &weights, o);
        let mut counts = vec![0u64; weights.len()];
        for i in 0..80_000 {
            let read = e.look_ahead().is_some();
            assert_eq!(
                read,
                i % BATCH == 0,
                "{strategy:?}: reads ahead every BATCH calls"
            );
            if read {
                assert_eq!(e.ahead.len, RING, "{strategy:?}: the next picks are drawn");
            }
            let t = grant(&mut e, o);
            counts[t.idx as usize] += 1;
            e.report(t, Some(Outcome::Success), o);
        }
        let chi = chi_square_by_weight(&counts, &weights);
        // At most 6 degrees of freedom: P(chi² > 30) < 1e-4.
        assert!(
            chi < 30.0,
            "{strategy:?} {weights:?}: chi² {chi}, counts {counts:?}"
        );
    }
}

#[test]
fn a_pick_drawn_ahead_is_assessed_when_taken() {
    // One call in flight per key: a key drawn ahead (possibly twice) that is taken by then must
    // not be granted again; every key is granted once, then the engine waits for a release.
    let one = Settings {
        max_in_flight: 1,
        ..Settings::default()
    };
    for strategy in [
        Strategy::Random,
        Strategy::Weighted,
        Strategy::RoundRobin,
        Strategy::LeastUsed,
    ] {
        let o = t0();
        let mut e = ahead_engine(strategy, one.clone(), &[1, 2, 1, 3], o);
        for round in 0..50 {
            let mut held: Vec<LeaseToken> = (0..4).map(|_| grant_ahead(&mut e, o)).collect();
            let mut keys: Vec<u32> = held.iter().map(|t| t.idx).collect();
            keys.sort_unstable();
            assert_eq!(keys, vec![0, 1, 2, 3], "{strategy:?} round {round}");
            assert_eq!(
                e.acquire(o, &[]),
                Acquire::Wait { until: None },
                "{strategy:?}"
            );
            for t in held.drain(..) {
                e.report(t, Some(Outcome::Success), o);
            }
        }
    }
}

#[test]
fn keys_drawn_ahead_then_disabled_or_removed_are_never_granted() {
    let o = t0();
    for strategy in [Strategy::Random, Strategy::Weighted] {
        let mut e = ahead_engine(strategy, Settings::default(), &[1; 6], o);
        let t = grant_ahead(&mut e, o);
        e.report(t, Some(Outcome::Success), o);
        assert_eq!(
            e.ahead.len,
            RING - 1,
            "{strategy:?}: the next picks are drawn"
        );
        // The next two picks drawn (distinct ones: draw until two differ).
        let gone = e.ahead.get(0).expect("drawn");
        let off = (0..RING)
            .filter_map(|i| e.ahead.get(i))
            .find(|&k| k != gone)
            .expect("16 draws over 6 keys differ");
        e.remove_key(gone);
        e.disable(off);
        assert_eq!(e.ahead.len, 0, "{strategy:?}: the draws ahead are dropped");
        for _ in 0..2_000 {
            let t = grant_ahead(&mut e, o);
            assert!(
                t.idx != gone && t.idx != off,
                "{strategy:?}: granted {}",
                t.idx
            );
            e.report(t, Some(Outcome::Success), o);
        }
    }
}

#[test]
fn a_key_added_after_the_draw_ahead_is_picked_at_once() {
    // The draws ahead are dropped when the members change: a new key is in the very next draw.
    let o = t0();
    let mut e = ahead_engine(Strategy::Random, Settings::default(), &[1], o);
    for _ in 0..10 {
        let t = grant_ahead(&mut e, o);
        e.report(t, Some(Outcome::Success), o);
    }
    assert!(e.ahead.len > 0);
    e.add_key(Arc::from("new"), 1, None, o);
    assert_eq!(
        e.ahead.len, 0,
        "the draws ahead are dropped when a key joins"
    );
    let picks: Vec<u32> = (0..64)
        .map(|_| {
            let t = grant_ahead(&mut e, o);
            e.report(t, Some(Outcome::Success), o);
            t.idx
        })
        .collect();
    // Before the change every pick drawn ahead was key 0: kept, they would have held the new
    // key back for up to 16 picks.
    assert!(picks.iter().take(8).any(|&k| k == 1), "{picks:?}");
    assert!(picks.iter().filter(|&&k| k == 1).count() > 16, "{picks:?}");
}
