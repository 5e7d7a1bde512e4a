//! Policy evaluation: the shipped set on each of its paths, and generated sets of 100 rules
//! (all evaluated on every request, and indexed by action type). `cargo bench --bench
//! policy_eval`.

use std::path::Path;

use chrono::{DateTime, TimeZone, Utc};
use countersign::domain::{ActionRequest, ActionSpec, Principal, PrincipalKind, TaskContext};
use countersign::policy::{EvaluationInput, PolicySet};
use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;

fn agent() -> Principal {
    Principal {
        id: "bench-agent".into(),
        kind: PrincipalKind::Agent,
        groups: vec!["automation".into()],
        authenticated_by: "development-header".into(),
    }
}

fn request(action_type: &str, environment: &str, parameters: serde_json::Value) -> ActionRequest {
    let serde_json::Value::Object(parameters) = parameters else {
        panic!("parameters must be an object");
    };
    ActionRequest {
        action: ActionSpec {
            action_type: action_type.into(),
            resource: "web-frontend".into(),
            environment: environment.into(),
            parameters,
            purpose: "benchmark".into(),
        },
        task: TaskContext {
            task_id: "bench".into(),
            origin: "criterion".into(),
            on_behalf_of: "alice".into(),
            labels: Default::default(),
        },
        idempotency_key: String::new(),
    }
}

fn noon() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, 4, 12, 0, 0).unwrap()
}

fn evaluate(c: &mut Criterion, name: &str, set: &PolicySet, req: &ActionRequest) {
    let principal = agent();
    let input = EvaluationInput {
        principal: &principal,
        request: req,
        now: noon(),
    };
    c.bench_function(name, |b| {
        b.iter(|| set.evaluate(std::hint::black_box(&input)))
    });
}

/// 100 rules that all look at the environment and a parameter: none can be skipped by type.
fn unindexed_100() -> PolicySet {
    let mut yaml = String::from("rules:\n");
    for i in 0..100 {
        yaml.push_str(&format!(
            "  - name: r{i}\n    expression: >-\n      action.environment == \"env{i}\" && has(action.parameters.role) && action.parameters.role in [\"a\", \"b\"]\n    effect: require_approval\n    risk: high\n"
        ));
    }
    PolicySet::from_sources(&[("many.yaml".to_string(), yaml)]).unwrap()
}

/// 100 rules on 33 action types, 3 of which apply to the request.
fn indexed_100() -> PolicySet {
    let mut yaml = String::from("rules:\n");
    for i in 0..100 {
        yaml.push_str(&format!(
            "  - name: t{i}\n    expression: action.type == \"svc{}.op\" && action.environment == \"production\"\n    effect: require_approval\n    risk: high\n",
            i % 33
        ));
    }
    PolicySet::from_sources(&[("typed.yaml".to_string(), yaml)]).unwrap()
}

fn policies(c: &mut Criterion) {
    let shipped =
        PolicySet::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")).unwrap();
    let params = json!({"image": "registry/web:1.42.0", "replicas": 3});
    evaluate(
        c,
        "shipped/allow deploy.apply staging",
        &shipped,
        &request("deploy.apply", "staging", params.clone()),
    );
    evaluate(
        c,
        "shipped/deny db.table.drop production",
        &shipped,
        &request("db.table.drop", "production", params.clone()),
    );
    evaluate(
        c,
        "shipped/pending secret.rotate production",
        &shipped,
        &request("secret.rotate", "production", params),
    );
    evaluate(
        c,
        "shipped/pending iam.role.grant admin",
        &shipped,
        &request(
            "iam.role.grant",
            "production",
            json!({"role": "roles/owner", "member": "bob@example.com"}),
        ),
    );
    evaluate(
        c,
        "generated/100 unindexed rules",
        &unindexed_100(),
        &request("iam.role.grant", "production", json!({"role": "a", "n": 3})),
    );
    evaluate(
        c,
        "generated/100 rules indexed by type",
        &indexed_100(),
        &request("svc1.op", "production", json!({})),
    );
}

criterion_group!(benches, policies);
criterion_main!(benches);
