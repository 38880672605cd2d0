//! The Redis store against a real Redis and a real Redis Cluster: what a
//! write does to a lead's stored timer (set, kept, cleared), that a load
//! returns each lead's state with the timer the store holds for it, that
//! a write from an owner that lost the shard changes nothing, and that
//! erasure markers are kept and forgotten.

mod common;

use common::{Names, Redis};
use leadscore::settings::{RedisMode, RedisSettings};
use leadscore::shard::cache::LeadKey;
use leadscore::store::redis::RedisStore;
use leadscore::store::{ShardWrite, Store, TimerWrite, Written};

fn store(redis: &Redis, prefix: &str) -> RedisStore {
    RedisStore::connect(&RedisSettings {
        url: redis.url.clone(),
        mode: if redis.is_cluster() {
            RedisMode::Cluster
        } else {
            RedisMode::Single
        },
        key_prefix: prefix.to_owned(),
        ..RedisSettings::default()
    })
    .unwrap()
}

fn lead<'a>(id: &str, state: &'a [u8], timer: TimerWrite) -> (LeadKey, &'a [u8], TimerWrite) {
    (LeadKey::lead(id), state, timer)
}

fn write(
    store: &RedisStore,
    epoch: u64,
    seq: u64,
    leads: Vec<(LeadKey, &[u8], TimerWrite)>,
) -> Written {
    let mut w = ShardWrite {
        shard: 2,
        epoch,
        seq,
        positions: vec![("t".into(), seq as i64)],
        ..ShardWrite::default()
    };
    for (key, state, timer) in leads {
        w.push_lead(key, state, timer);
    }
    store.write(&[w]).unwrap().remove(0)
}

fn stored_timers_are_set_kept_and_cleared(redis: Redis) {
    let names = Names::new();
    let s = store(&redis, &names.prefix);
    let owner = s.take_shard(2).unwrap();
    let (a, b, c) = (LeadKey::lead("a"), LeadKey::lead("b"), LeadKey::lead("c"));
    assert_eq!(
        write(
            &s,
            owner.epoch,
            0,
            vec![
                lead("a", b"A1", TimerWrite::Set(1_000)),
                lead("b", b"B1", TimerWrite::Set(2_000)),
            ],
        ),
        Written::Ok
    );
    // a: new state, stored timer kept; b: cleared; c: new, without a timer.
    assert_eq!(
        write(
            &s,
            owner.epoch,
            1,
            vec![
                lead("a", b"A2", TimerWrite::Keep),
                lead("b", b"B2", TimerWrite::Clear),
                lead("c", b"C1", TimerWrite::Keep),
            ],
        ),
        Written::Ok
    );
    let loaded = s
        .load(2, owner.epoch, &[&a, &b, &c, &LeadKey::lead("none")])
        .unwrap()
        .unwrap();
    let got: Vec<Option<(Vec<u8>, Option<i64>)>> = loaded
        .into_iter()
        .map(|l| l.map(|l| (l.state, l.timer)))
        .collect();
    assert_eq!(
        got,
        vec![
            Some((b"A2".to_vec(), Some(1_000))),
            Some((b"B2".to_vec(), None)),
            Some((b"C1".to_vec(), None)),
            None,
        ]
    );
    assert_eq!(s.timers(2, i64::MIN, 10).unwrap(), vec![(a.clone(), 1_000)]);
    // Another member takes the shard: the old owner's write changes nothing.
    let next = s.take_shard(2).unwrap();
    assert_eq!(
        write(
            &s,
            owner.epoch,
            2,
            vec![lead("a", b"stale", TimerWrite::Set(5))]
        ),
        Written::Fenced(next.epoch)
    );
    assert_eq!(
        s.load(2, owner.epoch, &[&a]).unwrap(),
        Err(Written::Fenced(next.epoch))
    );
    let now = s.load(2, next.epoch, &[&a]).unwrap().unwrap();
    assert_eq!(
        now[0].as_ref().map(|l| (&l.state[..], l.timer)),
        Some((&b"A2"[..], Some(1_000)))
    );
    // Many leads in one load (more than one read inside the script, more
    // than one script call per load): every third absent, every other one
    // stored with a timer, each answer in its own place.
    let ids: Vec<String> = (0..2_345).map(|i| format!("m{i}")).collect();
    let written: Vec<(LeadKey, &[u8], TimerWrite)> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 0)
        .map(|(i, id)| {
            let timer = if i % 2 == 0 {
                TimerWrite::Set(10_000 + i as i64)
            } else {
                TimerWrite::Clear
            };
            lead(id, id.as_bytes(), timer)
        })
        .collect();
    assert_eq!(write(&s, next.epoch, next.seq, written), Written::Ok);
    let keys: Vec<LeadKey> = ids.iter().map(|id| LeadKey::lead(id)).collect();
    let refs: Vec<&LeadKey> = keys.iter().collect();
    let loaded = s.load(2, next.epoch, &refs).unwrap().unwrap();
    assert_eq!(loaded.len(), ids.len());
    for (i, (id, got)) in ids.iter().zip(loaded).enumerate() {
        let want = (i % 3 != 0).then(|| {
            let timer = (i % 2 == 0).then_some(10_000 + i as i64);
            (id.as_bytes().to_vec(), timer)
        });
        assert_eq!(got.map(|l| (l.state, l.timer)), want, "lead {id}");
    }
}

/// Erasure markers are written with the shard's record, come back with the
/// next take, and a forgotten one is removed (on both write paths: the
/// single server's `MULTI`/`EXEC`, the cluster's script).
fn erasure_markers_are_kept_and_forgotten(redis: &Redis) {
    let names = Names::new();
    let s = store(redis, &names.prefix);
    let owner = s.take_shard(2).unwrap();
    assert!(owner.erased.is_empty());
    let marker = |w: Vec<(u64, Option<i64>)>, epoch: u64, seq: u64| {
        let w = ShardWrite {
            shard: 2,
            epoch,
            seq,
            positions: vec![("t".into(), seq as i64)],
            erasures: w,
            ..ShardWrite::default()
        };
        s.write(&[w]).unwrap().remove(0)
    };
    assert_eq!(
        marker(
            vec![(7, Some(1_000)), (u64::MAX, Some(2_000))],
            owner.epoch,
            0
        ),
        Written::Ok
    );
    let next = s.take_shard(2).unwrap();
    assert_eq!(
        next.erased,
        [(7, 1_000), (u64::MAX, 2_000)].into_iter().collect()
    );
    assert_eq!(marker(vec![(7, None)], next.epoch, next.seq), Written::Ok);
    let last = s.take_shard(2).unwrap();
    assert_eq!(last.erased, [(u64::MAX, 2_000)].into_iter().collect());
}

#[test]
fn on_a_single_server_stored_timers_and_erasure_markers_are_set_kept_and_cleared() {
    let redis = Redis::start();
    erasure_markers_are_kept_and_forgotten(&redis);
    stored_timers_are_set_kept_and_cleared(redis);
}

#[test]
fn on_a_redis_cluster_stored_timers_and_erasure_markers_are_set_kept_and_cleared() {
    let redis = Redis::start_cluster(false);
    erasure_markers_are_kept_and_forgotten(&redis);
    stored_timers_are_set_kept_and_cleared(redis);
}

/// Redis (or a proxy in front of it) closes connections idle for longer
/// than its `timeout`; the store's next read on its kept connection then
/// fails with "unexpected end of file". A read is sent again once on a new
/// connection instead of failing (a user probe: a third of the HTTP
/// lookups after idle spells answered 503).
#[test]
fn reads_after_the_server_closed_an_idle_connection_succeed() {
    let redis = Redis::start();
    let names = Names::new();
    let s = store(&redis, &names.prefix);
    let owner = s.take_shard(2).unwrap();
    assert_eq!(
        write(
            &s,
            owner.epoch,
            0,
            vec![lead("a", b"state-a", TimerWrite::Keep)]
        ),
        Written::Ok
    );
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("timeout")
        .arg("1")
        .query(&mut redis.conn())
        .unwrap();
    for _ in 0..3 {
        // Redis checks idle clients about ten times a second.
        std::thread::sleep(std::time::Duration::from_millis(2_200));
        let found = s.find(&LeadKey::lead("a"), &[0, 1, 2, 3]).unwrap();
        assert_eq!(found, vec![(2, b"state-a".to_vec())]);
        s.ping().unwrap();
    }
}
