//! The embedded log's tests: appends, keys, ticks, formats, torn tails.

use super::backlog::Backlog;
use super::format::{frame_header, APPEND_SEALED, BINARY};
use super::recovery::MAX_TORN;
use super::*;
use crate::{now_ms, Appended};
use grabflow_api::Coord;
use grabflow_api::Event;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn ping(n: usize) -> (Id, EventKind) {
    (
        Id::new(&format!("e{n}")).unwrap(),
        EventKind::LocationPinged {
            rider: Id::new("r1").unwrap(),
            at: Coord::from_degrees(31.0, 121.0).unwrap(),
        },
    )
}

/// The `n` events the writer replays into `rx` as it starts (it replays
/// before it takes appends, on its own thread).
fn replayed(rx: &mpsc::Receiver<Feed>, n: usize) -> Vec<Event> {
    let mut out = Vec::new();
    while out.len() < n {
        match rx
            .recv_timeout(Duration::from_secs(10))
            .expect("replayed events")
        {
            Feed::Events(e) | Feed::EventsThenTick(e, _) => out.extend(e),
            Feed::Tick(_) => {}
        }
    }
    out
}

fn events(rx: &mpsc::Receiver<Feed>) -> Vec<Event> {
    rx.try_iter()
        .flat_map(|f| match f {
            Feed::Events(e) | Feed::EventsThenTick(e, _) => e,
            Feed::Tick(_) => vec![],
        })
        .collect()
}

#[tokio::test]
async fn appends_survive_reopen_and_keys_are_honoured() {
    let dir = scratch();
    let (log, rx) = open_in(&dir);
    let a = log.handle.append(None, vec![ping(1)]).await.unwrap();
    assert_eq!(
        a,
        Appended::One {
            event_id: Id::new("e1").unwrap(),
            offset: 0
        }
    );
    let b = log
        .handle
        .append(Some("k".into()), vec![ping(2), ping(3)])
        .await
        .unwrap();
    assert_eq!(b, Appended::Batch { accepted: 2 });
    // A retry: the same contents (the server gives them new ids).
    let again = log
        .handle
        .append(Some("k".into()), vec![ping(6), ping(7)])
        .await
        .unwrap();
    assert_eq!(again, b, "a repeated key gets the first answer");
    let other = log.handle.append(Some("k".into()), vec![ping(4)]).await;
    assert!(
        matches!(other, Err(LogError::KeyReused(_))),
        "the key on another request is refused: {other:?}"
    );
    // The writer hands its last events over as it closes.
    drop(log.handle);
    log.writer.join().unwrap();
    let fed = events(&rx);
    assert_eq!(
        fed.iter().map(|e| e.offset).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    assert!(fed.windows(2).all(|w| w[0].time <= w[1].time));

    let (log, rx) = open_in(&dir);
    assert_eq!(log.replayed, 3);
    assert_eq!(
        replayed(&rx, 3),
        fed,
        "replay gives back exactly what was acknowledged"
    );
    let again = log
        .handle
        .append(Some("k".into()), vec![ping(8), ping(9)])
        .await
        .unwrap();
    assert_eq!(again, b, "keys survive a restart");
    let other = log.handle.append(Some("k".into()), vec![ping(5)]).await;
    assert!(
        matches!(other, Err(LogError::KeyReused(_))),
        "and so does what they were used for: {other:?}"
    );
    let c = log.handle.append(None, vec![ping(6)]).await.unwrap();
    assert_eq!(
        c,
        Appended::One {
            event_id: Id::new("e6").unwrap(),
            offset: 3
        }
    );
    drop(log.handle);
    log.writer.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Committed events reach the dataflow no later than the tick that
/// passes their time (the tick that lets it finish them), while the log
/// stays open.
#[tokio::test]
async fn events_are_handed_over_before_the_tick_that_passes_them() {
    let dir = scratch();
    let (log, rx) = open_in(&dir);
    for n in 0..20 {
        log.handle.append(None, vec![ping(n)]).await.unwrap();
    }
    let committed = now_ms();
    let mut fed = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(10)).expect("a tick") {
            Feed::Events(e) => fed.extend(e),
            Feed::EventsThenTick(e, t) => {
                fed.extend(e);
                if t > committed {
                    break;
                }
            }
            Feed::Tick(t) if t > committed => break,
            Feed::Tick(_) => {}
        }
    }
    assert_eq!(
        fed.iter().map(|e| e.offset).collect::<Vec<_>>(),
        (0..20).collect::<Vec<_>>(),
        "every event before the tick that passes it"
    );
    drop(log.handle);
    log.writer.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Pings alone wait for the ping cadence; any other event ticks as soon
/// as its millisecond is over and takes the pings before it along.
#[tokio::test]
async fn pings_wait_for_their_cadence_and_other_events_tick_at_once() {
    let dir = scratch();
    let (tx, rx) = mpsc::channel();
    let slow = Duration::from_secs(30);
    let log = open(
        &dir,
        tx,
        Ticks {
            idle: slow,
            pings: slow,
        },
        Arc::new(Backlog::new(0)),
    )
    .unwrap();
    // The first tick (nothing to replay) comes at once.
    assert!(matches!(
        rx.recv_timeout(Duration::from_secs(10)),
        Ok(Feed::Tick(_))
    ));
    for n in 0..5 {
        log.handle.append(None, vec![ping(n)]).await.unwrap();
    }
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "acknowledged pings alone wait for the ping cadence"
    );
    let shift = (
        Id::new("s1").unwrap(),
        EventKind::ShiftChanged {
            rider: Id::new("r1").unwrap(),
            online: true,
            capacity: None,
        },
    );
    let Appended::One { offset, .. } = log.handle.append(None, vec![shift]).await.unwrap() else {
        panic!("one event")
    };
    // Everything up to the shift change, then a tick past its time
    // (one may come at its time first, with the events).
    let started = Instant::now();
    let mut fed: Vec<Event> = Vec::new();
    loop {
        let tick = match rx.recv_timeout(Duration::from_secs(10)).expect("a tick") {
            Feed::Events(e) => {
                fed.extend(e);
                continue;
            }
            Feed::EventsThenTick(e, t) => {
                fed.extend(e);
                t
            }
            Feed::Tick(t) => t,
        };
        if fed
            .last()
            .is_some_and(|e| e.offset == offset && tick > e.time)
        {
            break;
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a shift change does not wait for the ping cadence"
    );
    assert_eq!(
        fed.iter().map(|e| e.offset).collect::<Vec<_>>(),
        (0..=offset).collect::<Vec<_>>(),
        "the pings before it come along"
    );
    drop(log.handle);
    log.writer.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The same cadence with pings as without.
fn every(tick: Duration) -> Ticks {
    Ticks {
        idle: tick,
        pings: tick,
    }
}

/// The log in `dir` (5 ms ticks) and the feed it replays and appends into.
fn place(n: usize, order: &str) -> (Id, EventKind) {
    (
        Id::new(&format!("p{n}")).unwrap(),
        EventKind::OrderPlaced {
            order: Id::new(order).unwrap(),
            merchant: Id::new("m1").unwrap(),
            dropoff: Coord::from_degrees(31.0, 121.0).unwrap(),
            promised_minutes: 30,
        },
    )
}

#[tokio::test]
async fn an_order_is_placed_once_whatever_its_key() {
    let dir = scratch();
    let (log, _rx) = open_in(&dir);
    let first = log
        .handle
        .append(Some("a".into()), vec![place(1, "o1")])
        .await
        .unwrap();
    let exists = |r: Result<Appended, LogError>| matches!(r, Err(LogError::OrderExists(o)) if o.as_str() == "o1");
    // Another key, no key, or two placements racing into one commit.
    let (b, c) = tokio::join!(
        log.handle.append(Some("b".into()), vec![place(2, "o1")]),
        log.handle.append(None, vec![place(3, "o1")]),
    );
    assert!(exists(b) && exists(c));
    let (d, e) = tokio::join!(
        log.handle.append(None, vec![place(4, "o2")]),
        log.handle.append(Some("e".into()), vec![place(5, "o2")]),
    );
    assert!(
        d.is_ok() != e.is_ok(),
        "one of two racing placements: {d:?} {e:?}"
    );
    // The first key's repeat still gets its answer.
    let again = log
        .handle
        .append(Some("a".into()), vec![place(6, "o1")])
        .await;
    assert_eq!(again.unwrap(), first);
    drop(log.handle);
    log.writer.join().unwrap();
    let (log, _rx) = open_in(&dir);
    assert_eq!(log.replayed, 2, "o1 and o2, once each");
    assert!(exists(
        log.handle
            .append(Some("f".into()), vec![place(7, "o1")])
            .await
    ));
    drop(log.handle);
    log.writer.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

fn open_in(dir: &Path) -> (Opened, mpsc::Receiver<Feed>) {
    let (tx, rx) = mpsc::channel();
    let unbounded = Arc::new(Backlog::new(0));
    (
        open(dir, tx, every(Duration::from_millis(5)), unbounded).unwrap(),
        rx,
    )
}

/// Where the file system has direct I/O, commits use it; one log may
/// be written both ways in turn (a data dir moved between file
/// systems) and reads back whole.
#[tokio::test]
async fn direct_and_buffered_commits_read_back_alike() {
    let dir = scratch();
    let path = first_segment(&dir);
    let mut acked = Vec::new();
    for (round, direct) in [false, true, false, true].into_iter().enumerate() {
        let (tx, rx) = mpsc::channel();
        let unbounded = Arc::new(Backlog::new(0));
        let log = open_with(
            &dir,
            tx,
            unbounded,
            Resume::default(),
            Options::new(every(Duration::from_millis(5))),
            direct,
        )
        .unwrap();
        assert_eq!((log.replayed, log.cut), (acked.len(), 0));
        assert_eq!(replayed(&rx, acked.len()).len(), acked.len(), "replayed");
        for n in 0..3 {
            let id = round * 10 + n;
            let events = if n == 1 {
                vec![ping(id), ping(id + 100)]
            } else {
                vec![ping(id)]
            };
            acked.extend(events.iter().map(|(id, _)| id.clone()));
            log.handle.append(None, events).await.unwrap();
        }
        drop(log.handle);
        log.writer.join().unwrap();
        let back = read_records(&path).unwrap();
        assert_eq!(back.cut, 0);
        let ids: Vec<Id> = back.records.iter().map(|r| r.event.id.clone()).collect();
        assert_eq!(
            ids, acked,
            "round {round}: every acknowledged event, in order"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The first segment of the log in `dir`.
fn first_segment(dir: &Path) -> PathBuf {
    segments::file(&segments::dir(dir), 0)
}

/// Every record of the log in `dir`, segment after segment.
fn read_all(dir: &Path) -> Vec<Record> {
    segments::list(dir)
        .unwrap()
        .iter()
        .flat_map(|s| read_records(&s.path).unwrap().records)
        .collect()
}

/// A fresh directory for one test's log.
fn scratch() -> PathBuf {
    std::env::temp_dir().join(format!("grabflow-log-{}", rand::random::<u64>()))
}

/// `payload` framed as the log frames it.
fn framed(payload: &[u8]) -> Vec<u8> {
    [&frame_header(payload)[..], payload].concat()
}

#[tokio::test]
async fn records_of_older_logs_are_read_beside_new_ones() {
    let dir = scratch();
    std::fs::create_dir_all(&dir).unwrap();
    // A record as versions before 0.6 wrote it (JSON), recent enough for
    // its key to be within the idempotency window...
    let t = crate::now_ms();
    let json = format!(
        r#"{{"key":"k","event":{{"id":"e0","offset":0,"time":{t},"kind":{{"type":"location_pinged","rider":"r1","at":{{"lat_e7":310000000,"lon_e7":1210000000}}}}}}}}"#
    );
    let mut old = framed(json.as_bytes());
    // ...and one as 0.6 wrote it (one event in postcard).
    let (id, kind) = ping(1);
    let event = Event {
        id,
        offset: 1,
        time: t + 1,
        kind,
    };
    let mut binary = vec![BINARY];
    binary.extend(postcard::to_allocvec(&(None::<&str>, &event)).unwrap());
    old.extend(framed(&binary));
    // In a data dir of 0.12: one file, moved into place as the first
    // segment when the log opens.
    std::fs::write(dir.join(segments::LEGACY), &old).unwrap();

    let (log, rx) = open_in(&dir);
    assert!(!dir.join(segments::LEGACY).exists());
    assert_eq!(log.replayed, 2);
    let back = replayed(&rx, 2);
    assert_eq!(back[0].kind, ping(0).1);
    assert_eq!(back[1], event);
    let again = log
        .handle
        .append(Some("k".into()), vec![ping(9)])
        .await
        .unwrap();
    assert_eq!(
        again,
        Appended::One {
            event_id: Id::new("e0").unwrap(),
            offset: 0
        },
        "a key of a JSON record is honoured"
    );
    log.handle.append(None, vec![ping(2)]).await.unwrap();
    drop(log.handle);
    log.writer.join().unwrap();

    // The old records are recent: the new ones follow them in the same
    // segment, which begins with the old bytes as they were.
    let all = segments::list(&dir).unwrap();
    assert_eq!(
        all.iter().map(|s| s.first).collect::<Vec<_>>(),
        vec![0],
        "{all:?}"
    );
    let bytes = std::fs::read(&all[0].path).unwrap();
    assert_eq!(&bytes[..old.len()], &old[..], "kept as it was");
    assert_eq!(
        bytes[old.len() + 8],
        APPEND_SEALED,
        "new records are sealed appends"
    );
    let records = read_all(&dir);
    let got: Vec<_> = records
        .iter()
        .map(|r| (r.key.clone(), r.event.id.to_string(), r.event.offset))
        .collect();
    assert_eq!(
        got,
        vec![
            (Some("k".into()), "e0".into(), 0),
            (None, "e1".into(), 1),
            (None, "e2".into(), 2)
        ]
    );
    assert_eq!(records[2].event.kind, ping(2).1);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_batch_is_one_record_with_its_ids_stored_once() {
    let dir = scratch();
    let (log, rx) = open_in(&dir);
    let batch = Id::new_batch();
    let items: Vec<_> = (0..500)
        .map(|i| (batch.item(i).unwrap(), ping(i).1))
        .collect();
    // Ids that are not one batch's items in order are stored one by one.
    let mixed = vec![ping(7), (batch.item(1).unwrap(), ping(8).1)];
    let a = log
        .handle
        .append(Some("b".into()), items.clone())
        .await
        .unwrap();
    assert_eq!(a, Appended::Batch { accepted: 500 });
    log.handle.append(None, mixed.clone()).await.unwrap();
    drop(log.handle);
    log.writer.join().unwrap();
    let fed = events(&rx);

    let size = read_records(&first_segment(&dir)).unwrap().end;
    assert!(size < 500 * 20, "{size} bytes for 502 pings");
    let Scanned { records, cut, .. } = read_records(&first_segment(&dir)).unwrap();
    assert_eq!(cut, 0);
    let back: Vec<Event> = records.iter().map(|r| r.event.clone()).collect();
    assert_eq!(back, fed, "read back as they were fed");
    let expected: Vec<_> = items.into_iter().chain(mixed).collect();
    let got: Vec<_> = back.into_iter().map(|e| (e.id, e.kind)).collect();
    assert_eq!(got, expected);
    assert!(records[..500].iter().all(|r| r.key.as_deref() == Some("b")));
    assert!(records[500..].iter().all(|r| r.key.is_none()));

    // A torn batch is cut whole: none of its events is applied.
    let path = first_segment(&dir);
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(size - 3).unwrap();
    let Scanned { records, cut, .. } = read_records(&path).unwrap();
    assert_eq!(records.len(), 500);
    assert!(cut > 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_torn_tail_is_cut_and_never_half_applied() {
    let dir = scratch();
    let (log, _rx) = open_in(&dir);
    for n in 0..5 {
        log.handle.append(None, vec![ping(n)]).await.unwrap();
    }
    drop(log.handle);
    log.writer.join().unwrap();
    let path = first_segment(&dir);
    let full = read_records(&path).unwrap().end;
    // A crash in the middle of writing the last record.
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(full - 7).unwrap();
    let Scanned { records, cut, .. } = read_records(&path).unwrap();
    assert_eq!(records.len(), 4);
    assert!(cut > 0);
    let again = read_records(&path).unwrap();
    assert_eq!(
        (again.records.len(), again.cut),
        (4, 0),
        "the cut is made on disk"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn the_zero_filled_room_is_reused_and_a_record_torn_in_it_is_cut() {
    let dir = scratch();
    let path = first_segment(&dir);
    let (log, _rx) = open_in(&dir);
    for n in 0..3 {
        log.handle.append(None, vec![ping(n)]).await.unwrap();
    }
    drop(log.handle);
    log.writer.join().unwrap();
    let first = read_records(&path).unwrap();
    assert_eq!((first.records.len(), first.cut), (3, 0));
    let len = std::fs::metadata(&path).unwrap().len();
    assert!(
        len >= first.end + super::space::CHUNK / 2,
        "room ahead: {len}"
    );

    // Reopened, appends go on where the records end, inside the room.
    let (log, rx) = open_in(&dir);
    assert_eq!((log.replayed, log.cut), (3, 0));
    let a = log.handle.append(None, vec![ping(3)]).await.unwrap();
    assert!(matches!(a, Appended::One { offset: 3, .. }));
    drop(log.handle);
    log.writer.join().unwrap();
    assert_eq!(events(&rx).len(), 4);
    let second = read_records(&path).unwrap();
    assert_eq!(second.records.len(), 4);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len, "no growth");

    // A crash halfway through writing a record into the room.
    let bytes = std::fs::read(&path).unwrap();
    let last = &bytes[first.end as usize..second.end as usize];
    let f = OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&last[..last.len() / 2], second.end).unwrap();
    let torn = read_records(&path).unwrap();
    assert_eq!((torn.records.len(), torn.end), (4, second.end));
    assert!(torn.cut > 0 && torn.cut <= (last.len() / 2) as u64);

    // Garbage far past the records is corruption, not a torn tail.
    f.write_all_at(b"junk", second.end + MAX_TORN as u64 + 100)
        .unwrap();
    assert!(
        matches!(read_records(&path), Err(LogError::Damaged { offset, .. }) if offset == second.end)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Flips the bits of the byte at `at` of `path`.
fn flip(path: &Path, at: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[!b[0]], at).unwrap();
}

#[tokio::test]
async fn damage_before_whole_records_is_refused_reported_and_repaired_keeping_them() {
    let dir = scratch();
    let path = first_segment(&dir);
    let (log, _rx) = open_in(&dir);
    for n in 0..40 {
        log.handle
            .append(None, vec![place(n, &format!("o{n}"))])
            .await
            .unwrap();
    }
    drop(log.handle);
    log.writer.join().unwrap();
    let whole = read_records(&path).unwrap();
    let size = std::fs::read(&path).unwrap().len();

    // A flipped byte in the 10th record's payload, and one in the 30th's
    // length: neither is a torn tail.
    let bytes = std::fs::read(&path).unwrap();
    let starts: Vec<u64> = {
        let (mut at, mut v) = (0usize, Vec::new());
        while v.len() < 40 {
            v.push(at as u64);
            at += 8 + u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        }
        v
    };
    flip(&path, starts[10] + 12);
    flip(&path, starts[30] + 1);
    let e = read_records(&path).unwrap_err();
    assert!(
        matches!(&e, LogError::Damaged { offset, following, .. } if *offset == starts[10] && *following == 28),
        "{e}"
    );
    let message = e.to_string();
    assert!(
        message.contains("00000000000000000000.seg")
            && message.contains("grabflow log repair")
            && message.contains(&format!("--data-dir {}", dir.display())),
        "{message}"
    );
    assert_eq!(std::fs::read(&path).unwrap().len(), size, "nothing is cut");

    let report = verify(&path).unwrap();
    assert_eq!((report.records, report.events), (38, 38));
    assert_eq!(report.damaged.len(), 2);
    assert_eq!(report.damaged[0].0, starts[10]);
    assert_eq!(report.damaged[1].0, starts[30]);
    assert!(report.refused() && !report.torn_tail);

    let repaired = repair(&path).unwrap();
    let quarantine = repaired.quarantine.expect("damaged bytes kept");
    let kept = std::fs::read(&quarantine).unwrap();
    assert_eq!(
        kept.len() as u64,
        (starts[11] - starts[10]) + (starts[31] - starts[30]),
        "each damaged record's bytes, whole"
    );
    let back = read_records(&path).unwrap();
    assert_eq!(back.cut, 0);
    let ids: Vec<u64> = back.records.iter().map(|r| r.event.offset).collect();
    let expected: Vec<u64> = (0..40).filter(|&n| n != 10 && n != 30).collect();
    assert_eq!(
        ids, expected,
        "every whole record, those after the damage too"
    );
    assert_eq!(
        back.records.last().map(|r| r.event.clone()),
        whole.records.last().map(|r| r.event.clone())
    );

    // The repaired log opens and goes on after its last offset.
    let (log, _rx) = open_in(&dir);
    assert_eq!(log.replayed, 38);
    let next = log.handle.append(None, vec![ping(99)]).await.unwrap();
    assert!(matches!(next, Appended::One { offset: 40, .. }), "{next:?}");
    drop(log.handle);
    log.writer.join().unwrap();
    assert!(!verify(&path).unwrap().refused());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn pings_are_refused_while_the_dataflow_is_too_far_behind_and_orders_later() {
    let dir = scratch();
    let (tx, _rx) = mpsc::channel();
    let backlog = Arc::new(Backlog::new(3));
    let log = open(
        &dir,
        tx,
        every(Duration::from_millis(5)),
        Arc::clone(&backlog),
    )
    .unwrap();
    for n in 0..3 {
        log.handle.append(None, vec![ping(n)]).await.unwrap();
    }
    assert_eq!(backlog.ahead(), 3);
    let refused = log.handle.append(None, vec![ping(3)]).await;
    assert!(matches!(refused, Err(LogError::Behind(3))), "{refused:?}");
    // Other events have twice the room: dispatch goes on while pings wait.
    for n in 0..3 {
        let placed = log
            .handle
            .append(None, vec![place(10 + n, &format!("o{n}"))])
            .await;
        assert!(placed.is_ok(), "{placed:?}");
    }
    let refused = log.handle.append(None, vec![place(20, "o9")]).await;
    assert!(matches!(refused, Err(LogError::Behind(6))), "{refused:?}");
    // The dataflow catches up: appends are taken again, at the next offset.
    backlog.progress(Time::MAX);
    assert_eq!(backlog.ahead(), 0);
    let next = log.handle.append(None, vec![ping(4)]).await.unwrap();
    assert!(matches!(next, Appended::One { offset: 6, .. }), "{next:?}");
    drop(log.handle);
    log.writer.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config::with_cases(300))]

    /// Any bytes, as a whole log or written over a valid one: reading
    /// back, verifying and repairing never panic, and agree with each other.
    #[test]
    fn any_damage_is_read_verified_and_repaired_without_a_panic(
        junk in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        at in 0usize..2048,
        whole in proptest::prelude::any::<bool>(),
    ) {
        let dir = scratch();
        let path = first_segment(&dir);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut bytes = if whole { Vec::new() } else { valid_log() };
        let at = at.min(bytes.len());
        bytes.splice(at..(at + junk.len()).min(bytes.len()), junk.iter().copied());
        let mut payload = Vec::new();
        let _ = super::format::decode(&bytes, &mut payload);
        let _ = super::format::framed(&bytes);
        std::fs::write(&path, &bytes).unwrap();
        let report = verify(&path).unwrap();
        match read_records(&path) {
            Ok(_) => proptest::prop_assert!(!report.refused(), "{report:?}"),
            Err(LogError::Damaged { .. }) => proptest::prop_assert!(report.refused()),
            Err(e) => proptest::prop_assert!(false, "{e}"),
        }
        repair(&path).unwrap();
        proptest::prop_assert!(!verify(&path).unwrap().refused());
        proptest::prop_assert!(read_records(&path).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The bytes of a small valid log: a few records of the current form.
fn valid_log() -> Vec<u8> {
    let events: Vec<Event> = (0..4)
        .map(|n| {
            let (id, kind) = ping(n);
            Event {
                id,
                offset: n as u64,
                time: 1_000 + n as u64,
                kind,
            }
        })
        .collect();
    let mut out = Vec::new();
    for e in events.chunks(1) {
        super::format::encode(
            &super::format::AppendRecordRef {
                key: None,
                events: e,
            },
            &mut out,
        );
    }
    out
}

/// The segments' size in the tests of segments: a few dozen pings each.
const SEGMENT: u64 = 2048;

/// The log in `dir` kept as `options` say (5 ms ticks), from `resume`.
fn open_kept(dir: &Path, options: Options, resume: Resume) -> (Opened, mpsc::Receiver<Feed>) {
    let (tx, rx) = mpsc::channel();
    let unbounded = Arc::new(Backlog::new(0));
    let log = open_with(dir, tx, unbounded, resume, options, true).unwrap();
    (log, rx)
}

/// Options with 5 ms ticks, segments of `bytes`, and `retention`.
fn small_segments(bytes: u64, retention: &Arc<Retention>) -> Options {
    Options {
        rolling: Rolling {
            bytes,
            ..Rolling::default()
        },
        retention: Arc::clone(retention),
        ..Options::new(every(Duration::from_millis(5)))
    }
}

/// `n` pings appended one by one from `at` on.
async fn ping_n(log: &Opened, at: usize, n: usize) {
    for i in at..at + n {
        log.handle.append(None, vec![ping(i)]).await.unwrap();
    }
}

#[tokio::test]
async fn segments_roll_by_size_are_named_by_first_offset_and_read_back_as_one_log() {
    let dir = scratch();
    let forever = Arc::new(Retention::new(0));
    let (log, rx) = open_kept(&dir, small_segments(SEGMENT, &forever), Resume::default());
    ping_n(&log, 0, 300).await;
    drop(log.handle);
    log.writer.join().unwrap();
    let fed = events(&rx);
    assert_eq!(fed.len(), 300);

    let all = segments::list(&dir).unwrap();
    assert!(all.len() > 3, "{all:?}");
    let mut next = 0;
    for (i, segment) in all.iter().enumerate() {
        assert_eq!(segment.first, next, "offsets follow on: {all:?}");
        let back = read_records(&segment.path).unwrap();
        assert_eq!(back.records[0].event.offset, segment.first);
        next = back.records.last().unwrap().event.offset + 1;
        let len = std::fs::metadata(&segment.path).unwrap().len();
        if i + 1 < all.len() {
            assert!(len <= SEGMENT, "a segment stays within its size: {len}");
            assert_eq!(len, back.end, "a sealed segment is trimmed to its records");
        }
    }
    assert_eq!(next, 300);
    assert_eq!(
        read_all(&dir)
            .into_iter()
            .map(|r| r.event)
            .collect::<Vec<_>>(),
        fed
    );

    // Reopened: every segment replayed in order, appends go on after them.
    let (log, rx) = open_kept(&dir, small_segments(SEGMENT, &forever), Resume::default());
    assert_eq!(log.replayed, 300);
    assert_eq!(replayed(&rx, 300), fed);
    let a = log.handle.append(None, vec![ping(300)]).await.unwrap();
    assert!(matches!(a, Appended::One { offset: 300, .. }), "{a:?}");
    drop(log.handle);
    log.writer.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A log of 300 pings in segments of [`SEGMENT`] bytes; its segments.
async fn segmented_log(dir: &Path) -> Vec<Segment> {
    let forever = Arc::new(Retention::new(0));
    let (log, _rx) = open_kept(dir, small_segments(SEGMENT, &forever), Resume::default());
    ping_n(&log, 0, 300).await;
    drop(log.handle);
    log.writer.join().unwrap();
    segments::list(dir).unwrap()
}

/// Opening the log in `dir` (segments of [`SEGMENT`] bytes, from the start).
fn reopen(dir: &Path) -> Result<Opened, LogError> {
    let (tx, _rx) = mpsc::channel();
    let forever = Arc::new(Retention::new(0));
    let options = small_segments(SEGMENT, &forever);
    open_with(
        dir,
        tx,
        Arc::new(Backlog::new(0)),
        Resume::default(),
        options,
        true,
    )
}

#[tokio::test]
async fn a_torn_last_segment_is_cut_and_damage_in_a_sealed_one_is_refused_not_dropped() {
    // A torn tail in the last segment: cut, every whole record kept.
    let dir = scratch();
    let all = segmented_log(&dir).await;
    let last = all.last().unwrap();
    let end = read_records(&last.path).unwrap().end;
    let f = OpenOptions::new().write(true).open(&last.path).unwrap();
    f.set_len(end - 5).unwrap();
    let log = reopen(&dir).unwrap();
    assert!(log.cut > 0);
    assert_eq!(log.replayed, 299, "only the torn (last) append is gone");
    drop(log.handle);
    log.writer.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    // A flipped byte in a sealed segment: refused, naming it; nothing cut.
    let dir = scratch();
    let all = segmented_log(&dir).await;
    let middle = &all[all.len() / 2];
    let sizes: Vec<u64> = all
        .iter()
        .map(|s| std::fs::metadata(&s.path).unwrap().len())
        .collect();
    flip(&middle.path, 100);
    let e = reopen(&dir).err().expect("refused");
    assert!(
        matches!(&e, LogError::Damaged { path, .. } if path == &middle.path),
        "{e}"
    );
    let after: Vec<u64> = all
        .iter()
        .map(|s| std::fs::metadata(&s.path).unwrap().len())
        .collect();
    assert_eq!(after, sizes, "nothing is cut");
    std::fs::remove_dir_all(&dir).unwrap();

    // A sealed segment cut short at its end (not the log's tail): refused.
    let dir = scratch();
    let all = segmented_log(&dir).await;
    let middle = &all[all.len() / 2];
    let len = std::fs::metadata(&middle.path).unwrap().len();
    let f = OpenOptions::new().write(true).open(&middle.path).unwrap();
    f.set_len(len - 3).unwrap();
    let e = reopen(&dir).err().expect("refused");
    assert!(
        matches!(&e, LogError::Segments { path, .. } if path == &middle.path),
        "{e}"
    );
    assert_eq!(std::fs::metadata(&middle.path).unwrap().len(), len - 3);
    std::fs::remove_dir_all(&dir).unwrap();

    // A segment missing in the middle: refused, naming the one after.
    let dir = scratch();
    let all = segmented_log(&dir).await;
    let i = all.len() / 2;
    std::fs::remove_file(&all[i].path).unwrap();
    let e = reopen(&dir).err().expect("refused");
    assert!(
        matches!(&e, LogError::Segments { path, .. } if path == &all[i + 1].path),
        "{e}"
    );
    assert!(e.to_string().contains("grabflow log verify"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn an_empty_last_segment_of_a_roll_cut_short_goes_on_from_the_one_before() {
    let dir = scratch();
    let all = segmented_log(&dir).await;
    // A crash right after the next segment was created.
    let log_dir = segments::dir(&dir);
    std::fs::write(segments::file(&log_dir, 300), b"").unwrap();
    let (log, rx) = open_kept(
        &dir,
        small_segments(SEGMENT, &Arc::new(Retention::new(0))),
        Resume::default(),
    );
    assert_eq!(log.replayed, 300);
    assert_eq!(replayed(&rx, 300).len(), 300);
    assert!(log.last_time > 0);
    let a = log.handle.append(None, vec![ping(300)]).await.unwrap();
    assert!(matches!(a, Appended::One { offset: 300, .. }), "{a:?}");
    drop(log.handle);
    log.writer.join().unwrap();
    assert_eq!(segments::list(&dir).unwrap().len(), all.len() + 1);
    assert_eq!(read_all(&dir).len(), 301);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn retention_deletes_only_old_segments_no_checkpoint_needs_and_a_restart_resumes_after() {
    let dir = scratch();
    // Every event is "old" a millisecond after the newest.
    let retention = Arc::new(Retention::new(1));
    let (log, _rx) = open_kept(&dir, small_segments(SEGMENT, &retention), Resume::default());
    ping_n(&log, 0, 300).await;
    let all = segments::list(&dir).unwrap();
    assert!(all.len() > 3);
    // Without a checkpoint nothing goes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    log.handle.append(None, vec![ping(300)]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(segments::list(&dir).unwrap(), all, "no checkpoint: kept");

    // A checkpoint resuming inside segment 2: segments 0 and 1 go.
    let from = all[2].first + 1;
    retention.checkpointed(from);
    let deadline = Instant::now() + Duration::from_secs(10);
    while segments::list(&dir).unwrap().len() > all.len() - 2 {
        assert!(Instant::now() < deadline, "not deleted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And no more, however long it runs.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let kept = segments::list(&dir).unwrap();
    assert_eq!(kept[..], all[2..], "exactly those wholly before {from}");
    let ledger: Ledger = postcard::from_bytes(&log.handle.ledger_saver().save()).unwrap();
    drop(log.handle);
    log.writer.join().unwrap();

    // A start without the checkpoint is refused: its events are gone.
    let e = reopen(&dir).err().expect("refused");
    assert!(matches!(e, LogError::Segments { .. }), "{e}");
    // From the checkpoint: the events after it, the ledger's too.
    let (log, rx) = open_kept(
        &dir,
        small_segments(SEGMENT, &Arc::new(Retention::new(1))),
        Resume { from, ledger },
    );
    assert_eq!(log.replayed as u64, 301 - from);
    let back = replayed(&rx, 301 - from as usize);
    assert_eq!(back[0].offset, from);
    assert_eq!(back.last().unwrap().offset, 300);
    let a = log.handle.append(None, vec![ping(301)]).await.unwrap();
    assert!(matches!(a, Appended::One { offset: 301, .. }), "{a:?}");
    drop(log.handle);
    log.writer.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_replay_runs_a_bounded_backlog_ahead_of_the_dataflow() {
    let dir = scratch();
    let forever = Arc::new(Retention::new(0));
    let (log, _rx) = open_kept(&dir, small_segments(1 << 20, &forever), Resume::default());
    // Batches of one event each at distinct times, so ticks can pass them.
    let n = REPLAY_AHEAD as usize + 3 * 4096;
    let mut at = 0;
    while at < n {
        let batch: Vec<_> = (at..at + 4096).map(ping).collect();
        log.handle.append(None, batch).await.unwrap();
        at += 4096;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    drop(log.handle);
    log.writer.join().unwrap();

    let (tx, rx) = mpsc::channel();
    let backlog = Arc::new(Backlog::new(0));
    let options = small_segments(1 << 20, &forever);
    let log = open_with(
        &dir,
        tx,
        Arc::clone(&backlog),
        Resume::default(),
        options,
        true,
    )
    .unwrap();
    assert_eq!(log.replayed, at);
    // Nothing passes the dataflow's frontier: the replay stops ahead.
    let mut held = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while held < REPLAY_AHEAD as usize {
        assert!(Instant::now() < deadline, "{held} handed over");
        held += events(&rx).len();
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(500));
    held += events(&rx).len();
    assert!(
        held <= REPLAY_AHEAD as usize + 4096 && held < at,
        "{held} of {at} handed over"
    );
    // The dataflow finishes everything it holds: the rest comes.
    let mut fed = held;
    let deadline = Instant::now() + Duration::from_secs(20);
    while fed < at {
        assert!(Instant::now() < deadline, "{fed} of {at}");
        backlog.progress(now_ms());
        fed += events(&rx).len();
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(fed, at);
    drop(log.handle);
    log.writer.join().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn room_fits_a_small_disk() {
    use super::space::{fill_to, Space, CHUNK, MIN_FILL, SHARE};
    // Plenty of space: a chunk, but never past the segment.
    assert_eq!(fill_to(0, u64::MAX, u64::MAX), Some(CHUNK));
    assert_eq!(
        fill_to(1000, 5000 + MIN_FILL, u64::MAX),
        Some(5000 + MIN_FILL)
    );
    // A 4 MiB volume: a quarter of what is free, then nothing.
    assert_eq!(fill_to(0, u64::MAX, 4 << 20), Some((4 << 20) / SHARE));
    assert_eq!(fill_to(0, u64::MAX, SHARE * MIN_FILL - 1), None);
    assert_eq!(fill_to(10, 20, u64::MAX), None, "the segment is full");

    let dir = scratch();
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("seg");
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let space = Space::with_free(&file, 0, u64::MAX, Box::new(|| 3 << 20)).unwrap();
    file.write_all_at(&[7; 10], 0).unwrap();
    space.wrote(10);
    assert!(space.reserve(10, 100));
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(len, 10 + (3 << 20) / SHARE, "a quarter of 3 MiB free");
    drop(space);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// On a real 4 MiB file system (tmpfs; only as root, else skipped): the
/// log opens, preallocates within it, and takes appends.
#[tokio::test]
async fn the_log_works_on_a_4_mib_volume() {
    let dir = scratch();
    std::fs::create_dir_all(&dir).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&dir)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: no tmpfs mount here (needs root)");
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let result = tokio::spawn({
        let dir = dir.clone();
        async move {
            let (log, _rx) = open_in(&dir);
            ping_n(&log, 0, 2000).await;
            drop(log.handle);
            log.writer.join().unwrap();
            let (bytes, segments) = segments::usage(&dir);
            (bytes, segments, read_all(&dir).len())
        }
    })
    .await;
    let _ = std::process::Command::new("umount").arg(&dir).status();
    let _ = std::fs::remove_dir_all(&dir);
    let (bytes, segments, records) = result.unwrap();
    assert_eq!((segments, records), (1, 2000));
    assert!(bytes < 3 << 20, "within the volume: {bytes}");
}
