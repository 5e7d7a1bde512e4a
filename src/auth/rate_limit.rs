//! Per-principal budgets for the RPCs that write: one caller cannot take the writer, or the
//! disk, for itself.
//!
//! Every call that makes the ledger write (see [`Budget::of`]) spends a token from its
//! caller's bucket for that kind of call; an empty bucket answers RESOURCE_EXHAUSTED,
//! saying which budget and when to retry (also as a `google.rpc.RetryInfo` detail). Buckets
//! refill at `per_second` up to `burst` ([`Rate`], `[limits.rate]`). The guard
//! ([`super::guard`]) asks right after authenticating, so refusals (a vote from an agent,
//! a self-approval) spend the budget too.
//!
//! Memory is bounded: buckets live in [`SHARDS`] maps behind a mutex each, at most
//! [`MAX_PRINCIPALS`] principals in all. A bucket that has refilled completely carries no
//! information, so a full shard first drops those (at most once per [`SWEEP_EVERY`]);
//! principals that still find no room share one bucket per shard, so a flood of distinct
//! principals is limited together instead of growing the map. The decision is a pure
//! function of the bucket and the time passed in; only [`RateLimiter::admit`] reads it.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Deserialize;

/// Maps that hold the buckets; a caller locks only its own principal's shard.
pub const SHARDS: usize = 16;

/// Principals with a bucket at once, over all shards; see the module documentation.
pub const MAX_PRINCIPALS: usize = 65_536;

/// How often a full shard may be swept for refilled buckets: a sweep reads the whole shard.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The kinds of write call, each with a budget of its own per principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Budget {
    /// CheckAction, CancelAction, ReportOutcome: what agents call.
    Gate,
    /// SubmitReview.
    Review,
    /// ReloadPolicies.
    Admin,
}

impl Budget {
    pub const ALL: [Budget; 3] = [Budget::Gate, Budget::Review, Budget::Admin];

    /// The budget a call to the RPC at `path` spends; `None` for RPCs that only read.
    pub fn of(path: &str) -> Option<Budget> {
        Some(match path.strip_prefix("/countersign.v1.")? {
            "ActionGate/CheckAction" | "ActionGate/CancelAction" | "ActionGate/ReportOutcome" => {
                Budget::Gate
            }
            "ReviewService/SubmitReview" => Budget::Review,
            "PolicyService/ReloadPolicies" => Budget::Admin,
            _ => return None,
        })
    }

    /// The name used in metrics, messages and configuration (`[limits.rate] <name>_*`).
    pub fn name(self) -> &'static str {
        match self {
            Budget::Gate => "gate",
            Budget::Review => "review",
            Budget::Admin => "admin",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One budget: a sustained rate and the burst above it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Calls a second, sustained; 0: no limit.
    pub per_second: f64,
    /// Calls allowed at once after a quiet spell (the bucket's size).
    pub burst: u32,
}

impl Rate {
    pub const OFF: Rate = Rate {
        per_second: 0.0,
        burst: 0,
    };

    fn is_off(&self) -> bool {
        self.per_second <= 0.0
    }
}

/// `[limits.rate]`: the budgets, per principal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimits {
    pub gate: Rate,
    pub review: Rate,
    pub admin: Rate,
}

impl Default for RateLimits {
    /// An agent may check 1,000 actions a second (2,000 at once), a reviewer vote 20 times
    /// a second (100 at once), an admin reload policies once a second (5 at once): far
    /// above what a person or a well-behaved agent does, far below what fills a disk.
    fn default() -> Self {
        RateLimits {
            gate: Rate {
                per_second: 1000.0,
                burst: 2000,
            },
            review: Rate {
                per_second: 20.0,
                burst: 100,
            },
            admin: Rate {
                per_second: 1.0,
                burst: 5,
            },
        }
    }
}

impl RateLimits {
    pub const OFF: RateLimits = RateLimits {
        gate: Rate::OFF,
        review: Rate::OFF,
        admin: Rate::OFF,
    };

    pub fn of(&self, budget: Budget) -> Rate {
        match budget {
            Budget::Gate => self.gate,
            Budget::Review => self.review,
            Budget::Admin => self.admin,
        }
    }
}

/// `[limits.rate]` as written in the config file; absent keys keep their default.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateSection {
    pub gate_per_second: Option<f64>,
    pub gate_burst: Option<u32>,
    pub review_per_second: Option<f64>,
    pub review_burst: Option<u32>,
    pub admin_per_second: Option<f64>,
    pub admin_burst: Option<u32>,
}

impl RateSection {
    /// The defaults with this section's values; the error names the bad key.
    pub fn resolve(&self) -> Result<RateLimits, (&'static str, String)> {
        let mut limits = RateLimits::default();
        for (rate, per_second, burst, names) in [
            (
                &mut limits.gate,
                self.gate_per_second,
                self.gate_burst,
                ("limits.rate.gate_per_second", "limits.rate.gate_burst"),
            ),
            (
                &mut limits.review,
                self.review_per_second,
                self.review_burst,
                ("limits.rate.review_per_second", "limits.rate.review_burst"),
            ),
            (
                &mut limits.admin,
                self.admin_per_second,
                self.admin_burst,
                ("limits.rate.admin_per_second", "limits.rate.admin_burst"),
            ),
        ] {
            if let Some(v) = per_second {
                if !v.is_finite() || v < 0.0 {
                    return Err((names.0, "must be 0 (no limit) or a positive number".into()));
                }
                rate.per_second = v;
            }
            if let Some(v) = burst {
                rate.burst = v;
            }
            if !rate.is_off() && rate.burst == 0 {
                return Err((
                    names.1,
                    "must be at least 1 when the rate is limited".into(),
                ));
            }
        }
        Ok(limits)
    }
}

/// Told about every call refused for its budget: metrics.
pub trait LimitObserver: Send + Sync + 'static {
    fn limited(&self, budget: Budget);
}

/// A call over its budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Limited {
    pub budget: Budget,
    pub rate: Rate,
    /// When the bucket holds a token again.
    pub retry_after: Duration,
    /// The principal shares the bucket of those the limiter had no room for.
    pub shared: bool,
}

impl Limited {
    /// What the caller is told.
    pub fn message(&self, principal: &str) -> String {
        let whose = if self.shared {
            "the budget shared by callers beyond the limiter's capacity".to_string()
        } else {
            format!("its {} budget", self.budget.name())
        };
        format!(
            "{principal} is over {whose}: {} calls a second, bursts of {} ([limits.rate] {}_per_second and {}_burst); retry in {} ms",
            self.rate.per_second,
            self.rate.burst,
            self.budget.name(),
            self.budget.name(),
            self.retry_after.as_millis().max(1)
        )
    }
}

/// One budget's token bucket.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    fn full(rate: Rate, now: Instant) -> Bucket {
        Bucket {
            tokens: f64::from(rate.burst),
            updated: now,
        }
    }

    fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(f64::from(rate.burst));
        self.updated = self.updated.max(now);
    }

    /// Takes a token, or says how long until there is one.
    fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        let wait = (1.0 - self.tokens) / rate.per_second;
        Err(Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX))
    }

    fn is_full(&self, rate: Rate, now: Instant) -> bool {
        let mut bucket = *self;
        bucket.refill(rate, now);
        bucket.tokens >= f64::from(rate.burst)
    }
}

/// One principal's buckets, one per [`Budget`], made full when first needed.
#[derive(Debug, Default)]
struct Buckets([Option<Bucket>; 3]);

impl Buckets {
    fn take(&mut self, budget: Budget, rate: Rate, now: Instant) -> Result<(), Duration> {
        self.0[budget.index()]
            .get_or_insert_with(|| Bucket::full(rate, now))
            .take(rate, now)
    }

    fn idle(&self, limits: &RateLimits, now: Instant) -> bool {
        Budget::ALL.iter().all(|&budget| {
            self.0[budget.index()].is_none_or(|bucket| bucket.is_full(limits.of(budget), now))
        })
    }
}

#[derive(Debug, Default)]
struct Shard {
    buckets: HashMap<Box<str>, Buckets>,
    /// For principals that found the shard full.
    shared: Buckets,
    last_sweep: Option<Instant>,
}

impl Shard {
    /// The principal's buckets; `None` when there is no room for it (use `shared`).
    fn buckets(
        &mut self,
        principal: &str,
        capacity: usize,
        limits: &RateLimits,
        now: Instant,
    ) -> Option<&mut Buckets> {
        if !self.buckets.contains_key(principal) {
            if self.buckets.len() >= capacity {
                let due = self
                    .last_sweep
                    .is_none_or(|last| now.saturating_duration_since(last) >= SWEEP_EVERY);
                if !due {
                    return None;
                }
                self.last_sweep = Some(now);
                self.buckets.retain(|_, buckets| !buckets.idle(limits, now));
                if self.buckets.len() >= capacity {
                    return None;
                }
            }
            self.buckets.insert(principal.into(), Buckets::default());
        }
        self.buckets.get_mut(principal)
    }
}

/// The budgets of every principal; see the module documentation.
pub struct RateLimiter {
    limits: RateLimits,
    shards: Box<[Mutex<Shard>]>,
    per_shard: usize,
    hasher: std::collections::hash_map::RandomState,
    observer: Option<Arc<dyn LimitObserver>>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    pub fn new(limits: RateLimits, observer: Option<Arc<dyn LimitObserver>>) -> RateLimiter {
        Self::with_capacity(limits, MAX_PRINCIPALS, observer)
    }

    /// With room for about `principals` (split over the shards).
    pub fn with_capacity(
        limits: RateLimits,
        principals: usize,
        observer: Option<Arc<dyn LimitObserver>>,
    ) -> RateLimiter {
        RateLimiter {
            limits,
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard: principals.div_ceil(SHARDS).max(1),
            hasher: std::collections::hash_map::RandomState::new(),
            observer,
        }
    }

    pub fn limits(&self) -> &RateLimits {
        &self.limits
    }

    /// Spends one call of `principal`'s `budget` at `now`, or says why not.
    pub fn admit(&self, principal: &str, budget: Budget, now: Instant) -> Result<(), Limited> {
        let rate = self.limits.of(budget);
        if rate.is_off() {
            return Ok(());
        }
        let shard = self.hasher.hash_one(principal) as usize % self.shards.len();
        let mut shard = self.shards[shard].lock();
        let shard = &mut *shard;
        let (taken, shared) = match shard.buckets(principal, self.per_shard, &self.limits, now) {
            Some(buckets) => (buckets.take(budget, rate, now), false),
            None => (shard.shared.take(budget, rate, now), true),
        };
        taken.map_err(|retry_after| {
            if let Some(observer) = &self.observer {
                observer.limited(budget);
            }
            Limited {
                budget,
                rate,
                retry_after,
                shared,
            }
        })
    }

    /// Principals with buckets right now.
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().buckets.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    fn limits(per_second: f64, burst: u32) -> RateLimits {
        let rate = Rate { per_second, burst };
        RateLimits {
            gate: rate,
            review: rate,
            admin: rate,
        }
    }

    #[test]
    fn a_burst_passes_then_the_rate_holds_and_the_wait_is_told() {
        let limiter = RateLimiter::new(limits(10.0, 5), None);
        let start = Instant::now();
        for _ in 0..5 {
            assert!(limiter.admit("bob", Budget::Review, start).is_ok());
        }
        let limited = limiter.admit("bob", Budget::Review, start).unwrap_err();
        assert_eq!(limited.budget, Budget::Review);
        assert_eq!(limited.retry_after, Duration::from_millis(100));
        assert!(!limited.shared);
        let message = limited.message("bob");
        assert!(message.contains("review budget"), "{message}");
        assert!(message.contains("retry in 100 ms"), "{message}");
        // A tenth of a second later, one more call.
        let later = start + Duration::from_millis(100);
        assert!(limiter.admit("bob", Budget::Review, later).is_ok());
        assert!(limiter.admit("bob", Budget::Review, later).is_err());
    }

    #[test]
    fn principals_and_budgets_do_not_share_buckets() {
        let limiter = RateLimiter::new(limits(1.0, 1), None);
        let now = Instant::now();
        assert!(limiter.admit("bob", Budget::Review, now).is_ok());
        assert!(limiter.admit("bob", Budget::Review, now).is_err());
        assert!(limiter.admit("carol", Budget::Review, now).is_ok());
        assert!(limiter.admit("bob", Budget::Gate, now).is_ok());
    }

    #[test]
    fn a_rate_of_zero_is_no_limit() {
        let limiter = RateLimiter::new(RateLimits::OFF, None);
        let now = Instant::now();
        for _ in 0..10_000 {
            assert!(limiter.admit("bob", Budget::Gate, now).is_ok());
        }
        assert_eq!(limiter.tracked(), 0);
    }

    #[test]
    fn a_flood_of_principals_stays_bounded_and_shares_one_bucket_per_shard() {
        let limiter = RateLimiter::with_capacity(limits(1.0, 2), 64, None);
        let now = Instant::now();
        let mut shared = 0;
        for n in 0..10_000 {
            if let Err(limited) = limiter.admit(&format!("p{n}"), Budget::Gate, now) {
                assert!(limited.shared);
                shared += 1;
            }
        }
        assert!(limiter.tracked() <= 64, "{}", limiter.tracked());
        assert!(shared > 9_000, "{shared}");
        // Once the tracked buckets have refilled, newcomers get buckets of their own again.
        let later = now + Duration::from_secs(3);
        assert!(limiter.admit("newcomer", Budget::Gate, later).is_ok());
        assert!(limiter.tracked() <= 64);
    }

    #[test]
    fn the_config_section_overrides_defaults_and_refuses_nonsense() {
        let section: RateSection =
            toml::from_str("review_per_second = 2.5\nadmin_per_second = 0").unwrap();
        let limits = section.resolve().unwrap();
        assert_eq!(limits.review.per_second, 2.5);
        assert_eq!(limits.review.burst, RateLimits::default().review.burst);
        assert!(limits.admin.is_off());
        assert_eq!(limits.gate, RateLimits::default().gate);
        let bad: RateSection = toml::from_str("gate_per_second = -1").unwrap();
        assert_eq!(bad.resolve().unwrap_err().0, "limits.rate.gate_per_second");
        let bad: RateSection = toml::from_str("gate_burst = 0").unwrap();
        assert_eq!(bad.resolve().unwrap_err().0, "limits.rate.gate_burst");
        assert!(toml::from_str::<RateSection>("gate = 1").is_err());
    }

    /// Every RPC either writes (and has a budget) or is one of these readers: a new RPC
    /// must be placed.
    #[test]
    fn every_countersign_rpc_is_a_known_reader_or_has_a_budget() {
        const READERS: [&str; 7] = [
            "ActionGate/AwaitDecision",
            "ReviewService/StreamPending",
            "ReviewService/ListActions",
            "ReviewService/GetAction",
            "AuditService/ReadEvents",
            "AuditService/VerifyLog",
            "PolicyService/GetPolicySet",
        ];
        let set =
            prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut writers = 0;
        for file in set.file.iter().filter(|f| f.package() == "countersign.v1") {
            for service in &file.service {
                for method in &service.method {
                    let name = format!("{}/{}", service.name(), method.name());
                    let budget = Budget::of(&format!("/countersign.v1.{name}"));
                    assert_eq!(budget.is_none(), READERS.contains(&name.as_str()), "{name}");
                    writers += usize::from(budget.is_some());
                }
            }
        }
        assert_eq!(writers, 5);
    }
}
