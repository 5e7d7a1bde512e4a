//! The bytes of one stored event: how a body is written, hashed and read back.
//!
//! Everything here is pure (no I/O), so every single-byte change to a stored value can be tested
//! exhaustively without a database. The layout itself is documented in the parent module.

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, Datelike, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use serde_json::Value;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::{NewEvent, RawEvent, StoredEvent};

/// Length of a SHA-256 hash, and of the hash that prefixes every stored value.
pub(crate) const HASH_LEN: usize = 32;

/// The `prev_hash` of event 1.
pub(crate) const GENESIS_HASH: [u8; HASH_LEN] = [0; HASH_LEN];

/// Key of the head record in the `meta` tree.
pub(crate) const HEAD_KEY: &[u8] = b"head";

/// `SHA-256(prev_hash || body)`: the link that makes the log tamper-evident.
pub(crate) fn chain_hash(prev_hash: &[u8; HASH_LEN], body: &[u8]) -> [u8; HASH_LEN] {
    Sha256::new()
        .chain_update(prev_hash)
        .chain_update(body)
        .finalize()
        .into()
}

/// The canonical body as written. Field order here IS the on-disk order: never reorder.
#[derive(Serialize)]
struct BodyOut<'a> {
    sequence: u64,
    kind: &'a str,
    #[serde(serialize_with = "write_time")]
    time: &'a DateTime<Utc>,
    actor: &'a str,
    action_id: Option<Uuid>,
    payload: &'a Value,
    #[serde(serialize_with = "write_hash")]
    prev_hash: &'a [u8; HASH_LEN],
}

/// The body as read back. Unknown fields are refused: an extra field is not something this
/// version wrote, and ignoring it would hide an edit from anyone reading the event.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BodyIn {
    sequence: u64,
    kind: String,
    #[serde(deserialize_with = "read_time")]
    time: DateTime<Utc>,
    actor: String,
    action_id: Option<Uuid>,
    payload: Value,
    #[serde(deserialize_with = "read_hash")]
    prev_hash: [u8; HASH_LEN],
}

/// The body as replay reads it: strings borrowed where they hold no escapes, the payload left
/// as JSON text for the caller to decode into its own types.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BodyRaw<'a> {
    sequence: u64,
    #[serde(borrow)]
    kind: Cow<'a, str>,
    #[serde(deserialize_with = "read_time")]
    time: DateTime<Utc>,
    #[serde(borrow)]
    actor: Cow<'a, str>,
    action_id: Option<Uuid>,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(deserialize_with = "read_hash")]
    prev_hash: [u8; HASH_LEN],
}

/// Reads a stored value that a verification has just proved intact (its hash and its place
/// in the chain), without hashing it again or parsing its payload. Still checks that the body
/// is the event of this key, so a misuse cannot go unnoticed.
pub(crate) fn decode_verified(sequence: u64, value: &[u8]) -> Result<RawEvent<'_>, String> {
    let Some((_, body)) = value.split_first_chunk::<HASH_LEN>() else {
        return Err(format!(
            "event {sequence}: its stored value is {} bytes, too short to hold a hash",
            value.len()
        ));
    };
    let b: BodyRaw<'_> = serde_json::from_slice(body)
        .map_err(|e| format!("event {sequence}: its body cannot be read ({e})"))?;
    if b.sequence != sequence {
        return Err(format!(
            "event {sequence}: the event stored under this sequence number is event {}",
            b.sequence
        ));
    }
    let _ = b.prev_hash;
    Ok(RawEvent {
        sequence,
        kind: b.kind,
        time: b.time,
        actor: b.actor,
        action_id: b.action_id,
        payload: b.payload,
    })
}

/// Builds the stored value (`hash || body`) of `event` at `sequence`, in one allocation, and
/// the event as later reads will return it (moved from `event`, not copied).
///
/// The log never holds an event that reads back differently or not at all (a payload nested
/// deeper than the JSON reader's recursion limit, a float that does not survive a round trip).
/// Where that is not certain, the body is decoded again and compared with the input before
/// anything is written; see [`reads_back_exactly`] for when it is.
pub(crate) fn encode(
    sequence: u64,
    event: NewEvent,
    prev_hash: &[u8; HASH_LEN],
) -> Result<(Vec<u8>, StoredEvent), String> {
    check_year(&event.time)?;
    let body = BodyOut {
        sequence,
        kind: &event.kind,
        time: &event.time,
        actor: &event.actor,
        action_id: event.action_id,
        payload: &event.payload,
        prev_hash,
    };
    let mut value = Vec::with_capacity(HASH_LEN + 256);
    value.extend_from_slice(&[0; HASH_LEN]);
    serde_json::to_writer(&mut value, &body).map_err(|e| format!("it cannot be encoded: {e}"))?;
    let hash = chain_hash(prev_hash, &value[HASH_LEN..]);
    value[..HASH_LEN].copy_from_slice(&hash);

    if !reads_back_exactly(&event.payload) {
        let stored =
            decode(sequence, &value).map_err(|p| format!("it would not read back: {p}"))?;
        let same = stored.kind == event.kind
            && stored.time == event.time
            && stored.actor == event.actor
            && stored.action_id == event.action_id;
        if !same {
            return Err("it reads back differently from what was given".to_owned());
        }
        if let Some(path) = first_difference(&event.payload, &stored.payload, String::new()) {
            return Err(format!(
                "its payload at `{path}` reads back differently from what was given"
            ));
        }
    }
    let stored = StoredEvent {
        sequence,
        kind: event.kind,
        time: event.time,
        actor: event.actor,
        action_id: event.action_id,
        payload: event.payload,
        prev_hash: *prev_hash,
        hash,
    };
    Ok((value, stored))
}

/// Whether `event` can be stored and reads back exactly as given, whatever sequence and
/// predecessor it gets: the same checks [`encode`] makes, so a caller can refuse one event on
/// its own before it joins a batch that its failure would otherwise fail as a whole.
pub(crate) fn check_storable(event: &NewEvent) -> Result<(), String> {
    check_year(&event.time)?;
    if reads_back_exactly(&event.payload) {
        return Ok(());
    }
    encode(1, event.clone(), &GENESIS_HASH).map(drop)
}

fn check_year(time: &DateTime<Utc>) -> Result<(), String> {
    let year = time.year();
    if !(0..=9999).contains(&year) {
        return Err(format!(
            "its time is in the year {year}, outside the years 0000-9999 that RFC 3339 can express"
        ));
    }
    Ok(())
}

/// Where `given` and `read` first differ, as a path (`action.parameters.ratio`, `list[2]`);
/// `None` when they are equal. Used only to name the place in an error.
fn first_difference(given: &Value, read: &Value, path: String) -> Option<String> {
    match (given, read) {
        (Value::Object(a), Value::Object(b)) if a.len() == b.len() => {
            a.iter().find_map(|(key, item)| match b.get(key) {
                Some(back) => first_difference(item, back, join(&path, key)),
                None => Some(join(&path, key)),
            })
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (item, back))| first_difference(item, back, format!("{path}[{i}]"))),
        _ if given == read => None,
        _ if path.is_empty() => Some("(the whole payload)".to_owned()),
        _ => Some(path),
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// Deepest payload whose body [`reads_back_exactly`] vouches for: far below serde_json's
/// recursion limit of 128 (the body adds one level around the payload).
const MAX_CERTAIN_DEPTH: usize = 64;

/// Whether a body with this payload certainly decodes to exactly what was encoded, without
/// trying: serde_json writes strings (escaped), integers, booleans and null in a form its
/// reader returns unchanged, and floats as the shortest text that parses back to the same
/// double (ryu), which its reader with `float_roundtrip` (a feature this crate turns on)
/// parses exactly; object keys come out sorted and unique as they went in, and the other
/// fields are a string, an RFC 3339 time of a checked year with nine fractional digits, a
/// UUID and hex. What is left is nesting near the reader's limit, which goes through the
/// decode-and-compare check; that check costs as much as the rest of an append.
fn reads_back_exactly(payload: &Value) -> bool {
    let mut stack = vec![(payload, 1usize)];
    while let Some((value, depth)) = stack.pop() {
        if depth > MAX_CERTAIN_DEPTH {
            return false;
        }
        match value {
            Value::Array(items) => stack.extend(items.iter().map(|v| (v, depth + 1))),
            Value::Object(map) => stack.extend(map.values().map(|v| (v, depth + 1))),
            _ => {}
        }
    }
    true
}

/// Reads one stored value found under key `sequence` and checks everything that can be checked
/// without its neighbours: the value has a hash, the body decodes, the hash matches the body, and
/// the body is the event that belongs under this key. Returns a human-readable problem otherwise.
pub(crate) fn decode(sequence: u64, value: &[u8]) -> Result<StoredEvent, String> {
    let Some((stored_hash, body)) = value.split_first_chunk::<HASH_LEN>() else {
        return Err(format!(
            "event {sequence}: its stored value is {} bytes, too short to hold a hash \
             (truncated or overwritten after it was written)",
            value.len()
        ));
    };
    let b: BodyIn = serde_json::from_slice(body).map_err(|e| {
        format!("event {sequence}: its body cannot be read ({e}) (changed after it was written)")
    })?;
    if chain_hash(&b.prev_hash, body) != *stored_hash {
        return Err(format!(
            "event {sequence}: hash does not match its contents (changed after it was written)"
        ));
    }
    if b.sequence != sequence {
        return Err(format!(
            "event {sequence}: the event stored under this sequence number is event {} \
             (events were moved or swapped)",
            b.sequence
        ));
    }
    Ok(StoredEvent {
        sequence,
        kind: b.kind,
        time: b.time,
        actor: b.actor,
        action_id: b.action_id,
        payload: b.payload,
        prev_hash: b.prev_hash,
        hash: *stored_hash,
    })
}

/// Encodes the head record of the `meta` tree: sequence (8 bytes big-endian) then hash.
pub(crate) fn encode_head(sequence: u64, hash: &[u8; HASH_LEN]) -> [u8; 8 + HASH_LEN] {
    let mut out = [0; 8 + HASH_LEN];
    out[..8].copy_from_slice(&sequence.to_be_bytes());
    out[8..].copy_from_slice(hash);
    out
}

/// Decodes the head record; `None` when it is not exactly 40 bytes.
pub(crate) fn decode_head(value: &[u8]) -> Option<(u64, [u8; HASH_LEN])> {
    let bytes: &[u8; 8 + HASH_LEN] = value.try_into().ok()?;
    let (seq, hash) = bytes.split_first_chunk::<8>()?;
    Some((u64::from_be_bytes(*seq), hash.try_into().ok()?))
}

/// Decodes an `events` key; `None` when it is not 8 bytes, i.e. not something `append` wrote.
pub(crate) fn decode_key(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// The body's time: a fixed-width UTC form, `%Y-%m-%dT%H:%M:%S%.9fZ`, with nine fractional
/// digits, so two times never format differently for the same instant and the stored text
/// sorts like the instants it names. Written without a strftime pattern, which chrono would
/// parse again for every event (the writer formats two a check).
fn write_time<S: Serializer>(time: &&DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&time.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true))
}

fn write_hash<S: Serializer>(hash: &&[u8; HASH_LEN], s: S) -> Result<S::Ok, S::Error> {
    let mut buf = [0u8; 2 * HASH_LEN];
    hex::encode_to_slice(hash, &mut buf).map_err(serde::ser::Error::custom)?;
    s.serialize_str(std::str::from_utf8(&buf).map_err(serde::ser::Error::custom)?)
}

/// Parses straight from the input slice: replay reads a million of these at start-up.
fn read_time<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    struct Rfc3339;
    impl de::Visitor<'_> for Rfc3339 {
        type Value = DateTime<Utc>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an RFC 3339 timestamp")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .map_err(|e| E::custom(format_args!("time {s:?}: {e}")))
        }
    }
    d.deserialize_str(Rfc3339)
}

/// Lower-case hex of a hash, as written. Hand-rolled because `hex::decode_to_slice` cost a tenth
/// of a full verification on its own.
fn decode_hash_hex(s: &[u8]) -> Option<[u8; HASH_LEN]> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    let pairs: &[[u8; 2]; HASH_LEN] = s.as_chunks::<2>().0.try_into().ok()?;
    if s.len() != 2 * HASH_LEN {
        return None;
    }
    let mut out = [0; HASH_LEN];
    for (byte, [hi, lo]) in out.iter_mut().zip(pairs) {
        *byte = (nibble(*hi)? << 4) | nibble(*lo)?;
    }
    Some(out)
}

fn read_hash<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; HASH_LEN], D::Error> {
    struct Hex32;
    impl de::Visitor<'_> for Hex32 {
        type Value = [u8; HASH_LEN];
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("64 hex digits")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
            decode_hash_hex(s.as_bytes())
                .ok_or_else(|| E::custom(format_args!("prev_hash {s:?} is not 64 hex digits")))
        }
    }
    d.deserialize_str(Hex32)
}

#[cfg(test)]
mod tests {
    use chrono::{NaiveDate, TimeZone};

    use super::*;

    /// The layout documented on `write_time`, as every stored event so far has it.
    const TIME_FORMAT: &str = "%Y-%m-%dT%H:%M:%S%.9fZ";

    /// The body's time text is [`TIME_FORMAT`]'s, whatever the instant: bodies written before
    /// and after the faster formatting must be the same bytes.
    #[test]
    fn time_is_written_in_the_documented_format() {
        let mut times: Vec<DateTime<Utc>> = vec![
            Utc.with_ymd_and_hms(2025, 3, 14, 15, 9, 27).unwrap(),
            Utc.timestamp_opt(1_741_964_967, 234_567_891).unwrap(),
            Utc.timestamp_opt(1_741_964_967, 1).unwrap(),
            Utc.timestamp_opt(1_741_964_967, 100_000_000).unwrap(),
            Utc.with_ymd_and_hms(0, 1, 1, 0, 0, 0).unwrap(),
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59).unwrap(),
        ];
        // A leap second, which chrono represents with nanoseconds past 10^9.
        let leap = NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 1_500_000_000))
            .unwrap();
        times.push(Utc.from_utc_datetime(&leap));
        for time in times {
            let written = serde_json::to_value(TimeOnly { time: &time }).unwrap();
            assert_eq!(
                written["time"],
                time.format(TIME_FORMAT).to_string(),
                "{time:?}"
            );
        }
    }

    #[derive(Serialize)]
    struct TimeOnly<'a> {
        #[serde(serialize_with = "write_time")]
        time: &'a DateTime<Utc>,
    }

    /// Doubles read back bit for bit, so [`reads_back_exactly`] may vouch for them: the
    /// values an outside test found to read back as a neighbour without `float_roundtrip`,
    /// extremes, and a sweep of pseudo-random doubles of every magnitude.
    #[test]
    fn every_double_reads_back_exactly() {
        let mut doubles = vec![
            489_301.000_000_476_84,
            228_762.221_270_452_66,
            0.1,
            f64::MAX,
            f64::MIN_POSITIVE,
            5e-324,
            -2.225_073_858_507_201e-308,
        ];
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        while doubles.len() < 200_000 {
            // xorshift64*: random bit patterns cover every exponent and mantissa.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let bits = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
            let double = f64::from_bits(bits);
            if double.is_finite() {
                doubles.push(double);
                doubles.push((bits % 1_000_000_000) as f64 / 1024.0 + 0.000_000_476_84);
            }
        }
        for double in doubles {
            let event = NewEvent {
                kind: "test.float".into(),
                time: Utc.timestamp_opt(1_741_964_967, 1).unwrap(),
                actor: "tester".into(),
                action_id: None,
                payload: serde_json::json!({ "x": double }),
            };
            assert!(reads_back_exactly(&event.payload));
            let (value, _) = encode(1, event, &GENESIS_HASH).unwrap();
            let back = decode(1, &value).unwrap();
            assert_eq!(
                back.payload["x"].as_f64().map(f64::to_bits),
                Some(double.to_bits()),
                "{double:?}"
            );
        }
    }
}
