//! Behaviour of the event log against real sled directories, including every way we know to
//! tamper with one.

use std::error::Error;
use std::path::Path;
use std::time::Instant;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::json;
use tempfile::TempDir;
use uuid::Uuid;

use super::chain::Chain;
use super::codec;
use super::*;

type TestResult = Result<(), Box<dyn Error>>;

fn time(i: u64) -> DateTime<Utc> {
    let base = Utc.with_ymd_and_hms(2025, 3, 14, 15, 9, 26).single();
    base.unwrap_or_default() + chrono::Duration::nanoseconds(1_234_567_891 * i as i64)
}

/// An event shaped like the ones countersign writes: a kind, an agent, a small JSON payload.
fn event(i: u64) -> NewEvent {
    NewEvent {
        kind: "action.requested".to_owned(),
        time: time(i),
        actor: format!("agent-{}", i % 17),
        action_id: (!i.is_multiple_of(3))
            .then(|| Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 + i as u128)),
        payload: json!({
            "resource": format!("prod/db/{}", i % 101),
            "verb": "delete",
            "risk": "high",
            "justification": "rotate credentials after incident 4711",
            "labels": {"team": "payments", "env": "prod"},
            "attempt": i,
        }),
    }
}

fn events(range: std::ops::RangeInclusive<u64>) -> Vec<NewEvent> {
    range.map(event).collect()
}

/// A log in a fresh directory holding events 1..=n, closed again so a test can tamper with it.
fn log_with(n: u64) -> Result<TempDir, Box<dyn Error>> {
    let dir = TempDir::new()?;
    let log = EventLog::open(dir.path())?;
    if n > 0 {
        log.append(events(1..=n))?;
    }
    Ok(dir)
}

/// Edits a stopped log through sled directly, the way an attacker with file access could.
fn tamper(
    dir: &Path,
    edit: impl FnOnce(&sled::Tree, &sled::Tree) -> sled::Result<()>,
) -> TestResult {
    let db = super::open_sled(dir)?;
    edit(&db.open_tree("events")?, &db.open_tree("meta")?)?;
    db.flush()?;
    Ok(())
}

fn flip(events: &sled::Tree, sequence: u64, index: usize) -> sled::Result<()> {
    let key = sequence.to_be_bytes();
    let mut value = events.get(key)?.map(|v| v.to_vec()).unwrap_or_default();
    value[index] ^= 0x01;
    events.insert(key, value)?;
    Ok(())
}

/// Verifies `log` in one walk, and in slices on several threads, which must agree exactly.
fn verify(log: &EventLog) -> VerifyReport {
    let single = log.verify_with(1, 1).expect("the log reads");
    for threads in [2, 3, 7] {
        assert_eq!(
            log.verify_with(threads, 1).expect("the log reads"),
            single,
            "{threads} threads"
        );
    }
    single
}

fn assert_fails_at(report: &VerifyReport, sequence: u64, words: &str) {
    assert!(!report.ok, "verify passed: {report:?}");
    assert_eq!(report.first_bad_sequence, Some(sequence), "{report:?}");
    let problem = report.problem.as_deref().unwrap_or_default();
    assert!(
        problem.contains(words),
        "problem {problem:?} does not mention {words:?}"
    );
}

// === writing and reading ===

#[test]
fn appended_events_read_back_exactly() -> TestResult {
    let dir = TempDir::new()?;
    let log = EventLog::open(dir.path())?;
    let input = events(1..=5);
    let stored = log.append(input.clone())?;

    assert_eq!(stored.len(), 5);
    for (i, (s, e)) in stored.iter().zip(&input).enumerate() {
        assert_eq!(s.sequence, i as u64 + 1);
        assert_eq!(
            (&s.kind, s.time, &s.actor, s.action_id, &s.payload),
            (&e.kind, e.time, &e.actor, e.action_id, &e.payload)
        );
        assert_eq!(log.get(s.sequence)?.as_ref(), Some(s));
    }
    assert_eq!(stored[0].prev_hash, [0; 32]);
    assert_eq!(stored[1].prev_hash, stored[0].hash);
    let read: Vec<_> = log.iter_from(1).collect::<Result<_, _>>()?;
    assert_eq!(read, stored);
    assert_eq!((log.last_sequence(), log.head_hash()), (5, stored[4].hash));
    Ok(())
}

#[test]
fn large_events_written_as_sled_blob_files_are_synced_with_their_batch() -> TestResult {
    let dir = TempDir::new()?;
    let log = EventLog::open(dir.path())?;
    // Near the largest event CheckAction accepts (64 KB of parameters): once the leaf splits
    // (17 entries), each half is written whole, far over sled's 128 KiB fragment limit, so
    // sled writes it as a blob file.
    let large = |i: u64| NewEvent {
        payload: json!({ "parameters": "x".repeat(70 * 1024), "attempt": i }),
        ..event(i)
    };
    let synced = || {
        log.blobs
            .synced_files
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    for i in 1..=24 {
        log.append(vec![large(i)])?;
        // Once append returns, every blob file on disk was synced as it is now.
        let mut unsynced = Vec::new();
        for entry in std::fs::read_dir(dir.path().join("blobs"))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let len = entry.metadata()?.len();
            let known = name
                .parse::<u64>()
                .ok()
                .and_then(|position| log.blobs.synced.lock().ok()?.get(&position).copied());
            if known != Some(len) {
                unsynced.push(name);
            }
        }
        assert!(
            unsynced.is_empty(),
            "after append {i}: {unsynced:?} not synced"
        );
    }
    let on_disk = std::fs::read_dir(dir.path().join("blobs"))?.count() as u64;

    assert!(
        on_disk > 0,
        "sled wrote no blob file, so this test proves nothing"
    );
    assert!(synced() > 0, "{on_disk} blob files, none synced");
    let before = synced();
    log.append(vec![event(25)])?;
    assert!(
        synced() - before <= 1,
        "a small append resynced old blob files"
    );
    assert!(verify(&log).ok);
    Ok(())
}

#[test]
fn cursors_survive_a_reopen_and_leave_the_chain_alone() -> TestResult {
    let dir = TempDir::new()?;
    {
        let log = EventLog::open(dir.path())?;
        log.append(events(1..=3))?;
        assert_eq!(log.cursor("spans")?, 0);
        log.save_cursor("spans", 2)?;
        log.save_cursor("other", 3)?;
        assert_eq!(log.cursor("spans")?, 2);
    }
    let log = EventLog::open(dir.path())?;
    assert_eq!((log.cursor("spans")?, log.cursor("other")?), (2, 3));
    let report = verify(&log);
    assert!(report.ok, "{report:?}");
    assert_eq!(report.events_checked, 3);
    Ok(())
}

#[test]
fn reader_notes_survive_a_reopen_are_kept_per_reader_and_leave_the_chain_alone() -> TestResult {
    let dir = TempDir::new()?;
    {
        let log = EventLog::open(dir.path())?;
        log.append(events(1..=2))?;
        log.save_note("slack", "a", Some(b"one"))?;
        log.save_note("slack", "b", Some(b"two"))?;
        log.save_note("teams", "a", Some(b"other reader"))?;
        log.save_note("slack", "b", None)?;
    }
    let log = EventLog::open(dir.path())?;
    assert_eq!(log.note("slack", "a")?.as_deref(), Some(&b"one"[..]));
    assert_eq!(log.note("slack", "b")?, None);
    assert_eq!(
        log.note("teams", "a")?.as_deref(),
        Some(&b"other reader"[..])
    );
    let report = verify(&log);
    assert!(report.ok, "{report:?}");
    assert_eq!(report.events_checked, 2);
    Ok(())
}

#[test]
fn stored_body_is_the_documented_layout() -> TestResult {
    let dir = TempDir::new()?;
    let log = EventLog::open(dir.path())?;
    let stored = log.append(vec![event(1)])?;
    let value = log
        .events
        .get(1u64.to_be_bytes())?
        .ok_or("event 1 not stored")?;
    let (hash, body) = value.split_at(32);

    assert_eq!(hash, stored[0].hash);
    assert_eq!(codec::chain_hash(&[0; 32], body), stored[0].hash);
    let body = std::str::from_utf8(body)?;
    assert!(body.starts_with(r#"{"sequence":1,"kind":"action.requested","time":"2025-03-14T15:09:27.234567891Z","actor":"agent-1","action_id":"01900000-0000-7000-8000-000000000001","payload":{"attempt":1,"justification":"#), "{body}");
    assert!(
        body.ends_with(&format!(r#""prev_hash":"{}"}}"#, "0".repeat(64))),
        "{body}"
    );
    let head = log.meta.get(codec::HEAD_KEY)?.ok_or("no head record")?;
    assert_eq!(head.as_ref(), codec::encode_head(1, &stored[0].hash));
    Ok(())
}

#[test]
fn empty_batch_writes_nothing() -> TestResult {
    let dir = TempDir::new()?;
    let log = EventLog::open(dir.path())?;
    assert_eq!(log.append(Vec::new())?, Vec::new());
    assert_eq!((log.last_sequence(), log.head_hash()), (0, [0; 32]));
    assert_eq!(log.get(1)?, None);
    assert_eq!(log.iter_from(1).count(), 0);
    Ok(())
}

#[test]
fn sequences_are_contiguous_across_batches() -> TestResult {
    let dir = TempDir::new()?;
    let log = EventLog::open(dir.path())?;
    let mut all = Vec::new();
    for (from, to) in [(1, 1), (2, 4), (5, 104), (105, 107)] {
        let stored = log.append(events(from..=to))?;
        assert_eq!(stored.first().map(|e| e.sequence), Some(from));
        assert_eq!(stored.last().map(|e| e.sequence), Some(to));
        all.extend(stored);
    }
    assert!(all.windows(2).all(|w| w[1].prev_hash == w[0].hash));
    assert_eq!(log.iter_from(1).collect::<Result<Vec<_>, _>>()?, all);
    assert_eq!(verify(&log).events_checked, 107);
    Ok(())
}

#[test]
fn chain_continues_after_reopen() -> TestResult {
    let dir = TempDir::new()?;
    let first = {
        let log = EventLog::open(dir.path())?;
        log.append(events(1..=10))?
    };
    let log = EventLog::open(dir.path())?;
    assert_eq!((log.last_sequence(), log.head_hash()), (10, first[9].hash));
    let more = log.append(events(11..=20))?;
    assert_eq!((more[0].sequence, more[0].prev_hash), (11, first[9].hash));
    drop(log);

    let log = EventLog::open(dir.path())?;
    let report = verify(&log);
    assert!(report.ok, "{report:?}");
    assert_eq!(
        (
            report.events_checked,
            report.head_sequence,
            report.head_hash
        ),
        (20, 20, more[9].hash)
    );
    Ok(())
}

#[test]
fn iteration_starts_anywhere() -> TestResult {
    let dir = log_with(10)?;
    let log = EventLog::open(dir.path())?;
    let seqs = |from| -> Result<Vec<u64>, StoreError> {
        log.iter_from(from).map(|r| r.map(|e| e.sequence)).collect()
    };
    assert_eq!(seqs(0)?, (1..=10).collect::<Vec<_>>());
    assert_eq!(seqs(7)?, vec![7, 8, 9, 10]);
    assert_eq!(seqs(10)?, vec![10]);
    assert_eq!(seqs(11)?, Vec::<u64>::new());
    assert_eq!((log.get(0)?, log.get(11)?), (None, None));
    Ok(())
}

#[test]
fn event_that_cannot_read_back_is_refused_and_nothing_is_written() -> TestResult {
    let dir = TempDir::new()?;
    let log = EventLog::open(dir.path())?;
    log.append(events(1..=2))?;

    let mut far_future = event(3);
    far_future.time = Utc
        .with_ymd_and_hms(10_000, 1, 1, 0, 0, 0)
        .single()
        .ok_or("time")?;
    let mut too_deep = event(3);
    too_deep.payload = (0..200).fold(json!(1), |inner, _| json!([inner]));
    for bad in [far_future, too_deep] {
        let err = log
            .append(vec![event(3), bad])
            .err()
            .ok_or("append accepted it")?;
        assert!(matches!(err, StoreError::Encode { index: 1, .. }), "{err}");
    }
    assert_eq!(log.last_sequence(), 2);
    assert_eq!(log.append(vec![event(3)])?[0].sequence, 3);
    assert!(verify(&log).ok);
    Ok(())
}

/// `append` reads a body back only when its payload holds deep nesting; every
/// other body must decode to exactly what was given, however awkward its text.
#[test]
fn bodies_append_does_not_read_back_still_read_back_exactly() -> TestResult {
    let dir = TempDir::new()?;
    let log = EventLog::open(dir.path())?;
    let awkward = [
        "",
        "quote \" backslash \\ slash / \\u0041",
        "\u{0}\u{1f}\u{7f}\n\t\r",
        "é 😀 \u{2028} \u{202e}",
    ];
    let batch: Vec<NewEvent> = awkward
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let mut e = event(i as u64 + 1);
            e.kind = format!("kind.{text}");
            e.actor = (*text).to_owned();
            e.payload = json!({
                *text: text,
                "numbers": [i64::MIN, i64::MAX, u64::MAX, 0, -1],
                "flags": [true, false, null],
                "nested": (0..25).fold(json!(text), |inner, _| json!({"k": [inner]})),
            });
            e
        })
        .collect();
    let appended = log.append(batch.clone())?;
    let read = log.iter_from(1).collect::<Result<Vec<_>, _>>()?;
    assert_eq!(appended, read);
    for (given, back) in batch.iter().zip(&read) {
        assert_eq!(
            (
                &given.kind,
                given.time,
                &given.actor,
                given.action_id,
                &given.payload
            ),
            (
                &back.kind,
                back.time,
                &back.actor,
                back.action_id,
                &back.payload
            )
        );
    }
    // Floats are stored and read back as given.
    let mut float = event(5);
    float.payload = json!({"ratio": 0.1, "big": 1.7976931348623157e308});
    let stored = log.append(vec![float.clone()])?;
    assert_eq!(log.get(5)?.map(|e| e.payload), Some(float.payload));
    assert_eq!(stored.len(), 1);
    assert!(verify(&log).ok);
    Ok(())
}

#[test]
fn append_never_overwrites_a_stored_event() -> TestResult {
    let dir = log_with(3)?;
    let log = EventLog::open(dir.path())?;
    log.events
        .insert(4u64.to_be_bytes(), &b"already here"[..])?;

    let err = log
        .append(events(4..=5))
        .err()
        .ok_or("append overwrote event 4")?;
    assert!(matches!(err, StoreError::WritesRefused { .. }), "{err}");
    assert_eq!(
        log.events.get(4u64.to_be_bytes())?.as_deref(),
        Some(&b"already here"[..])
    );
    assert!(
        log.events.get(5u64.to_be_bytes())?.is_none(),
        "a refused batch was partly written"
    );
    assert!(
        log.append(events(4..=4)).is_err(),
        "the writer went on after a conflict"
    );
    Ok(())
}

// === verification ===

#[test]
fn empty_log_verifies() -> TestResult {
    let dir = TempDir::new()?;
    let report = verify(&EventLog::open(dir.path())?);
    assert_eq!(
        report,
        VerifyReport {
            ok: true,
            events_checked: 0,
            first_bad_sequence: None,
            problem: None,
            head_sequence: 0,
            head_hash: [0; 32]
        }
    );
    Ok(())
}

#[test]
fn long_log_verifies() -> TestResult {
    let dir = TempDir::new()?;
    let log = EventLog::open(dir.path())?;
    for batch in 0..20 {
        log.append(events(batch * 250 + 1..=batch * 250 + 250))?;
    }
    let report = verify(&log);
    assert!(report.ok, "{report:?}");
    assert_eq!(
        (
            report.events_checked,
            report.head_sequence,
            report.head_hash
        ),
        (5000, 5000, log.head_hash())
    );
    Ok(())
}

#[test]
fn changed_body_byte_is_reported_at_that_event() -> TestResult {
    // Offsets inside the payload, the sequence digits, the prev_hash hex and the closing brace.
    for offset in [0, 14, 40, 150, 290] {
        let dir = log_with(30)?;
        tamper(dir.path(), |events, _| flip(events, 17, 32 + offset))?;
        let log = EventLog::open(dir.path())?;
        assert_fails_at(&verify(&log), 17, "event 17: ");
        assert!(matches!(
            log.get(17),
            Err(StoreError::Corrupt { sequence: 17, .. })
        ));
        assert!(log.get(16).is_ok() && log.get(18).is_ok());
    }
    Ok(())
}

#[test]
fn changed_hash_byte_is_reported_at_that_event() -> TestResult {
    let dir = log_with(30)?;
    tamper(dir.path(), |events, _| flip(events, 9, 5))?;
    let report = verify(&EventLog::open(dir.path())?);
    assert_fails_at(
        &report,
        9,
        "event 9: hash does not match its contents (changed after it was written)",
    );
    assert_eq!(report.events_checked, 8);
    Ok(())
}

#[test]
fn deleted_event_is_reported_as_missing() -> TestResult {
    let dir = log_with(30)?;
    tamper(dir.path(), |events, _| {
        events.remove(17u64.to_be_bytes()).map(drop)
    })?;
    let log = EventLog::open(dir.path())?;
    assert_fails_at(
        &verify(&log),
        17,
        "event 17 is missing: the log jumps from 16 to 18",
    );

    let items: Vec<_> = log.iter_from(15).collect();
    assert_eq!(items.len(), 3, "iteration must stop at the gap: {items:?}");
    assert!(matches!(
        items[2],
        Err(StoreError::Corrupt { sequence: 17, .. })
    ));
    assert!(matches!(
        log.get(17),
        Err(StoreError::Corrupt { sequence: 17, .. })
    ));
    Ok(())
}

#[test]
fn deleted_first_events_are_reported() -> TestResult {
    let dir = log_with(10)?;
    tamper(dir.path(), |events, _| {
        events.remove(1u64.to_be_bytes())?;
        events.remove(2u64.to_be_bytes()).map(drop)
    })?;
    assert_fails_at(
        &verify(&EventLog::open(dir.path())?),
        1,
        "events 1 to 2 are missing: the log starts at 3",
    );
    Ok(())
}

#[test]
fn swapped_events_are_reported() -> TestResult {
    let dir = log_with(30)?;
    tamper(dir.path(), |events, _| {
        let (a, b) = (12u64.to_be_bytes(), 13u64.to_be_bytes());
        let (va, vb) = (events.get(a)?, events.get(b)?);
        events.insert(a, vb.unwrap_or_default())?;
        events.insert(b, va.unwrap_or_default()).map(drop)
    })?;
    assert_fails_at(
        &verify(&EventLog::open(dir.path())?),
        12,
        "moved or swapped",
    );
    Ok(())
}

#[test]
fn replaced_event_with_valid_own_hash_breaks_the_link() -> TestResult {
    // Event 5 rewritten with a correct hash of its own, but event 6 still links to the original.
    let dir = log_with(10)?;
    tamper(dir.path(), |events, _| {
        let prev = events.get(4u64.to_be_bytes())?.unwrap_or_default();
        let prev: [u8; 32] = prev
            .get(..32)
            .and_then(|h| h.try_into().ok())
            .unwrap_or_default();
        let mut forged = event(5);
        forged.actor = "someone-else".to_owned();
        let value = codec::encode(5, forged, &prev)
            .map(|(v, _)| v)
            .unwrap_or_default();
        events.insert(5u64.to_be_bytes(), value).map(drop)
    })?;
    assert_fails_at(
        &verify(&EventLog::open(dir.path())?),
        6,
        "event 6: its prev_hash does not match the hash of event 5",
    );
    Ok(())
}

#[test]
fn deleted_last_event_is_detected_through_the_head() -> TestResult {
    let dir = log_with(30)?;
    tamper(dir.path(), |events, _| {
        events.remove(30u64.to_be_bytes()).map(drop)
    })?;
    let log = EventLog::open(dir.path())?;
    let report = verify(&log);
    assert_fails_at(
        &report,
        30,
        "event 30 is missing: the log ends at event 29 but its recorded head is event 30",
    );
    assert_eq!(report.events_checked, 29);

    let err = log
        .append(vec![event(30)])
        .err()
        .ok_or("append on a truncated log was accepted")?;
    assert!(matches!(err, StoreError::WritesRefused { .. }), "{err}");
    assert!(log.events.get(30u64.to_be_bytes())?.is_none());
    Ok(())
}

#[test]
fn rolled_back_head_record_is_detected() -> TestResult {
    let dir = log_with(30)?;
    tamper(dir.path(), |events, meta| {
        let v = events.get(28u64.to_be_bytes())?.unwrap_or_default();
        let hash: [u8; 32] = v
            .get(..32)
            .and_then(|h| h.try_into().ok())
            .unwrap_or_default();
        meta.insert(codec::HEAD_KEY, &codec::encode_head(28, &hash)[..])
            .map(drop)
    })?;
    let log = EventLog::open(dir.path())?;
    assert_fails_at(
        &verify(&log),
        29,
        "event 29: it lies beyond the recorded head (event 28)",
    );
    assert!(
        log.append(vec![event(29)]).is_err(),
        "append would overwrite event 29"
    );
    assert_eq!(
        log.iter_from(1).count(),
        30,
        "an investigator must see every stored event"
    );
    Ok(())
}

#[test]
fn changed_or_missing_head_record_is_detected() -> TestResult {
    let dir = log_with(5)?;
    tamper(dir.path(), |_, meta| {
        meta.insert(codec::HEAD_KEY, &codec::encode_head(5, &[7; 32])[..])
            .map(drop)
    })?;
    assert_fails_at(
        &verify(&EventLog::open(dir.path())?),
        5,
        "does not match the recorded head hash",
    );

    tamper(dir.path(), |_, meta| {
        meta.insert(codec::HEAD_KEY, &b"short"[..]).map(drop)
    })?;
    assert_fails_at(
        &verify(&EventLog::open(dir.path())?),
        6,
        "the head record cannot be read",
    );

    tamper(dir.path(), |_, meta| meta.remove(codec::HEAD_KEY).map(drop))?;
    assert_fails_at(
        &verify(&EventLog::open(dir.path())?),
        6,
        "the head record is missing",
    );
    Ok(())
}

#[test]
fn stray_keys_are_reported() -> TestResult {
    let dir = log_with(5)?;
    tamper(dir.path(), |events, _| {
        events.insert(0u64.to_be_bytes(), &b"x"[..]).map(drop)
    })?;
    assert_fails_at(
        &verify(&EventLog::open(dir.path())?),
        1,
        "key 0 is stored where event 1 should be",
    );

    let dir = log_with(5)?;
    tamper(dir.path(), |events, _| {
        events
            .insert(&b"\x00\x00\x00\x00\x00\x00\x00\x03!"[..], &b"x"[..])
            .map(drop)
    })?;
    assert_fails_at(
        &verify(&EventLog::open(dir.path())?),
        4,
        "a key that is not a sequence number",
    );
    Ok(())
}

#[test]
fn rewriting_the_whole_tail_is_caught_only_by_an_external_anchor() -> TestResult {
    // Documents the limit stated in the module doc: a consistent rewrite verifies, and only the
    // head hash an auditor kept elsewhere shows that the log changed.
    let dir = TempDir::new()?;
    let anchored = {
        let log = EventLog::open(dir.path())?;
        log.append(events(1..=10))?;
        log.head_hash()
    };
    tamper(dir.path(), |events, meta| {
        let v = events.get(9u64.to_be_bytes())?.unwrap_or_default();
        let prev: [u8; 32] = v
            .get(..32)
            .and_then(|h| h.try_into().ok())
            .unwrap_or_default();
        let mut forged = event(10);
        forged.payload = json!({"verb": "read"});
        let (value, stored) = codec::encode(10, forged, &prev)
            .map_err(|_| sled::Error::Unsupported("encode".into()))?;
        events.insert(10u64.to_be_bytes(), value)?;
        meta.insert(codec::HEAD_KEY, &codec::encode_head(10, &stored.hash)[..])
            .map(drop)
    })?;
    // The head witness beside sled saw event 10 as it was.
    assert_fails_at(
        &verify(&EventLog::open(dir.path())?),
        10,
        "is not the one the head witness recorded",
    );
    // Someone who can write sled's files can remove the witness too.
    std::fs::remove_file(dir.path().join(super::witness::FILE_NAME))?;
    let report = verify(&EventLog::open(dir.path())?);
    assert!(report.ok, "{report:?}");
    assert_ne!(report.head_hash, anchored);
    Ok(())
}

// === damaged data never panics ===

#[test]
fn garbage_values_are_error_items() -> TestResult {
    let garbage: [&[u8]; 5] = [b"", b"\xff\xfe", &[0u8; 32], &[b'{'; 40], &[0xff; 200]];
    for value in garbage {
        let dir = log_with(6)?;
        tamper(dir.path(), |events, _| {
            events.insert(4u64.to_be_bytes(), value).map(drop)
        })?;
        let log = EventLog::open(dir.path())?;
        let items: Vec<_> = log.iter_from(1).collect();
        assert_eq!(items.len(), 4);
        assert!(
            matches!(&items[3], Err(StoreError::Corrupt { sequence: 4, .. })),
            "{:?}",
            items[3]
        );
        assert_fails_at(&verify(&log), 4, "event 4: ");
    }
    Ok(())
}

#[test]
fn damaged_last_event_still_opens() -> TestResult {
    let dir = log_with(3)?;
    tamper(dir.path(), |events, _| {
        events.insert(3u64.to_be_bytes(), &b"tiny"[..]).map(drop)
    })?;
    let log = EventLog::open(dir.path())?;
    assert_fails_at(&verify(&log), 3, "event 3: its stored value is 4 bytes");
    assert!(log.append(vec![event(4)]).is_err());
    Ok(())
}

#[test]
fn every_single_byte_change_or_truncation_is_caught_at_that_event() -> TestResult {
    // Pure codec-level sweep (no sled), so it can afford every offset and every bit.
    let mut prev = [0; 32];
    let mut values = Vec::new();
    for seq in 1..=3 {
        let (value, stored) = codec::encode(seq, event(seq), &prev)?;
        prev = stored.hash;
        values.push(value);
    }
    // Verification's fast link check and the full read used by iteration must agree.
    let walk = |middle: &[u8]| {
        let mut full = Chain::genesis();
        let mut linked = Chain::genesis();
        let found = [&values[0][..], middle, &values[2][..]]
            .iter()
            .zip(1u64..)
            .find_map(|(v, seq)| {
                let key = seq.to_be_bytes();
                let by_full = full.check(&key, v).err();
                let by_link = linked.check_linked(&key, v).err();
                assert_eq!(by_full, by_link, "event {seq}");
                by_full
            });
        found.map(|p| p.sequence)
    };
    assert_eq!(walk(&values[1]), None);
    for index in 0..values[1].len() {
        for bit in 0..8 {
            let mut damaged = values[1].clone();
            damaged[index] ^= 1 << bit;
            assert_eq!(walk(&damaged), Some(2), "byte {index} bit {bit}");
        }
    }
    for len in 0..values[1].len() {
        assert_eq!(walk(&values[1][..len]), Some(2), "truncated to {len}");
    }
    Ok(())
}

#[test]
fn reading_rejects_well_hashed_bodies_it_never_writes() {
    // What a forger who recomputes hashes could store: reading reports it and never panics.
    let nested = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let zeros = "0".repeat(64);
    let body = |kind: &str, payload: &str| {
        format!(
            r#"{{"sequence":1,"kind":{kind},"time":"2025-01-01T00:00:00.000000000Z","actor":"a","action_id":null,"payload":{payload},"prev_hash":"{zeros}"}}"#
        )
    };
    let mut bad_utf8 = body(r#""k""#, r#""xx""#).into_bytes();
    let at = bad_utf8
        .windows(2)
        .position(|w| w == b"xx")
        .unwrap_or_default();
    bad_utf8[at] = 0xff;
    let cases = [
        body(r#""k""#, &nested).into_bytes(),
        body(r#""k""#, "1e400").into_bytes(),
        body(r#""k""#, r#"{"a":1,}"#).into_bytes(),
        body("7", "null").into_bytes(),
        body(r#""k""#, "null")
            .replace(",\"prev_hash\"", ",\"extra\":1,\"prev_hash\"")
            .into_bytes(),
        (body(r#""k""#, "null") + " {}").into_bytes(),
        bad_utf8,
    ];
    for body in cases {
        let mut value = codec::chain_hash(&[0; 32], &body).to_vec();
        value.extend_from_slice(&body);
        let read = Chain::genesis().check(&1u64.to_be_bytes(), &value);
        assert!(read.is_err(), "{}", String::from_utf8_lossy(&body));
    }
}

// === opening ===

#[test]
fn opening_a_directory_in_use_names_it_and_says_what_to_do() -> TestResult {
    let dir = TempDir::new()?;
    let _first = EventLog::open(dir.path())?;
    let err = EventLog::open(dir.path()).err().ok_or("opened twice")?;
    let message = err.to_string();
    assert!(matches!(err, StoreError::Open { .. }), "{message}");
    assert!(
        message.contains(&dir.path().display().to_string()),
        "{message}"
    );
    assert!(
        message.contains("another process (or another EventLog in this process) has it open"),
        "{message}"
    );
    Ok(())
}

#[test]
fn opening_a_file_as_the_directory_fails_clearly() -> TestResult {
    let dir = TempDir::new()?;
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x")?;
    let err = EventLog::open(&file).err().ok_or("opened a file")?;
    assert!(err.to_string().contains("not-a-dir"), "{err}");
    Ok(())
}

/// Start-up's replay: more than two chunks, so the checking threads take part, and every
/// event arrives once, in order, as `iter_from` reads it, with `verify`'s report.
#[test]
fn verify_and_replay_of_an_intact_log_hands_over_every_event_in_order() -> TestResult {
    let dir = TempDir::new()?;
    let log = EventLog::open(dir.path())?;
    let total = 3 * REPLAY_CHUNK + 17;
    for start in (1..=total).step_by(2_000) {
        log.append(events(start..=(start + 1_999).min(total)))?;
    }
    let mut seen = Vec::new();
    let report = log.verify_and_replay(
        |raw| {
            let payload: serde_json::Value =
                serde_json::from_str(raw.payload.get()).map_err(|e| e.to_string())?;
            Ok((
                raw.sequence,
                raw.kind.into_owned(),
                raw.actor.into_owned(),
                raw.time,
                raw.action_id,
                payload,
            ))
        },
        |sequence, item| seen.push((sequence, item)),
    );
    assert_eq!(report, Some(log.verify()?));
    let walked = log.iter_from(1).collect::<Result<Vec<_>, _>>()?;
    assert_eq!(seen.len(), walked.len());
    for ((sequence, item), stored) in seen.into_iter().zip(walked) {
        let item = item?;
        assert_eq!(sequence, stored.sequence);
        assert_eq!(
            item,
            (
                stored.sequence,
                stored.kind,
                stored.actor,
                stored.time,
                stored.action_id,
                stored.payload
            )
        );
    }
    Ok(())
}

/// Whatever `verify` catches, the one-pass start-up replay refuses too, wherever it lies
/// among the chunks (the caller then verifies and walks the log to say what is wrong).
#[test]
fn verify_and_replay_refuses_every_log_verify_refuses() -> TestResult {
    let total = 2 * REPLAY_CHUNK + 5;
    let build = || -> Result<TempDir, Box<dyn Error>> {
        let dir = TempDir::new()?;
        let log = EventLog::open(dir.path())?;
        for start in (1..=total).step_by(3_000) {
            log.append(events(start..=(start + 2_999).min(total)))?;
        }
        Ok(dir)
    };
    type Edit = fn(&sled::Tree) -> sled::Result<()>;
    let edits: [(&str, Edit); 6] = [
        ("a body changed in the first chunk", |t| flip(t, 3, 40)),
        ("a body changed in the last chunk", |t| {
            flip(t, 2 * REPLAY_CHUNK + 2, 40)
        }),
        ("the first event of a chunk changed", |t| {
            flip(t, REPLAY_CHUNK + 1, 40)
        }),
        ("the last event of a chunk changed", |t| {
            flip(t, REPLAY_CHUNK, 40)
        }),
        ("an event removed", |t| {
            t.remove((REPLAY_CHUNK + 7).to_be_bytes()).map(drop)
        }),
        ("a stray key before event 1", |t| {
            t.insert(0u64.to_be_bytes(), vec![0u8; 40]).map(drop)
        }),
    ];
    for (what, edit) in edits {
        let dir = build()?;
        tamper(dir.path(), |events, _| edit(events))?;
        let log = EventLog::open(dir.path())?;
        assert!(!verify(&log).ok, "{what}: verify did not notice");
        let mut folded = 0u64;
        let report = log.verify_and_replay(|_| Ok(()), |_, _| folded += 1);
        assert_eq!(report, None, "{what}: replayed {folded} events as intact");
    }
    Ok(())
}

/// Replaying after an event hands over exactly the events after it, linked to its hash,
/// for every place it can be (chunk boundaries included), and refuses a wrong hash or a
/// change in the part it reads.
#[test]
fn verify_and_replay_after_an_event_reads_only_what_follows_it() -> TestResult {
    let dir = TempDir::new()?;
    let log = EventLog::open(dir.path())?;
    let total = 2 * REPLAY_CHUNK + 9;
    for start in (1..=total).step_by(3_000) {
        log.append(events(start..=(start + 2_999).min(total)))?;
    }
    let hash_of = |sequence: u64| -> Result<[u8; 32], Box<dyn Error>> {
        Ok(log.get(sequence)?.ok_or("missing")?.hash)
    };
    for after in [
        1,
        2,
        REPLAY_CHUNK - 1,
        REPLAY_CHUNK,
        REPLAY_CHUNK + 1,
        total - 1,
    ] {
        let mut seen = Vec::new();
        let report = log.verify_and_replay_after(
            after,
            hash_of(after)?,
            |raw| Ok(raw.sequence),
            |sequence, item| seen.push((sequence, item)),
        );
        let report = report.ok_or(format!("after {after}: refused"))?;
        assert_eq!(report.events_checked, total - after, "after {after}");
        assert_eq!(report.head_sequence, total);
        let expected: Vec<_> = (after + 1..=total).map(|s| (s, Ok(s))).collect();
        assert_eq!(seen, expected, "after {after}");
    }
    // At the head: nothing to hand over, and the head's own hash is what it must link to.
    assert!(
        log.verify_and_replay_after(total, hash_of(total)?, |_| Ok(()), |_, _| {})
            .is_some()
    );
    let wrong = log.verify_and_replay_after(5, hash_of(4)?, |_| Ok(()), |_, _| {});
    assert_eq!(wrong, None, "a tail that does not link to the given hash");
    assert_eq!(
        log.verify_and_replay_after(total + 1, [0; 32], |_| Ok(()), |_, _| {}),
        None,
        "beyond the head"
    );
    drop(log);

    // A change after the anchor is refused; one before it is not read at all.
    tamper(dir.path(), |events, _| flip(events, REPLAY_CHUNK + 3, 40))?;
    let log = EventLog::open(dir.path())?;
    let anchor = REPLAY_CHUNK + 5;
    let after_change = log.get(anchor)?.ok_or("missing")?.hash;
    assert!(
        log.verify_and_replay_after(anchor, after_change, |_| Ok(()), |_, _| {})
            .is_some()
    );
    let before = log.get(2)?.ok_or("missing")?.hash;
    assert_eq!(
        log.verify_and_replay_after(2, before, |_| Ok(()), |_, _| {}),
        None
    );
    Ok(())
}

// === checkpoints ===

/// Checkpoint bytes come back whole across a reopen; adopting a newer one removes older
/// ones and leftovers of a crash, an older one is never adopted over a newer, and the chain
/// and its verification are untouched by any of it.
#[test]
fn checkpoints_are_saved_as_files_and_only_the_newest_is_kept() -> TestResult {
    let dir = log_with(10)?;
    let log = EventLog::open(dir.path())?;
    assert_eq!(log.current_checkpoint()?, None);
    assert_eq!(log.checkpoint(4, u64::MAX)?, None);
    let big: Vec<u8> = (0..300_011).map(|i| (i % 251) as u8).collect();
    log.save_checkpoint(4, &big)?;
    log.save_checkpoint(7, b"seven")?;
    // Saved again for the same event: replaced whole.
    log.save_checkpoint(4, b"four")?;
    log.save_checkpoint(4, &big)?;
    assert_eq!(log.checkpoint(4, u64::MAX)?.as_deref(), Some(&big[..]));
    // What a crash in the middle of writing one leaves.
    let files = dir.path().join(CHECKPOINT_DIR);
    std::fs::write(files.join("00000000000000000003.partial"), b"half")?;
    std::fs::write(files.join("notes.txt"), b"an operator's")?;
    log.adopt_checkpoint(CheckpointRef {
        event: 5,
        covers: 4,
    })?;
    log.adopt_checkpoint(CheckpointRef {
        event: 8,
        covers: 7,
    })?;
    assert_eq!(log.checkpoint(4, u64::MAX)?, None, "older ones removed");
    // A late saver of an older state: not adopted, and removed.
    log.save_checkpoint(6, b"six")?;
    log.adopt_checkpoint(CheckpointRef {
        event: 9,
        covers: 6,
    })?;
    assert_eq!(log.checkpoint(6, u64::MAX)?, None);
    let mut left: Vec<String> = std::fs::read_dir(&files)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    left.sort();
    assert_eq!(left, ["00000000000000000007.checkpoint", "notes.txt"]);
    drop(log);

    let log = EventLog::open(dir.path())?;
    assert_eq!(
        log.current_checkpoint()?,
        Some(CheckpointRef {
            event: 8,
            covers: 7
        })
    );
    assert_eq!(log.checkpoint(7, 5)?.as_deref(), Some(&b"seven"[..]));
    assert!(
        matches!(
            log.checkpoint(7, 4),
            Err(StoreError::Corrupt { sequence: 7, .. })
        ),
        "longer than its event records: not read"
    );
    let report = verify(&log);
    assert!(report.ok, "{report:?}");
    assert_eq!(report.events_checked, 10);
    Ok(())
}

// === scale ===

/// `cargo test --release -- --ignored --nocapture measure_million_events`
#[test]
#[ignore = "takes about a minute; run in release to measure"]
fn measure_million_events() -> TestResult {
    const TOTAL: u64 = 1_000_000;
    const BATCH: u64 = 1_000;
    let dir = TempDir::new()?;
    let log = EventLog::open(dir.path())?;
    let started = Instant::now();
    for b in 0..TOTAL / BATCH {
        log.append(events(b * BATCH + 1..=(b + 1) * BATCH))?;
    }
    let append = started.elapsed();
    drop(log);

    let started = Instant::now();
    let log = EventLog::open(dir.path())?;
    let open = started.elapsed();

    // Each figure is the first pass after a reopen (cold sled cache) then a second (warm).
    let timed = |what: &dyn Fn() -> Result<u64, StoreError>| -> Result<String, StoreError> {
        let mut out = Vec::new();
        for _ in 0..2 {
            let started = Instant::now();
            assert_eq!(what()?, TOTAL);
            out.push(format!("{:.2?}", started.elapsed()));
        }
        Ok(out.join(" / "))
    };
    let checked = |report: VerifyReport| {
        assert!(report.ok, "{report:?}");
        Ok(report.events_checked)
    };
    let verify_parallel = timed(&|| checked(log.verify()?))?;
    drop(log);
    let log = EventLog::open(dir.path())?;
    let verify_single = timed(&|| checked(log.verify_with(1, 1)?))?;
    drop(log);
    let log = EventLog::open(dir.path())?;
    let replay = timed(&|| log.iter_from(1).try_fold(0, |n, e| e.map(|_| n + 1)))?;

    let bytes: u64 = log
        .events
        .iter()
        .values()
        .map(|v| v.map_or(0, |v| v.len() as u64))
        .sum();
    println!(
        "{TOTAL} events, {} bytes each as stored\n\
         append in batches of {BATCH}: {append:.2?} ({:.0} events/s)\n\
         reopen: {open:.2?}\n\
         verify ({} threads), cold / warm: {verify_parallel}\n\
         verify (1 thread), cold / warm: {verify_single}\n\
         iter_from(1), cold / warm: {replay}",
        bytes / TOTAL,
        TOTAL as f64 / append.as_secs_f64(),
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_VERIFY_THREADS),
    );
    Ok(())
}

/// Events 8 to 10 removed and the head record set back to event 7, as sled's recovery
/// leaves a log cut at a damaged record: a valid, shorter chain.
fn cut_to_seven(dir: &Path) -> TestResult {
    tamper(dir, |events, meta| {
        let seventh = events.get(7u64.to_be_bytes())?.unwrap_or_default();
        for sequence in 8..=10u64 {
            events.remove(sequence.to_be_bytes())?;
        }
        let hash: [u8; 32] = seventh[..32].try_into().unwrap_or_default();
        meta.insert(codec::HEAD_KEY, &codec::encode_head(7, &hash)[..])
            .map(drop)
    })
}

#[test]
fn a_cut_tail_is_shown_by_the_head_witness_and_refuses_appends() -> TestResult {
    let dir = log_with(10)?;
    cut_to_seven(dir.path())?;
    let log = EventLog::open(dir.path())?;
    assert_fails_at(
        &verify(&log),
        8,
        "the log ends at 7 but the head witness records event 10",
    );
    let refused = log.append(events(8..=8)).unwrap_err();
    assert!(
        matches!(&refused, StoreError::WritesRefused { reason } if reason.contains("ends at 7")),
        "{refused}"
    );
    assert_eq!(
        log.last_sequence(),
        7,
        "no number of a lost event was taken"
    );
    let lost = log.lost().expect("a loss");
    assert_eq!((lost.from, lost.reached), (8, 10));
    Ok(())
}

#[test]
fn cursors_and_checkpoints_beyond_the_end_show_a_loss_too() -> TestResult {
    let dir = log_with(10)?;
    {
        let log = EventLog::open(dir.path())?;
        log.save_cursor("otlp-spans", 9)?;
    }
    std::fs::remove_file(dir.path().join(super::witness::FILE_NAME))?;
    cut_to_seven(dir.path())?;
    assert_fails_at(
        &verify(&EventLog::open(dir.path())?),
        8,
        "the log ends at 7 but reader otlp-spans has handed on events up to 9",
    );

    let dir = log_with(10)?;
    {
        let log = EventLog::open(dir.path())?;
        log.save_checkpoint(10, b"state")?;
    }
    std::fs::remove_file(dir.path().join(super::witness::FILE_NAME))?;
    cut_to_seven(dir.path())?;
    assert_fails_at(
        &verify(&EventLog::open(dir.path())?),
        8,
        "the log ends at 7 but checkpoint 10 exists",
    );
    Ok(())
}

#[test]
fn an_accepted_loss_is_recorded_and_numbers_continue_after_the_lost_ones() -> TestResult {
    let dir = log_with(10)?;
    {
        let log = EventLog::open(dir.path())?;
        log.save_checkpoint(10, b"state")?;
    }
    cut_to_seven(dir.path())?;
    let log = EventLog::open(dir.path())?;
    let marker = |sequence: u64| NewEvent {
        kind: "log.sequence_lost".into(),
        ..event(sequence)
    };
    let short = log.accept_loss(9, event(100), marker).unwrap_err();
    assert!(short.to_string().contains("at least 10"), "{short}");
    assert_eq!(log.accept_loss(10, event(100), marker)?, 10);
    assert!(verify(&log).ok);
    assert_eq!(log.get(8)?.map(|e| e.payload), Some(event(100).payload));
    assert_eq!(
        log.get(10)?.map(|e| e.kind),
        Some("log.sequence_lost".into())
    );
    assert_eq!(log.append(events(11..=11))?[0].sequence, 11);
    drop(log);
    assert!(dir.path().join("lost-checkpoints").is_dir());
    let log = EventLog::open(dir.path())?;
    assert!(verify(&log).ok, "the acceptance holds across a restart");
    assert_eq!(log.lost(), None);
    Ok(())
}

#[test]
fn a_damaged_witness_is_a_problem_until_accepted() -> TestResult {
    let dir = log_with(3)?;
    let path = dir.path().join(super::witness::FILE_NAME);
    let mut bytes = std::fs::read(&path)?;
    bytes[12] ^= 0x01;
    std::fs::write(&path, bytes)?;
    assert_fails_at(&verify(&EventLog::open(dir.path())?), 4, "head witness");
    Ok(())
}
