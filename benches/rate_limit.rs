//! The per-principal write budget on CheckAction's path (`auth::rate_limit`): what one
//! `RateLimiter::admit` costs with one caller, with callers spread over 10,000 principals,
//! with two threads sharing the limiter, and with the limits off (the floor). `cargo bench
//! --bench rate_limit`.

use std::sync::Arc;
use std::time::Instant;

use countersign::auth::{Budget, Rate, RateLimiter, RateLimits};
use criterion::{Criterion, criterion_group, criterion_main};

/// Budgets no caller here runs out of, so every call takes the admitting path.
fn generous() -> RateLimits {
    let rate = Rate {
        per_second: 1e12,
        burst: u32::MAX,
    };
    RateLimits {
        gate: rate,
        review: rate,
        admin: rate,
    }
}

fn admit(c: &mut Criterion) {
    let mut group = c.benchmark_group("rate_limit");
    let limiter = RateLimiter::new(generous(), None);
    group.bench_function("one principal", |b| {
        b.iter(|| {
            limiter
                .admit("deploy-bot", Budget::Gate, Instant::now())
                .is_ok()
        })
    });

    let names: Vec<String> = (0..10_000).map(|n| format!("agent-{n}")).collect();
    let mut next = 0;
    group.bench_function("10,000 principals", |b| {
        b.iter(|| {
            next = (next + 1) % names.len();
            limiter
                .admit(&names[next], Budget::Gate, Instant::now())
                .is_ok()
        })
    });

    // The same call while another thread calls as other principals, back to back.
    let shared = Arc::new(RateLimiter::new(generous(), None));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let other = {
        let (shared, stop) = (shared.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let _ = shared.admit(&format!("other-{}", n % 64), Budget::Gate, Instant::now());
            }
        })
    };
    group.bench_function("one principal, a second thread admitting others", |b| {
        b.iter(|| {
            shared
                .admit("deploy-bot", Budget::Gate, Instant::now())
                .is_ok()
        })
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = other.join();

    let off = RateLimiter::new(RateLimits::OFF, None);
    group.bench_function("limits off", |b| {
        b.iter(|| {
            off.admit("deploy-bot", Budget::Gate, Instant::now())
                .is_ok()
        })
    });
    group.finish();
}

criterion_group!(benches, admit);
criterion_main!(benches);
