//! The scheduler's tick record on a real Redis: initialise without firing, fire a due tick
//! once, catch up only the latest missed tick, and agree on dedupe keys across replicas.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use sessionfleet::schedule::{Cadence, Schedule, TickDecision, pass, tick_dedupe_key};
use sessionfleet::testing::{RedisKeysGuard, redis_url, unique_namespace};

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

async fn redis() -> redis::aio::ConnectionManager {
    redis::Client::open(redis_url())
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap()
}

type Fired = Arc<Mutex<Vec<String>>>;

async fn run_pass(
    conn: &mut redis::aio::ConnectionManager,
    ns: &str,
    s: &Schedule,
    now: &str,
    fired: &Fired,
) -> TickDecision {
    let fired = fired.clone();
    pass(conn, ns, s, at(now), |_tick, key| async move {
        fired.lock().unwrap().push(key);
        Ok::<(), String>(())
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn first_pass_initialises_then_each_tick_fires_once() {
    let mut conn = redis().await;
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let s = Schedule {
        name: "cleanup".into(),
        cadence: Cadence::parse("every 60s").unwrap(),
        fire_on_first_sight: false,
    };
    let fired: Fired = Arc::default();
    assert_eq!(
        run_pass(&mut conn, &ns, &s, "2026-11-28T03:00:30Z", &fired).await,
        TickDecision::Initialized(at("2026-11-28T03:00:00Z").timestamp())
    );
    assert_eq!(
        run_pass(&mut conn, &ns, &s, "2026-11-28T03:00:59Z", &fired).await,
        TickDecision::Idle
    );
    assert!(
        fired.lock().unwrap().is_empty(),
        "installing does not fire past ticks"
    );
    let next = run_pass(&mut conn, &ns, &s, "2026-11-28T03:01:01Z", &fired).await;
    assert_eq!(
        next,
        TickDecision::Fired(at("2026-11-28T03:01:00Z").timestamp())
    );
    assert_eq!(
        run_pass(&mut conn, &ns, &s, "2026-11-28T03:01:30Z", &fired).await,
        TickDecision::Idle
    );
    assert_eq!(
        fired.lock().unwrap().as_slice(),
        [tick_dedupe_key("cleanup", at("2026-11-28T03:01:00Z"))]
    );
}

/// A schedule that fires on first sight (a cleanup daemon) enqueues the latest tick on its
/// first pass, once across replicas, and then keeps to its cadence. Fails if a cleanup daemon
/// waits up to a whole interval before its first cleanup, as it did.
#[tokio::test]
async fn a_cleanup_schedule_fires_on_its_first_pass_then_keeps_its_cadence() {
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let s = Schedule {
        name: "cleanup".into(),
        cadence: Cadence::parse("every 3600s").unwrap(),
        fire_on_first_sight: true,
    };
    let fired: Fired = Arc::default();
    let mut handles = Vec::new();
    for _ in 0..3 {
        let (ns, s, fired) = (ns.clone(), s.clone(), fired.clone());
        handles.push(tokio::spawn(async move {
            let mut conn = redis().await;
            run_pass(&mut conn, &ns, &s, "2026-11-28T03:20:00Z", &fired).await
        }));
    }
    let mut decisions = Vec::new();
    for h in handles {
        decisions.push(h.await.unwrap());
    }
    let first_tick = at("2026-11-28T03:00:00Z");
    assert!(
        decisions.contains(&TickDecision::Fired(first_tick.timestamp())),
        "{decisions:?}"
    );
    let keys = fired.lock().unwrap().clone();
    assert!(
        !keys.is_empty()
            && keys
                .iter()
                .all(|k| *k == tick_dedupe_key("cleanup", first_tick)),
        "replicas that race on the first pass share one dedupe key: {keys:?}"
    );
    let mut conn = redis().await;
    fired.lock().unwrap().clear();
    assert_eq!(
        run_pass(&mut conn, &ns, &s, "2026-11-28T03:59:00Z", &fired).await,
        TickDecision::Idle
    );
    assert_eq!(
        run_pass(&mut conn, &ns, &s, "2026-11-28T04:00:01Z", &fired).await,
        TickDecision::Fired(at("2026-11-28T04:00:00Z").timestamp())
    );
    assert_eq!(fired.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn downtime_catches_up_the_latest_missed_tick_once() {
    let mut conn = redis().await;
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let s = Schedule {
        name: "health_report".into(),
        cadence: Cadence::parse("0 * * * *").unwrap(),
        fire_on_first_sight: false,
    };
    let fired: Fired = Arc::default();
    run_pass(&mut conn, &ns, &s, "2026-11-28T01:10:00Z", &fired).await;
    // Down from 01:10 to 05:30: four hourly ticks due; 05:00 is caught up, the three
    // before it are skipped.
    let d = run_pass(&mut conn, &ns, &s, "2026-11-28T05:30:00Z", &fired).await;
    assert_eq!(
        d,
        TickDecision::CaughtUp {
            tick: at("2026-11-28T05:00:00Z").timestamp(),
            missed: 3
        }
    );
    run_pass(&mut conn, &ns, &s, "2026-11-28T05:31:00Z", &fired).await;
    assert_eq!(fired.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn replicas_agree_on_the_record_and_the_dedupe_key() {
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let s = Schedule {
        name: "full_maintenance".into(),
        cadence: Cadence::parse("0 2 * * *").unwrap(),
        fire_on_first_sight: false,
    };
    let fired: Fired = Arc::default();
    let mut first = redis().await;
    run_pass(&mut first, &ns, &s, "2026-11-27T03:00:00Z", &fired).await;
    let mut handles = Vec::new();
    for _ in 0..3 {
        let (ns, s, fired) = (ns.clone(), s.clone(), fired.clone());
        handles.push(tokio::spawn(async move {
            let mut conn = redis().await;
            run_pass(&mut conn, &ns, &s, "2026-11-28T02:00:05Z", &fired).await
        }));
    }
    for h in handles {
        let d = h.await.unwrap();
        assert!(
            matches!(d, TickDecision::Fired(_) | TickDecision::Idle),
            "{d:?}"
        );
    }
    let keys = fired.lock().unwrap().clone();
    assert!(!keys.is_empty());
    let expected = tick_dedupe_key("full_maintenance", at("2026-11-28T02:00:00Z"));
    assert!(keys.iter().all(|k| *k == expected), "{keys:?}");
}

/// A replica whose clock ran a day fast recorded tomorrow's tick; a correct replica does not
/// stay silent until tomorrow: it replaces the record and fires. A peer a little ahead (within
/// the allowance) is trusted: its tick stands and nothing fires twice.
#[tokio::test]
async fn a_record_written_by_a_fast_clock_does_not_silence_the_others() {
    let mut conn = redis().await;
    let ns = unique_namespace();
    let _keys = RedisKeysGuard::new(&ns);
    let s = Schedule {
        name: "cleanup".into(),
        cadence: Cadence::parse("every 60s").unwrap(),
        fire_on_first_sight: true,
    };
    let fired: Fired = Arc::default();
    // The fast replica, a day ahead.
    run_pass(&mut conn, &ns, &s, "2026-11-29T03:00:10Z", &fired).await;
    // A correct replica a day earlier.
    assert_eq!(
        run_pass(&mut conn, &ns, &s, "2026-11-28T03:00:10Z", &fired).await,
        TickDecision::FutureRecordReplaced {
            tick: at("2026-11-28T03:00:00Z").timestamp(),
            recorded: at("2026-11-29T03:00:00Z").timestamp(),
        }
    );
    assert_eq!(
        fired.lock().unwrap().last().cloned(),
        Some(tick_dedupe_key("cleanup", at("2026-11-28T03:00:00Z")))
    );
    // From then on the record follows the correct clock: the next tick fires as usual.
    assert_eq!(
        run_pass(&mut conn, &ns, &s, "2026-11-28T03:01:05Z", &fired).await,
        TickDecision::Fired(at("2026-11-28T03:01:00Z").timestamp())
    );
    // A peer two seconds ahead fired 03:02 at its 03:02:00; here it is 03:01:58: idle.
    run_pass(&mut conn, &ns, &s, "2026-11-28T03:02:00Z", &fired).await;
    let before = fired.lock().unwrap().len();
    assert_eq!(
        run_pass(&mut conn, &ns, &s, "2026-11-28T03:01:58Z", &fired).await,
        TickDecision::Idle
    );
    assert_eq!(fired.lock().unwrap().len(), before);
}

/// The scheduler's "now" is the Redis server's clock, read with `TIME`: the same for every
/// replica whatever its own clock says.
#[tokio::test]
async fn the_scheduler_s_clock_is_the_redis_server_s() {
    let mut conn = redis().await;
    let (secs, _micros): (i64, u32) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let now = sessionfleet::schedule::server_now(&mut conn).await.unwrap();
    let (after, _): (i64, u32) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    assert!(
        (secs..=after).contains(&now.timestamp()),
        "{now} not within the server's {secs}..={after}"
    );
}
