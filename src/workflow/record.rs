//! An action's current state, folded from its events.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use smallvec::{SmallVec, smallvec};
use uuid::Uuid;

use super::events::{
    ActionEvent, ActionRequested, EventSummary, Outcome, PolicyEvaluated, Verdict,
};
use super::status::ActionStatus;
use crate::domain::{ActionRequest, CallerSpan, OnBehalfOfSource, Principal};
use crate::policy::Decision;

/// An accepted vote.
#[derive(Debug, Clone, PartialEq)]
pub struct Vote {
    pub reviewer: Principal,
    pub verdict: Verdict,
    pub reason: String,
    pub time: DateTime<Utc>,
    pub sequence: u64,
}

/// The outcome the requester reported.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportedOutcome {
    pub outcome: Outcome,
    pub details: String,
    pub time: DateTime<Utc>,
}

/// Everything known about one action.
#[derive(Debug, Clone, PartialEq)]
pub struct ActionRecord {
    pub id: Uuid,
    pub requester: Principal,
    pub request: ActionRequest,
    pub action_digest: String,
    /// Who vouches for `request.task.on_behalf_of`, when it names a human.
    pub on_behalf_of_source: Option<OnBehalfOfSource>,
    pub trace_id: Option<String>,
    pub caller_span: Option<CallerSpan>,
    pub status: ActionStatus,
    /// `None` only between the request event and its evaluation, never outside the ledger.
    pub decision: Option<Decision>,
    pub votes: Vec<Vote>,
    pub outcome: Option<ReportedOutcome>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub decided_at: Option<DateTime<Utc>>,
    pub valid_until: Option<DateTime<Utc>>,
    pub first_sequence: u64,
    pub last_sequence: u64,
}

impl ActionRecord {
    pub fn approvals_required(&self) -> u32 {
        self.decision.as_ref().map_or(0, |d| d.approvals_required)
    }

    pub fn reviewer_groups(&self) -> &[String] {
        self.decision
            .as_ref()
            .map_or(&[][..], |d| d.reviewer_groups.as_slice())
    }

    pub fn approvals(&self) -> usize {
        self.votes
            .iter()
            .filter(|v| v.verdict == Verdict::Approve)
            .count()
    }

    /// Approvals still needed before the quorum is reached.
    pub fn approvals_remaining(&self) -> u32 {
        let approvals = u32::try_from(self.approvals()).unwrap_or(u32::MAX);
        self.approvals_required().saturating_sub(approvals)
    }
}

/// The event a record was folded from, with the log position it came from.
#[derive(Debug, Clone, Copy)]
pub struct EventContext {
    pub sequence: u64,
    pub time: DateTime<Utc>,
    pub action_id: Uuid,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ApplyError {
    #[error("event {sequence}: action {action_id} was requested twice")]
    DuplicateRequest { sequence: u64, action_id: Uuid },
    #[error("event {sequence}: refers to action {action_id}, which was never requested")]
    UnknownAction { sequence: u64, action_id: Uuid },
    #[error("event {sequence}: action {action_id} is held in full, so the event must be too")]
    NeedsWholeEvent { sequence: u64, action_id: Uuid },
}

/// Which listed actions ListActions wants; empty strings match anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    pub status: Option<ActionStatus>,
    pub requester_id: String,
    pub action_type: String,
}

/// How the state holds an action's record.
#[derive(Debug, Clone, Copy)]
pub enum Lookup<'a> {
    /// In full: pending, or settled recently enough to stay in memory.
    Hot(&'a ActionRecord),
    /// Only where its events are in the log, oldest first: rebuild it with
    /// [`Actions::rebuild`]. A cold action is settled once start-up has rebuilt the pending
    /// ones (it skips that only for a log that failed, when writes are refused).
    Cold(&'a [u64]),
}

/// A listed action: its record, or where to rebuild it from.
#[derive(Debug, Clone, PartialEq)]
pub enum Listed {
    Hot(Box<ActionRecord>),
    Cold { id: Uuid, sequences: Vec<u64> },
}

/// What is kept of every action. Only pending and recently settled actions keep their
/// record ("hot"); the rest keep what ListActions filters on and where their events are
/// ("cold"), about 200 bytes instead of 2.6 KB, and are rebuilt from the log when read.
#[derive(Debug, Clone)]
struct Entry {
    status: ActionStatus,
    requester_id: Arc<str>,
    action_type: Arc<str>,
    /// The log positions of the events the record is folded from, oldest first; audit-only
    /// events (refusals), which change nothing, are left out. Inline for the usual two
    /// (request and evaluation): a small allocation per action kept the pages of every
    /// dropped record from being reused.
    sequences: SmallVec<[u64; 2]>,
    record: Option<Box<ActionRecord>>,
    /// The entry's latest place in the cooling queue; older places are stale.
    ticket: u64,
}

impl Entry {
    fn is_hot_settled(&self) -> bool {
        self.record.is_some() && self.status.is_final()
    }
}

/// Entries in arrival order, in fixed-size chunks, found by id through an ordered index.
/// Keeping the entries out of the B-tree means its inserts move 24-byte slots instead of
/// 96-byte entries (start-up inserts half a million), and the entries fill their chunks
/// instead of half-full tree leaves; fixed chunks never copy the whole table as it grows.
#[derive(Debug, Default)]
struct Table {
    /// UUIDv7 ids sort by creation time, so this is also the "newest first" index.
    index: BTreeMap<Uuid, usize>,
    chunks: Vec<Vec<Entry>>,
    len: usize,
}

/// Entries per chunk: 320 KB each.
const CHUNK: usize = 4096;

impl Table {
    fn get(&self, id: &Uuid) -> Option<&Entry> {
        self.index.get(id).and_then(|&slot| self.at(slot))
    }

    fn get_mut(&mut self, id: &Uuid) -> Option<&mut Entry> {
        let slot = *self.index.get(id)?;
        self.chunks.get_mut(slot / CHUNK)?.get_mut(slot % CHUNK)
    }

    fn at(&self, slot: usize) -> Option<&Entry> {
        self.chunks.get(slot / CHUNK)?.get(slot % CHUNK)
    }

    fn contains_key(&self, id: &Uuid) -> bool {
        self.index.contains_key(id)
    }

    fn len(&self) -> usize {
        self.len
    }

    /// Replaces the entry of a known id, or appends a new one.
    fn insert(&mut self, id: Uuid, entry: Entry) {
        if let Some(old) = self.get_mut(&id) {
            *old = entry;
            return;
        }
        if self.chunks.last().is_none_or(|chunk| chunk.len() == CHUNK) {
            // Grown by doubling, not reserved whole: the writer folds every batch into a
            // scratch table of a few entries, and reserving 320 KB for each batch cost the
            // writer ~7 % of its CPU (56.3 against 52.2 µs a check, measured).
            self.chunks.push(Vec::new());
        }
        if let Some(chunk) = self.chunks.last_mut() {
            chunk.push(entry);
            self.index.insert(id, self.len);
            self.len += 1;
        }
    }

    /// A table of entries whose ids are strictly increasing (a snapshot's order): the index
    /// is built in one pass rather than by half a million inserts.
    fn from_sorted(ids: Vec<Uuid>, entries: Vec<Entry>) -> Table {
        let len = entries.len();
        let mut chunks = Vec::with_capacity(len.div_ceil(CHUNK));
        let mut entries = entries.into_iter().peekable();
        while entries.peek().is_some() {
            chunks.push(entries.by_ref().take(CHUNK).collect::<Vec<_>>());
        }
        Table {
            index: ids.into_iter().zip(0..).collect(),
            chunks,
            len,
        }
    }

    fn values(&self) -> impl Iterator<Item = &Entry> {
        self.chunks.iter().flatten()
    }

    /// Newest first, strictly older than `before` when given.
    fn newest_first(&self, before: Option<Uuid>) -> impl Iterator<Item = (&Uuid, &Entry)> {
        let upper = match before {
            Some(id) => std::ops::Bound::Excluded(id),
            None => std::ops::Bound::Unbounded,
        };
        self.index
            .range((std::ops::Bound::Unbounded, upper))
            .rev()
            .filter_map(|(id, &slot)| self.at(slot).map(|entry| (id, entry)))
    }

    fn into_entries(self) -> impl Iterator<Item = (Uuid, Entry)> {
        let mut entries: Vec<Option<Entry>> = self.chunks.into_iter().flatten().map(Some).collect();
        self.index.into_iter().filter_map(move |(id, slot)| {
            entries
                .get_mut(slot)
                .and_then(Option::take)
                .map(|e| (id, e))
        })
    }
}

/// All actions, indexed for the lookups the API needs.
///
/// Memory stays proportional to what is live: a settled record leaves memory once more
/// than `hot_limit` settled records are held (least recently settled or touched first),
/// and pending records never do, so the writer and the expiry timer decide on records in
/// memory and only reads of old actions go to the log.
#[derive(Debug)]
pub struct Actions {
    by_id: Table,
    /// SHA-256 of (requester id, idempotency key) → action: 32 bytes an entry however long
    /// the two are (up to 256 and 128 bytes), and lookups without allocating.
    by_idempotency_key: HashMap<IdempotencySlot, Uuid>,
    /// Pending actions by expiry, for the expiry timer.
    pending_by_expiry: BTreeSet<(DateTime<Utc>, Uuid)>,
    /// The sequence number of the last event folded in.
    applied_sequence: u64,
    /// Settled records kept in full at most.
    hot_limit: usize,
    /// Settled records now kept in full.
    hot_settled: usize,
    /// Settled records in the order they settled or were last touched: (ticket, id).
    cooling: VecDeque<(u64, Uuid)>,
    next_ticket: u64,
    /// Requester ids and action types, each held once: millions of entries share a few.
    names: HashSet<Arc<str>>,
}

impl Default for Actions {
    /// Every record stays in memory: for scratch states and tests.
    fn default() -> Self {
        Actions::with_hot_limit(usize::MAX)
    }
}

impl Actions {
    /// A state that keeps at most `hot_limit` settled records in full.
    pub fn with_hot_limit(hot_limit: usize) -> Actions {
        Actions {
            by_id: Table::default(),
            by_idempotency_key: HashMap::new(),
            pending_by_expiry: BTreeSet::new(),
            applied_sequence: 0,
            hot_limit,
            hot_settled: 0,
            cooling: VecDeque::new(),
            next_ticket: 0,
            names: HashSet::new(),
        }
    }

    /// The record if it is held in full. `None` also for a cold action: use
    /// [`Actions::lookup`] where those matter.
    pub fn hot(&self, id: &Uuid) -> Option<&ActionRecord> {
        self.by_id.get(id).and_then(|entry| entry.record.as_deref())
    }

    pub fn lookup(&self, id: &Uuid) -> Option<Lookup<'_>> {
        self.by_id.get(id).map(|entry| match &entry.record {
            Some(record) => Lookup::Hot(record),
            None => Lookup::Cold(&entry.sequences),
        })
    }

    pub fn contains(&self, id: &Uuid) -> bool {
        self.by_id.contains_key(id)
    }

    /// Who requested the action, hot or cold.
    pub fn requester_of(&self, id: &Uuid) -> Option<&str> {
        self.by_id.get(id).map(|entry| &*entry.requester_id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.len() == 0
    }

    /// How many records are held in full (pending ones included).
    pub fn hot_count(&self) -> usize {
        self.hot_settled + self.pending_by_expiry.len()
    }

    /// The log position this state reflects.
    pub fn applied_sequence(&self) -> u64 {
        self.applied_sequence
    }

    /// The action a requester's idempotency key names, hot or cold.
    pub fn by_idempotency_key(&self, requester_id: &str, key: &str) -> Option<Uuid> {
        self.by_idempotency_key
            .get(&IdempotencySlot::of(requester_id, key))
            .copied()
    }

    /// How many actions wait for reviewers.
    pub fn pending_count(&self) -> usize {
        self.pending_by_expiry.len()
    }

    /// The pending action that expires first.
    pub fn next_expiry(&self) -> Option<(DateTime<Utc>, Uuid)> {
        self.pending_by_expiry.first().copied()
    }

    /// Pending actions whose expiry is at or before `now`.
    pub fn due_for_expiry(&self, now: DateTime<Utc>) -> Vec<Uuid> {
        self.pending_by_expiry
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, id)| *id)
            .collect()
    }

    /// Pending records; always held in full.
    pub fn pending(&self) -> impl Iterator<Item = &ActionRecord> {
        self.pending_by_expiry
            .iter()
            .filter_map(|(_, id)| self.hot(id))
    }

    /// Up to `limit` actions that match `filter`, newest first, strictly older than
    /// `before` when given; and whether more match beyond them.
    pub fn list(
        &self,
        filter: &ListFilter,
        before: Option<Uuid>,
        limit: usize,
    ) -> (Vec<Listed>, bool) {
        let mut matching = self.by_id.newest_first(before).filter(|(_, entry)| {
            filter.status.is_none_or(|s| entry.status == s)
                && (filter.requester_id.is_empty() || *entry.requester_id == *filter.requester_id)
                && (filter.action_type.is_empty() || *entry.action_type == *filter.action_type)
        });
        let page: Vec<Listed> = matching
            .by_ref()
            .take(limit)
            .map(|(id, entry)| match &entry.record {
                Some(record) => Listed::Hot(record.clone()),
                None => Listed::Cold {
                    id: *id,
                    sequences: entry.sequences.to_vec(),
                },
            })
            .collect();
        (page, matching.next().is_some())
    }

    pub fn count_with_status(&self, status: ActionStatus) -> usize {
        if status == ActionStatus::Pending {
            return self.pending_by_expiry.len();
        }
        self.by_id.values().filter(|e| e.status == status).count()
    }

    /// Rebuilds one action's record from its events, given in log order with the request
    /// first (as [`Lookup::Cold`] lists them).
    pub fn rebuild(
        id: Uuid,
        events: impl IntoIterator<Item = (EventContext, ActionEvent)>,
    ) -> Result<ActionRecord, ApplyError> {
        let mut one = Actions::default();
        for (at, event) in events {
            one.apply_owned(at, event)?;
        }
        one.by_id
            .get_mut(&id)
            .and_then(|entry| entry.record.take())
            .map(|record| *record)
            .ok_or(ApplyError::UnknownAction {
                sequence: one.applied_sequence,
                action_id: id,
            })
    }

    /// Folds one event into the state. Events must come in log order.
    pub fn apply(&mut self, at: EventContext, event: &ActionEvent) -> Result<(), ApplyError> {
        if let ActionEvent::Requested(requested) = event {
            self.apply_requested(at, requested)?;
        } else {
            let entry = self
                .by_id
                .get_mut(&at.action_id)
                .ok_or(ApplyError::UnknownAction {
                    sequence: at.sequence,
                    action_id: at.action_id,
                })?;
            let was_hot_settled = entry.is_hot_settled();
            if !event.is_audit_only() {
                entry.sequences.push(at.sequence);
            }
            match entry.record.as_deref_mut() {
                Some(record) => {
                    let was_pending =
                        record.status == ActionStatus::Pending && record.expires_at.is_some();
                    let old_expiry = record.expires_at;
                    apply_to_record(record, at, event);
                    entry.status = record.status;
                    let is_pending =
                        record.status == ActionStatus::Pending && record.expires_at.is_some();
                    if was_pending && let Some(expiry) = old_expiry {
                        self.pending_by_expiry.remove(&(expiry, at.action_id));
                    }
                    if is_pending && let Some(expiry) = record.expires_at {
                        self.pending_by_expiry.insert((expiry, at.action_id));
                    }
                }
                // Cold: settled, or pending but not yet rebuilt at start-up (restored from a
                // checkpoint or folded from summaries). Only its listing status follows the
                // event; the record is rebuilt from its sequences when read.
                None => {
                    if let Some(status) = event.status_after() {
                        entry.status = status;
                    }
                }
            }
            self.settled_touched(at.action_id, was_hot_settled);
        }
        self.applied_sequence = self.applied_sequence.max(at.sequence);
        Ok(())
    }

    /// [`Actions::apply`] taking the event by value: a request and a decision are moved into
    /// the record rather than copied (start-up replay folds a million of them).
    pub fn apply_owned(&mut self, at: EventContext, event: ActionEvent) -> Result<(), ApplyError> {
        match event {
            ActionEvent::Requested(requested) => {
                self.insert_requested(at, *requested)?;
                self.applied_sequence = self.applied_sequence.max(at.sequence);
                Ok(())
            }
            ActionEvent::Evaluated(evaluated) => {
                let entry = self.by_id.get_mut(&at.action_id);
                match entry {
                    // A fresh request (the usual case): nothing is pending in the index yet.
                    Some(Entry {
                        record: Some(record),
                        status,
                        sequences,
                        ..
                    }) if record.decision.is_none() && record.expires_at.is_none() => {
                        let evaluated = *evaluated;
                        record.status = evaluated.status;
                        record.expires_at = evaluated.expires_at;
                        record.valid_until = evaluated.valid_until;
                        if evaluated.status.is_final() {
                            record.decided_at = Some(at.time);
                        }
                        record.decision = Some(evaluated.decision);
                        record.last_sequence = at.sequence;
                        *status = record.status;
                        sequences.push(at.sequence);
                        if record.status == ActionStatus::Pending
                            && let Some(expiry) = record.expires_at
                        {
                            self.pending_by_expiry.insert((expiry, at.action_id));
                        }
                        self.settled_touched(at.action_id, false);
                        self.applied_sequence = self.applied_sequence.max(at.sequence);
                        Ok(())
                    }
                    _ => self.apply(at, &ActionEvent::Evaluated(evaluated)),
                }
            }
            other => self.apply(at, &other),
        }
    }

    fn apply_requested(
        &mut self,
        at: EventContext,
        requested: &ActionRequested,
    ) -> Result<(), ApplyError> {
        if self.by_id.contains_key(&at.action_id) {
            return Err(ApplyError::DuplicateRequest {
                sequence: at.sequence,
                action_id: at.action_id,
            });
        }
        self.insert_requested(at, requested.clone())
    }

    fn insert_requested(
        &mut self,
        at: EventContext,
        requested: ActionRequested,
    ) -> Result<(), ApplyError> {
        let mut entry = self.new_entry(
            at,
            &requested.requester.id,
            &requested.request.action.action_type,
            &requested.request.idempotency_key,
        )?;
        let record = ActionRecord {
            id: at.action_id,
            requester: requested.requester,
            request: requested.request,
            action_digest: requested.action_digest,
            on_behalf_of_source: requested.on_behalf_of_source,
            trace_id: requested.trace_id,
            caller_span: requested.caller_span,
            // Until the evaluation is applied; both are appended atomically.
            status: ActionStatus::Pending,
            decision: None,
            votes: Vec::new(),
            outcome: None,
            created_at: at.time,
            expires_at: None,
            decided_at: None,
            valid_until: None,
            first_sequence: at.sequence,
            last_sequence: at.sequence,
        };
        entry.record = Some(Box::new(record));
        self.by_id.insert(at.action_id, entry);
        Ok(())
    }

    /// The entry of a newly requested action (pending until its evaluation is applied,
    /// no record yet), its idempotency key indexed; the caller inserts it.
    fn new_entry(
        &mut self,
        at: EventContext,
        requester_id: &str,
        action_type: &str,
        idempotency_key: &str,
    ) -> Result<Entry, ApplyError> {
        if self.by_id.contains_key(&at.action_id) {
            return Err(ApplyError::DuplicateRequest {
                sequence: at.sequence,
                action_id: at.action_id,
            });
        }
        if !idempotency_key.is_empty() {
            self.by_idempotency_key.insert(
                IdempotencySlot::of(requester_id, idempotency_key),
                at.action_id,
            );
        }
        Ok(Entry {
            status: ActionStatus::Pending,
            requester_id: intern(&mut self.names, requester_id),
            action_type: intern(&mut self.names, action_type),
            sequences: smallvec![at.sequence],
            record: None,
            ticket: 0,
        })
    }

    /// Folds an event known only by its summary into a cold entry (start-up, for events
    /// of actions that will not stay in memory). An action requested this way has no
    /// record: if it is still pending once the log is read, rebuild it and
    /// [`Actions::insert_loaded`] it (see [`Actions::cold_pending`]).
    pub fn apply_summary(
        &mut self,
        at: EventContext,
        summary: EventSummary,
    ) -> Result<(), ApplyError> {
        match summary {
            EventSummary::Requested {
                requester_id,
                action_type,
                idempotency_key,
            } => {
                let entry = self.new_entry(at, &requester_id, &action_type, &idempotency_key)?;
                self.by_id.insert(at.action_id, entry);
            }
            EventSummary::Other {
                status_after,
                audit_only,
            } => {
                let entry = match self.by_id.get_mut(&at.action_id) {
                    Some(entry) if entry.record.is_none() => entry,
                    // A held record must see the whole event.
                    Some(_) => {
                        return Err(ApplyError::NeedsWholeEvent {
                            sequence: at.sequence,
                            action_id: at.action_id,
                        });
                    }
                    None => {
                        return Err(ApplyError::UnknownAction {
                            sequence: at.sequence,
                            action_id: at.action_id,
                        });
                    }
                };
                if !audit_only {
                    entry.sequences.push(at.sequence);
                }
                if let Some(status) = status_after {
                    entry.status = status;
                }
            }
        }
        self.applied_sequence = self.applied_sequence.max(at.sequence);
        Ok(())
    }

    /// Pending actions without their record (folded from summaries), with the sequences to
    /// rebuild them from.
    pub fn cold_pending(&self) -> Vec<(Uuid, Vec<u64>)> {
        self.by_id
            .newest_first(None)
            .filter(|(_, entry)| entry.status == ActionStatus::Pending && entry.record.is_none())
            .map(|(id, entry)| (*id, entry.sequences.to_vec()))
            .collect()
    }

    /// The log positions of every pending action's events, in order: what a checkpoint keeps
    /// verbatim so they need not be read from the log at start-up.
    pub fn pending_sequences(&self) -> Vec<u64> {
        let mut sequences: Vec<u64> = self
            .by_id
            .values()
            .filter(|entry| entry.status == ActionStatus::Pending)
            .flat_map(|entry| entry.sequences.iter().copied())
            .collect();
        sequences.sort_unstable();
        sequences
    }

    /// Moves the position past an event that is not about any action (an access denial, a
    /// policy reload), so followers of the log see it as visible too.
    pub fn pass_over(&mut self, sequence: u64) {
        self.applied_sequence = self.applied_sequence.max(sequence);
    }

    /// Replaces (or inserts) whole entries; used to publish a committed batch at once.
    /// Records beyond the hot limit stay in memory until [`Actions::cool`].
    pub fn merge(&mut self, other: Actions) {
        for (id, mut entry) in other.by_id.into_entries() {
            let mut was_hot_settled = false;
            if let Some(old) = self.by_id.get(&id) {
                was_hot_settled = old.is_hot_settled();
                if let Some(expiry) = old.record.as_ref().and_then(|r| r.expires_at) {
                    self.pending_by_expiry.remove(&(expiry, id));
                }
            }
            if let Some(record) = &entry.record
                && record.status == ActionStatus::Pending
                && let Some(expiry) = record.expires_at
            {
                self.pending_by_expiry.insert((expiry, id));
            }
            entry.requester_id = intern(&mut self.names, &entry.requester_id);
            entry.action_type = intern(&mut self.names, &entry.action_type);
            self.by_id.insert(id, entry);
            self.settled_touched(id, was_hot_settled);
        }
        self.by_idempotency_key.extend(other.by_idempotency_key);
        self.applied_sequence = self.applied_sequence.max(other.applied_sequence);
    }

    /// Copies one action into a scratch state, so a batch can be folded on the side.
    /// Returns false for an unknown or cold action (load it, then [`Actions::insert_loaded`]).
    pub fn copy_hot_from(&mut self, source: &Actions, id: &Uuid) -> bool {
        let Some(entry) = source.by_id.get(id).filter(|e| e.record.is_some()) else {
            return false;
        };
        if let Some(record) = &entry.record
            && record.status == ActionStatus::Pending
            && let Some(expiry) = record.expires_at
        {
            self.pending_by_expiry.insert((expiry, *id));
        }
        let was_hot_settled = self.by_id.get(id).is_some_and(Entry::is_hot_settled);
        self.by_id.insert(*id, entry.clone());
        self.settled_touched(*id, was_hot_settled);
        true
    }

    /// Puts a cold action's rebuilt record into the state (a scratch state, or the state
    /// being replayed); `sequences` are the ones its cold entry listed.
    pub fn insert_loaded(&mut self, record: ActionRecord, sequences: Vec<u64>) {
        let id = record.id;
        let was_hot_settled = self.by_id.get(&id).is_some_and(Entry::is_hot_settled);
        if record.status == ActionStatus::Pending
            && let Some(expiry) = record.expires_at
        {
            self.pending_by_expiry.insert((expiry, id));
        }
        let entry = Entry {
            status: record.status,
            requester_id: intern(&mut self.names, &record.requester.id),
            action_type: intern(&mut self.names, &record.request.action.action_type),
            sequences: SmallVec::from_vec(sequences),
            record: Some(Box::new(record)),
            ticket: 0,
        };
        self.by_id.insert(id, entry);
        self.settled_touched(id, was_hot_settled);
    }

    /// Lets settled records beyond the hot limit leave memory, least recently settled or
    /// touched first. Cheap when nothing is over. Returns the records that left, so the
    /// caller can drop them after letting go of the state's lock.
    pub fn cool(&mut self) -> Vec<Box<ActionRecord>> {
        let mut cooled = Vec::new();
        while self.hot_settled > self.hot_limit {
            let Some((ticket, id)) = self.cooling.pop_front() else {
                break;
            };
            if let Some(entry) = self.by_id.get_mut(&id)
                && entry.ticket == ticket
                && entry.is_hot_settled()
                && let Some(record) = entry.record.take()
            {
                cooled.push(record);
                entry.sequences.shrink_to_fit();
                self.hot_settled -= 1;
            }
        }
        cooled
    }

    /// Keeps the hot-settled count and the cooling order right after `id`'s entry changed.
    fn settled_touched(&mut self, id: Uuid, was_hot_settled: bool) {
        let Some(entry) = self.by_id.get_mut(&id) else {
            return;
        };
        let is_hot_settled = entry.is_hot_settled();
        match (was_hot_settled, is_hot_settled) {
            (false, true) => self.hot_settled += 1,
            (true, false) => self.hot_settled -= 1,
            _ => {}
        }
        if is_hot_settled && self.hot_limit != usize::MAX {
            self.next_ticket += 1;
            entry.ticket = self.next_ticket;
            self.cooling.push_back((self.next_ticket, id));
        }
    }
}

/// What a checkpoint keeps of the state: every action's entry (status, names, where its
/// events are), the idempotency index and the position; no record. Restored with
/// [`Actions::restore`], every action is cold: the ledger then rebuilds the pending ones
/// from their events (a checkpoint keeps a copy of them), as after a replay from summaries.
///
/// Field order is the stored format (see `ledger::checkpoint`): change it only with a new
/// format version there.
#[derive(Serialize)]
pub struct SnapshotOf<'a> {
    applied_sequence: u64,
    names: Vec<&'a str>,
    entries: SnapshotEntries<'a>,
    idempotency: SnapshotKeys<'a>,
}

/// [`SnapshotOf`] as read back.
#[derive(Debug, Deserialize)]
pub struct Snapshot {
    applied_sequence: u64,
    names: Vec<String>,
    entries: Vec<SnapshotEntry>,
    idempotency: Vec<([u8; 32], Uuid)>,
}

/// One entry as a snapshot stores it: names as indexes into the snapshot's names.
#[derive(Debug, Serialize, Deserialize)]
struct SnapshotEntry<S = SmallVec<[u64; 2]>> {
    id: Uuid,
    status: ActionStatus,
    requester: u32,
    action_type: u32,
    sequences: S,
}

/// The entries in id order, written straight from the table (no copy of the state).
struct SnapshotEntries<'a> {
    table: &'a Table,
    name_index: HashMap<&'a str, u32>,
}

impl Serialize for SnapshotEntries<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeSeq};
        let index_of = |name: &str| {
            self.name_index
                .get(name)
                .copied()
                .ok_or_else(|| S::Error::custom(format!("name {name:?} is not interned")))
        };
        let mut seq = serializer.serialize_seq(Some(self.table.index.len()))?;
        for (id, &slot) in &self.table.index {
            let entry = self
                .table
                .at(slot)
                .ok_or_else(|| S::Error::custom(format!("action {id} has no entry")))?;
            seq.serialize_element(&SnapshotEntry {
                id: *id,
                status: entry.status,
                requester: index_of(&entry.requester_id)?,
                action_type: index_of(&entry.action_type)?,
                sequences: &entry.sequences[..],
            })?;
        }
        seq.end()
    }
}

/// The idempotency index as `(key hash, action)` pairs, written straight from the map: a
/// collected copy would be fresh memory, faulted in while the state's lock is held.
struct SnapshotKeys<'a>(&'a HashMap<IdempotencySlot, Uuid>);

impl Serialize for SnapshotKeys<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|(slot, id)| (&slot.0, id)))
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RestoreError {
    #[error("action {0} is listed twice")]
    DuplicateAction(Uuid),
    #[error("action {0} is listed out of order")]
    OutOfOrder(Uuid),
    #[error("action {id} names entry {index} of {names} names")]
    UnknownName { id: Uuid, index: u32, names: usize },
    #[error("action {id} lists events {sequences:?}, which are not in order up to event {applied}")]
    BadSequences {
        id: Uuid,
        sequences: Vec<u64>,
        applied: u64,
    },
    #[error("an idempotency key names action {0}, which is not listed")]
    UnknownIdempotentAction(Uuid),
}

impl Actions {
    /// What a checkpoint keeps of this state (see [`SnapshotOf`]). Serializing it reads the
    /// state, so hold the lock that guards it meanwhile.
    pub fn snapshot(&self) -> SnapshotOf<'_> {
        let names: Vec<&str> = self.names.iter().map(|name| &**name).collect();
        let name_index = (0u32..)
            .zip(names.iter().copied())
            .map(|(i, n)| (n, i))
            .collect();
        SnapshotOf {
            applied_sequence: self.applied_sequence,
            names,
            entries: SnapshotEntries {
                table: &self.by_id,
                name_index,
            },
            idempotency: SnapshotKeys(&self.by_idempotency_key),
        }
    }

    /// The state a snapshot was taken of, every action cold (see [`Actions::cold_pending`]
    /// for the pending ones to rebuild). Checks what could make later folds go wrong; the
    /// snapshot's integrity itself is the caller's to check.
    pub fn restore(snapshot: Snapshot, hot_limit: usize) -> Result<Actions, RestoreError> {
        let mut actions = Actions::with_hot_limit(hot_limit);
        actions.applied_sequence = snapshot.applied_sequence;
        let names: Vec<Arc<str>> = snapshot
            .names
            .into_iter()
            .map(|name| intern(&mut actions.names, &name))
            .collect();
        let name = |id: Uuid, index: u32| {
            names
                .get(index as usize)
                .cloned()
                .ok_or(RestoreError::UnknownName {
                    id,
                    index,
                    names: names.len(),
                })
        };
        let mut ids = Vec::with_capacity(snapshot.entries.len());
        let mut entries = Vec::with_capacity(snapshot.entries.len());
        for entry in snapshot.entries {
            let in_order = entry.sequences.windows(2).all(|w| w[0] < w[1])
                && entry
                    .sequences
                    .last()
                    .is_some_and(|&last| last <= snapshot.applied_sequence)
                && entry.sequences.first().is_some_and(|&first| first > 0);
            if !in_order {
                return Err(RestoreError::BadSequences {
                    id: entry.id,
                    sequences: entry.sequences.to_vec(),
                    applied: snapshot.applied_sequence,
                });
            }
            match ids.last() {
                Some(last) if *last == entry.id => {
                    return Err(RestoreError::DuplicateAction(entry.id));
                }
                Some(last) if *last > entry.id => return Err(RestoreError::OutOfOrder(entry.id)),
                _ => {}
            }
            ids.push(entry.id);
            entries.push(Entry {
                status: entry.status,
                requester_id: name(entry.id, entry.requester)?,
                action_type: name(entry.id, entry.action_type)?,
                sequences: entry.sequences,
                record: None,
                ticket: 0,
            });
        }
        actions.by_id = Table::from_sorted(ids, entries);
        actions
            .by_idempotency_key
            .reserve(snapshot.idempotency.len());
        for (slot, id) in snapshot.idempotency {
            if !actions.by_id.contains_key(&id) {
                return Err(RestoreError::UnknownIdempotentAction(id));
            }
            actions.by_idempotency_key.insert(IdempotencySlot(slot), id);
        }
        Ok(actions)
    }
}

/// Where an idempotency key is indexed: the SHA-256 of the requester id and the key, each
/// length-prefixed so no two pairs share an encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct IdempotencySlot([u8; 32]);

impl IdempotencySlot {
    fn of(requester_id: &str, key: &str) -> IdempotencySlot {
        use sha2::{Digest, Sha256};
        let mut hasher = Sha256::new();
        for part in [requester_id, key] {
            hasher.update((part.len() as u64).to_be_bytes());
            hasher.update(part.as_bytes());
        }
        IdempotencySlot(hasher.finalize().into())
    }
}

/// The shared copy of `name`, added if new.
fn intern(names: &mut HashSet<Arc<str>>, name: &str) -> Arc<str> {
    if let Some(held) = names.get(name) {
        return held.clone();
    }
    let held: Arc<str> = Arc::from(name);
    names.insert(held.clone());
    held
}

fn apply_to_record(record: &mut ActionRecord, at: EventContext, event: &ActionEvent) {
    let finish = |record: &mut ActionRecord, status: ActionStatus| {
        record.status = status;
        record.decided_at = Some(at.time);
    };
    match event {
        ActionEvent::Requested(_) => {}
        ActionEvent::Evaluated(evaluated) => apply_evaluated(record, at, evaluated),
        ActionEvent::Voted(vote) => record.votes.push(Vote {
            reviewer: vote.reviewer.clone(),
            verdict: vote.verdict,
            reason: vote.reason.clone(),
            time: at.time,
            sequence: at.sequence,
        }),
        ActionEvent::Approved(approved) => {
            finish(record, ActionStatus::Approved);
            record.valid_until = Some(approved.valid_until);
        }
        ActionEvent::Rejected(_) => finish(record, ActionStatus::Rejected),
        ActionEvent::Expired(_) => finish(record, ActionStatus::Expired),
        ActionEvent::Cancelled(_) => finish(record, ActionStatus::Cancelled),
        ActionEvent::OutcomeReported(reported) => {
            record.outcome = Some(ReportedOutcome {
                outcome: reported.outcome,
                details: reported.details.clone(),
                time: at.time,
            });
        }
        // Audit-only: recorded in the log, no change to the action.
        ActionEvent::ReviewRefused(_) | ActionEvent::OutcomeRefused(_) => return,
    }
    record.last_sequence = at.sequence;
}

fn apply_evaluated(record: &mut ActionRecord, at: EventContext, evaluated: &PolicyEvaluated) {
    record.status = evaluated.status;
    record.decision = Some(evaluated.decision.clone());
    record.expires_at = evaluated.expires_at;
    record.valid_until = evaluated.valid_until;
    if evaluated.status.is_final() {
        record.decided_at = Some(at.time);
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::domain::{ActionSpec, Effect, PrincipalKind, RiskLevel, TaskContext};
    use crate::workflow::events::{ActionApproved, OutcomeRefused, OutcomeReported, ReviewVoted};
    use crate::workflow::{Outcome, ReviewRefused};

    fn at(seconds: u64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + seconds as i64, 0)
            .single()
            .unwrap()
    }

    fn principal(id: &str, kind: PrincipalKind) -> Principal {
        Principal {
            id: id.into(),
            kind,
            groups: vec!["sre".into()],
            authenticated_by: "test".into(),
        }
    }

    /// The two events of a new action, allowed or pending.
    fn check(status: ActionStatus, requester: &str, action_type: &str) -> [ActionEvent; 2] {
        let requested = ActionEvent::Requested(Box::new(ActionRequested {
            requester: principal(requester, PrincipalKind::Agent),
            request: ActionRequest {
                action: ActionSpec {
                    action_type: action_type.into(),
                    resource: "db-1".into(),
                    environment: "production".into(),
                    parameters: serde_json::Map::from_iter([("size".into(), 3.into())]),
                    purpose: "because".into(),
                },
                task: TaskContext::default(),
                idempotency_key: format!("key-of-{requester}-{action_type}"),
            },
            action_digest: "d".repeat(64),
            on_behalf_of_source: None,
            trace_id: Some("t".into()),
            caller_span: None,
        }));
        let pending = status == ActionStatus::Pending;
        let evaluated = ActionEvent::Evaluated(Box::new(PolicyEvaluated {
            decision: Decision {
                effect: if pending {
                    Effect::RequireApproval
                } else {
                    Effect::Allow
                },
                risk: RiskLevel::High,
                approvals_required: u32::from(pending),
                reviewer_groups: vec![],
                ttl_seconds: None,
                matched_rules: vec![],
                errors: vec![],
                defaulted: false,
                policy_version: "v1".into(),
            },
            status,
            expires_at: pending.then(|| at(100_000)),
            valid_until: (!pending).then(|| at(900)),
        }));
        [requested, evaluated]
    }

    /// Folds events into `actions` with consecutive sequences from `next`, keeping the log.
    struct Log {
        next: u64,
        events: Vec<(EventContext, ActionEvent)>,
    }

    impl Log {
        fn new() -> Log {
            Log {
                next: 1,
                events: Vec::new(),
            }
        }

        fn append(&mut self, actions: &mut Actions, id: Uuid, events: Vec<ActionEvent>) {
            for event in events {
                let context = EventContext {
                    sequence: self.next,
                    time: at(self.next),
                    action_id: id,
                };
                actions.apply(context, &event).unwrap();
                self.events.push((context, event));
                self.next += 1;
            }
            actions.cool();
        }

        fn of(&self, id: Uuid) -> Vec<(EventContext, ActionEvent)> {
            self.events
                .iter()
                .filter(|(context, _)| context.action_id == id)
                .cloned()
                .collect()
        }
    }

    fn cold_sequences(actions: &Actions, id: &Uuid) -> Option<Vec<u64>> {
        match actions.lookup(id) {
            Some(Lookup::Cold(sequences)) => Some(sequences.to_vec()),
            _ => None,
        }
    }

    #[test]
    fn settled_records_beyond_the_limit_leave_memory_and_pending_ones_stay() {
        let mut actions = Actions::with_hot_limit(2);
        let mut log = Log::new();
        let pending = Uuid::now_v7();
        log.append(
            &mut actions,
            pending,
            check(ActionStatus::Pending, "agent-p", "iam.role.grant").into(),
        );
        let allowed: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
        for (n, id) in allowed.iter().enumerate() {
            let requester = format!("agent-{}", n % 2);
            log.append(
                &mut actions,
                *id,
                check(ActionStatus::Allowed, &requester, "deploy.apply").into(),
            );
        }

        assert_eq!(actions.len(), 6);
        assert_eq!(actions.hot_count(), 3, "two settled and the pending one");
        assert!(actions.hot(&pending).is_some());
        for id in &allowed[..3] {
            let sequences = cold_sequences(&actions, id).expect("the oldest settled are cold");
            assert_eq!(sequences.len(), 2);
        }
        for id in &allowed[3..] {
            assert!(actions.hot(id).is_some(), "the newest settled stay");
        }
        // What ListActions filters on and what counts are still there for cold ones.
        assert_eq!(actions.count_with_status(ActionStatus::Allowed), 5);
        assert_eq!(actions.requester_of(&allowed[0]), Some("agent-0"));
        let filter = ListFilter {
            status: Some(ActionStatus::Allowed),
            requester_id: "agent-0".into(),
            action_type: "deploy.apply".into(),
        };
        let (page, more) = actions.list(&filter, None, 2);
        assert!(more);
        assert_eq!(page.len(), 2);
        assert!(matches!(&page[0], Listed::Hot(r) if r.id == allowed[4]));
        assert!(matches!(&page[1], Listed::Cold { id, .. } if *id == allowed[2]));
        let (rest, more) = actions.list(&filter, Some(allowed[2]), 10);
        assert!(!more);
        assert!(matches!(&rest[..], [Listed::Cold { id, .. }] if *id == allowed[0]));
        assert_eq!(
            actions.by_idempotency_key("agent-0", "key-of-agent-0-deploy.apply"),
            Some(allowed[4])
        );
    }

    #[test]
    fn a_cold_record_rebuilds_exactly_from_its_events() {
        let (mut all_hot, mut all_hot_log) = (Actions::default(), Log::new());
        let (mut none_hot, mut none_hot_log) = (Actions::with_hot_limit(0), Log::new());
        let id = Uuid::now_v7();
        let reviewer = principal("rev", PrincipalKind::Human);
        let mut history: Vec<Vec<ActionEvent>> = vec![
            check(ActionStatus::Pending, "agent-1", "iam.role.grant").into(),
            vec![ActionEvent::Voted(ReviewVoted {
                reviewer: reviewer.clone(),
                verdict: Verdict::Approve,
                reason: "looks right".into(),
            })],
            vec![ActionEvent::Approved(ActionApproved {
                valid_until: at(5_000),
                approved_by: vec!["rev".into()],
            })],
        ];
        // After it went cold: an audit-only refusal and an outcome.
        history.push(vec![ActionEvent::ReviewRefused(ReviewRefused {
            reviewer,
            verdict: Verdict::Approve,
            reason: "late".into(),
            reason_cut: None,
            refusal: "already approved".into(),
            repeats: None,
        })]);
        history.push(vec![ActionEvent::OutcomeReported(OutcomeReported {
            outcome: Outcome::Executed,
            details: "done".into(),
        })]);
        history.push(vec![ActionEvent::OutcomeRefused(OutcomeRefused {
            reporter: "agent-1".into(),
            outcome: Outcome::Failed,
            details: "again".into(),
            details_cut: None,
            refusal: "already reported".into(),
            repeats: None,
        })]);
        for events in history {
            all_hot_log.append(&mut all_hot, id, events.clone());
            none_hot_log.append(&mut none_hot, id, events);
        }

        let expected = all_hot.hot(&id).unwrap().clone();
        assert_eq!(expected.status, ActionStatus::Approved);
        assert!(expected.outcome.is_some());
        let sequences = cold_sequences(&none_hot, &id).expect("settled and over a limit of 0");
        assert_eq!(
            sequences,
            vec![1, 2, 3, 4, 6],
            "refusals are not needed to rebuild"
        );
        let events = none_hot_log
            .of(id)
            .into_iter()
            .filter(|(context, _)| sequences.contains(&context.sequence));
        assert_eq!(Actions::rebuild(id, events).unwrap(), expected);
        assert_eq!(none_hot.hot_count(), 0);
        assert_eq!(none_hot.applied_sequence(), 7);
    }

    /// The snapshot's bytes are checkpoint format 1: a state encoded today must read as the
    /// same bytes a checkpoint written by earlier versions holds.
    #[test]
    fn snapshot_bytes_are_checkpoint_format_1() {
        let mut actions = Actions::with_hot_limit(0);
        let mut log = Log::new();
        let allowed = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);
        let pending = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0002);
        log.append(
            &mut actions,
            allowed,
            check(ActionStatus::Allowed, "x", "x").into(),
        );
        log.append(
            &mut actions,
            pending,
            check(ActionStatus::Pending, "y", "y").into(),
        );
        let bytes = postcard::to_stdvec(&actions.snapshot()).unwrap();
        let names = ["x", "y"].map(|n| {
            let mut name = vec![1u8];
            name.extend(n.as_bytes());
            name
        });
        // The names' order is the interning set's; either order is format 1.
        let (first, second, x, y) = if bytes.get(3) == Some(&b'x') {
            (&names[0], &names[1], 0u8, 1u8)
        } else {
            (&names[1], &names[0], 1, 0)
        };
        let uuid = |id: Uuid| [&[16u8][..], id.as_bytes()].concat();
        // Varints: the position, the two names, then each entry: its id, status (Allowed 0,
        // Pending 2), requester and type (indexes into the names) and its sequences.
        let mut expected = vec![4u8, 2];
        expected.extend(first);
        expected.extend(second);
        expected.push(2);
        expected.extend(uuid(allowed));
        expected.extend([0, x, x, 2, 1, 2]);
        expected.extend(uuid(pending));
        expected.extend([2, y, y, 2, 3, 4]);
        assert_eq!(
            bytes.get(..expected.len()),
            Some(&expected[..]),
            "{bytes:?}"
        );
        // Then the idempotency index in its (hash) order, compared as a set: 32 bytes of key
        // hash, then the action.
        let rest = &bytes[expected.len()..];
        assert_eq!(rest.first(), Some(&2));
        assert_eq!(rest.len(), 1 + 2 * (32 + 17));
        let mut keys: Vec<&[u8]> = rest[1..].chunks(49).map(|c| &c[32..]).collect();
        keys.sort();
        assert_eq!(keys, [uuid(allowed), uuid(pending)]);
    }

    #[test]
    fn thousands_of_actions_span_chunks_and_list_newest_first() {
        let mut actions = Actions::with_hot_limit(10);
        let mut log = Log::new();
        let ids: Vec<Uuid> = (0..CHUNK + 904).map(|_| Uuid::now_v7()).collect();
        for id in &ids {
            log.append(
                &mut actions,
                *id,
                check(ActionStatus::Allowed, "agent-1", "deploy.apply").into(),
            );
        }
        assert_eq!(actions.len(), ids.len());
        assert_eq!(actions.hot_count(), 10);
        let (page, more) = actions.list(&ListFilter::default(), Some(ids[CHUNK + 1]), 3);
        assert!(more);
        let listed: Vec<Uuid> = page
            .iter()
            .map(|listed| match listed {
                Listed::Hot(record) => record.id,
                Listed::Cold { id, .. } => *id,
            })
            .collect();
        assert_eq!(listed, vec![ids[CHUNK], ids[CHUNK - 1], ids[CHUNK - 2]]);
        for id in [ids[0], ids[CHUNK - 1], ids[CHUNK], ids[ids.len() - 1]] {
            assert_eq!(actions.requester_of(&id), Some("agent-1"));
        }
        // Merging a scratch state replaces entries in place, across chunks.
        let mut scratch = Actions::default();
        let last = ids[ids.len() - 1];
        assert!(scratch.copy_hot_from(&actions, &last));
        // A scratch state is made for every batch: it must not reserve a whole chunk.
        let reserved: usize = scratch.by_id.chunks.iter().map(Vec::capacity).sum();
        assert!(
            reserved < 16,
            "a one-entry scratch table reserved {reserved} entries"
        );
        // Filled chunks end at exactly CHUNK entries however they grew.
        assert!(
            actions
                .by_id
                .chunks
                .iter()
                .rev()
                .skip(1)
                .all(|c| c.len() == CHUNK)
        );
        let old = ids[1];
        let rebuilt = Actions::rebuild(old, log.of(old)).unwrap();
        let sequences = cold_sequences(&actions, &old).unwrap();
        scratch.insert_loaded(rebuilt.clone(), sequences);
        actions.merge(scratch);
        assert_eq!(actions.len(), ids.len());
        assert_eq!(actions.hot(&old), Some(&rebuilt));
    }

    #[test]
    fn folding_summaries_then_whole_events_gives_the_same_actions() {
        let (log, whole, ids) = history();
        // Every split point between summaries and whole events.
        for split in 0..=log.events.len() {
            let mut mixed = Actions::with_hot_limit(0);
            for (n, (context, event)) in log.events.iter().cloned().enumerate() {
                if n < split {
                    let payload = serde_json::to_string(&event.to_payload().unwrap()).unwrap();
                    let summary = EventSummary::from_json(event.kind(), &payload)
                        .unwrap()
                        .unwrap();
                    mixed.apply_summary(context, summary).unwrap();
                } else {
                    mixed.apply_owned(context, event).unwrap();
                }
                mixed.cool();
            }
            assert_same_actions(&mut mixed, &whole, &log, ids, split);
        }
    }

    /// A snapshot taken after any event, stored, read back and restored, then the events
    /// after it folded whole: the same actions as folding every event, whether the state
    /// the snapshot was taken of held its records or not.
    #[test]
    fn restoring_a_snapshot_then_folding_the_rest_gives_the_same_actions() {
        let (log, whole, ids) = history();
        for split in 0..=log.events.len() {
            for hot_limit in [0, usize::MAX] {
                let mut before = Actions::with_hot_limit(hot_limit);
                for (context, event) in log.events.iter().take(split).cloned() {
                    before.apply_owned(context, event).unwrap();
                    before.cool();
                }
                let bytes = postcard::to_stdvec(&before.snapshot()).unwrap();
                let snapshot: Snapshot = postcard::from_bytes(&bytes).unwrap();
                let mut mixed = Actions::restore(snapshot, 0).unwrap();
                assert_eq!(mixed.len(), before.len());
                assert_eq!(mixed.hot_count(), 0, "restored actions are cold");
                for (context, event) in log.events.iter().skip(split).cloned() {
                    mixed.apply_owned(context, event).unwrap();
                    mixed.cool();
                }
                assert_same_actions(&mut mixed, &whole, &log, ids, split);
            }
        }
    }

    /// A snapshot that would make later folds go wrong is refused, naming what is wrong.
    #[test]
    fn a_snapshot_that_does_not_hold_together_is_refused() {
        let (log, whole, [allowed, ..]) = history();
        let applied = log.events.len() as u64;
        let valid = || -> Snapshot {
            postcard::from_bytes(&postcard::to_stdvec(&whole.snapshot()).unwrap()).unwrap()
        };
        let mut unknown_name = valid();
        unknown_name.entries[0].requester = 99;
        assert!(matches!(
            Actions::restore(unknown_name, 0),
            Err(RestoreError::UnknownName { index: 99, .. })
        ));
        let mut beyond = valid();
        beyond.entries[0].sequences.push(applied + 1);
        assert!(matches!(
            Actions::restore(beyond, 0),
            Err(RestoreError::BadSequences { .. })
        ));
        let mut unordered = valid();
        unordered.entries[0].sequences.insert(0, applied);
        assert!(matches!(
            Actions::restore(unordered, 0),
            Err(RestoreError::BadSequences { .. })
        ));
        let copy = |entry: &SnapshotEntry| SnapshotEntry {
            id: entry.id,
            status: entry.status,
            requester: entry.requester,
            action_type: entry.action_type,
            sequences: entry.sequences.clone(),
        };
        let mut twice = valid();
        let first = copy(&twice.entries[0]);
        twice.entries.insert(1, first);
        assert_eq!(
            Actions::restore(twice, 0).err(),
            Some(RestoreError::DuplicateAction(allowed))
        );
        let mut unsorted = valid();
        let first = unsorted.entries.remove(0);
        unsorted.entries.push(first);
        assert_eq!(
            Actions::restore(unsorted, 0).err(),
            Some(RestoreError::OutOfOrder(allowed))
        );
        let mut dangling = valid();
        let stranger = Uuid::now_v7();
        dangling.idempotency.push(([7; 32], stranger));
        assert_eq!(
            Actions::restore(dangling, 0).err(),
            Some(RestoreError::UnknownIdempotentAction(stranger))
        );
        assert!(Actions::restore(valid(), 0).is_ok());
    }

    /// The history the fold tests replay: an allowed action with an outcome, an approved
    /// one, and one still pending after a vote.
    fn history() -> (Log, Actions, [Uuid; 3]) {
        let reviewer = principal("rev", PrincipalKind::Human);
        let (allowed, approved, pending) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let mut history: Vec<(Uuid, Vec<ActionEvent>)> = vec![
            (
                allowed,
                check(ActionStatus::Allowed, "agent-1", "deploy.apply").into(),
            ),
            (
                approved,
                check(ActionStatus::Pending, "agent-2", "iam.role.grant").into(),
            ),
            (
                pending,
                check(ActionStatus::Pending, "agent-2", "db.drop").into(),
            ),
        ];
        history.push((
            approved,
            vec![ActionEvent::Voted(ReviewVoted {
                reviewer: reviewer.clone(),
                verdict: Verdict::Approve,
                reason: "ok".into(),
            })],
        ));
        history.push((
            approved,
            vec![ActionEvent::Approved(ActionApproved {
                valid_until: at(5_000),
                approved_by: vec!["rev".into()],
            })],
        ));
        history.push((
            allowed,
            vec![ActionEvent::OutcomeReported(OutcomeReported {
                outcome: Outcome::Executed,
                details: "done".into(),
            })],
        ));
        history.push((
            pending,
            vec![ActionEvent::Voted(ReviewVoted {
                reviewer,
                verdict: Verdict::Approve,
                reason: "one of two".into(),
            })],
        ));
        let (mut whole, mut log) = (Actions::default(), Log::new());
        for (id, events) in history {
            log.append(&mut whole, id, events);
        }
        (log, whole, [allowed, approved, pending])
    }

    /// Rebuilds `mixed`'s cold pending actions from `log` (as start-up does), then checks
    /// that it answers every question as `whole`, which folded every event whole.
    fn assert_same_actions(
        mixed: &mut Actions,
        whole: &Actions,
        log: &Log,
        [allowed, approved, pending]: [Uuid; 3],
        split: usize,
    ) {
        let rebuild = |id: Uuid, sequences: &[u64]| {
            let events = log
                .of(id)
                .into_iter()
                .filter(|(context, _)| sequences.contains(&context.sequence));
            Actions::rebuild(id, events).unwrap()
        };
        for (id, sequences) in mixed.cold_pending() {
            let record = rebuild(id, &sequences);
            mixed.insert_loaded(record, sequences);
        }
        for id in [allowed, approved, pending] {
            let rebuilt = match mixed.lookup(&id).unwrap() {
                Lookup::Hot(record) => record.clone(),
                Lookup::Cold(sequences) => rebuild(id, sequences),
            };
            assert_eq!(Some(&rebuilt), whole.hot(&id), "split at {split}");
            assert_eq!(mixed.requester_of(&id), whole.requester_of(&id));
        }
        assert!(mixed.hot(&pending).is_some(), "split at {split}");
        assert_eq!(mixed.next_expiry(), whole.next_expiry(), "split at {split}");
        assert_eq!(mixed.pending_count(), 1);
        assert_eq!(mixed.applied_sequence(), whole.applied_sequence());
        for status in [ActionStatus::Allowed, ActionStatus::Approved] {
            assert_eq!(mixed.count_with_status(status), 1, "split at {split}");
        }
        assert_eq!(
            mixed.by_idempotency_key("agent-2", "key-of-agent-2-db.drop"),
            Some(pending)
        );
        let everything = ListFilter::default();
        let ids = |listed: Vec<Listed>| -> Vec<Uuid> {
            listed
                .into_iter()
                .map(|l| match l {
                    Listed::Hot(record) => record.id,
                    Listed::Cold { id, .. } => id,
                })
                .collect()
        };
        assert_eq!(
            ids(mixed.list(&everything, None, 10).0),
            ids(whole.list(&everything, None, 10).0),
            "split at {split}"
        );
    }

    #[test]
    fn a_summary_cannot_change_a_record_held_in_full() {
        let mut actions = Actions::default();
        let mut log = Log::new();
        let id = Uuid::now_v7();
        log.append(
            &mut actions,
            id,
            check(ActionStatus::Pending, "agent-1", "db.drop").into(),
        );
        let context = EventContext {
            sequence: 3,
            time: at(3),
            action_id: id,
        };
        let summary = EventSummary::Other {
            status_after: Some(ActionStatus::Approved),
            audit_only: false,
        };
        assert_eq!(
            actions.apply_summary(context, summary),
            Err(ApplyError::NeedsWholeEvent {
                sequence: 3,
                action_id: id
            })
        );
        assert_eq!(actions.hot(&id).unwrap().status, ActionStatus::Pending);
    }

    #[test]
    fn idempotency_slots_keep_requester_and_key_apart() {
        assert_ne!(
            IdempotencySlot::of("agent-ab", "c"),
            IdempotencySlot::of("agent-a", "bc")
        );
        assert_ne!(
            IdempotencySlot::of("agent-1", "k"),
            IdempotencySlot::of("agent-2", "k")
        );
        assert_eq!(
            IdempotencySlot::of("agent-1", "k"),
            IdempotencySlot::of("agent-1", "k")
        );
    }

    #[test]
    fn rebuilding_needs_the_request_first() {
        let id = Uuid::now_v7();
        let [_, evaluated] = check(ActionStatus::Allowed, "agent-1", "deploy.apply");
        let context = EventContext {
            sequence: 2,
            time: at(2),
            action_id: id,
        };
        assert_eq!(
            Actions::rebuild(id, [(context, evaluated)]),
            Err(ApplyError::UnknownAction {
                sequence: 2,
                action_id: id
            })
        );
        assert!(Actions::rebuild(id, []).is_err());
    }

    #[test]
    fn a_record_touched_again_is_the_last_to_leave_memory() {
        let mut shared = Actions::with_hot_limit(2);
        let mut log = Log::new();
        let (first, second, third) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        for id in [first, second] {
            log.append(
                &mut shared,
                id,
                check(ActionStatus::Allowed, "agent-1", "deploy.apply").into(),
            );
        }
        // The writer's way: copy into a scratch state, fold there, merge back.
        let mut scratch = Actions::default();
        assert!(scratch.copy_hot_from(&shared, &first));
        log.append(
            &mut scratch,
            first,
            vec![ActionEvent::OutcomeReported(OutcomeReported {
                outcome: Outcome::Executed,
                details: String::new(),
            })],
        );
        shared.merge(scratch);
        shared.cool();
        assert_eq!(shared.hot_count(), 2);
        log.append(
            &mut shared,
            third,
            check(ActionStatus::Allowed, "agent-1", "deploy.apply").into(),
        );
        assert!(
            cold_sequences(&shared, &second).is_some(),
            "settled longest ago"
        );
        assert!(shared.hot(&first).is_some(), "touched after the second");
        assert!(shared.hot(&third).is_some());
        assert_eq!(shared.hot_count(), 2);

        // A cold record loaded back into a batch is hot again after the merge.
        let sequences = cold_sequences(&shared, &second).unwrap();
        let rebuilt = Actions::rebuild(second, log.of(second)).unwrap();
        let mut scratch = Actions::default();
        assert!(
            !scratch.copy_hot_from(&shared, &second),
            "cold: load it instead"
        );
        scratch.insert_loaded(rebuilt.clone(), sequences);
        shared.merge(scratch);
        assert_eq!(shared.hot(&second), Some(&rebuilt));
        shared.cool();
        assert_eq!(shared.hot_count(), 2);
        assert!(cold_sequences(&shared, &first).is_some());
    }
}
