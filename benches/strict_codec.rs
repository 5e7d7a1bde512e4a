//! The strict codec's walk of a request (refusing fields the schema does not declare)
//! against prost's decode of the same bytes, for a typical CheckActionRequest of about 500
//! bytes. `cargo bench --bench strict_codec`.

use countersign::api::strict::schema;
use countersign::proto;
use criterion::{Criterion, criterion_group, criterion_main};
use prost::{Message, Name};
use prost_types::value::Kind;
use prost_types::{ListValue, Struct, Value};

fn string(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

fn number(n: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

fn request() -> proto::CheckActionRequest {
    let options = Struct {
        fields: [
            (
                "enabled".to_string(),
                Value {
                    kind: Some(Kind::BoolValue(true)),
                },
            ),
            (
                "nothing".to_string(),
                Value {
                    kind: Some(Kind::NullValue(0)),
                },
            ),
        ]
        .into(),
    };
    proto::CheckActionRequest {
        action: Some(proto::Action {
            r#type: "storage.object.read".to_string(),
            resource: "projects/acme/buckets/invoices/objects/2024/q3/report.pdf".to_string(),
            environment: "production".to_string(),
            parameters: Some(Struct {
                fields: [
                    ("region".to_string(), string("europe-west4")),
                    ("max_bytes".to_string(), number(1_048_576.0)),
                    (
                        "zones".to_string(),
                        Value {
                            kind: Some(Kind::ListValue(ListValue {
                                values: vec![string("a"), string("b"), number(3.0)],
                            })),
                        },
                    ),
                    (
                        "options".to_string(),
                        Value {
                            kind: Some(Kind::StructValue(options)),
                        },
                    ),
                ]
                .into(),
            }),
            purpose: "Summarise the quarterly invoices for the finance review the user asked \
                      for, then file the summary in the team's shared drive."
                .to_string(),
        }),
        task: Some(proto::Task {
            task_id: "task-7f3a9c".to_string(),
            origin: "slack:#finance".to_string(),
            on_behalf_of: "alice@example.com".to_string(),
            labels: [
                ("team".to_string(), "finance".to_string()),
                ("ticket".to_string(), "FIN-1234".to_string()),
            ]
            .into(),
        }),
        idempotency_key: "0190f3e4-7d1c-7a8b-9c2d-3e4f5a6b7c8d".to_string(),
    }
}

fn strict_codec(c: &mut Criterion) {
    let bytes = request().encode_to_vec();
    let schema = schema().expect("the embedded schema builds");
    let id = schema
        .find(&proto::CheckActionRequest::full_name())
        .expect("CheckActionRequest is declared");
    c.bench_function("strict walk of CheckActionRequest", |b| {
        b.iter(|| schema.check(id, std::hint::black_box(&bytes)).is_ok())
    });
    c.bench_function("prost decode of CheckActionRequest", |b| {
        b.iter(|| proto::CheckActionRequest::decode(std::hint::black_box(bytes.as_slice())).is_ok())
    });
    c.bench_function("schema lookup by name", |b| {
        b.iter(|| schema.find(std::hint::black_box("countersign.v1.CheckActionRequest")))
    });
}

criterion_group!(benches, strict_codec);
criterion_main!(benches);
