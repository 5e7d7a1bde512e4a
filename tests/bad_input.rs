//! Requests the server does not fully understand are refused, not half-read: raw protobuf
//! bytes through the real server.

mod common;

use common::{Caller, TestServer, check, string};
use countersign::api::strict;
use countersign::proto::{self, ActionStatus};
use prost::Message;
use prost::bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// Sends and receives message bytes as they are, so a test can send what no generated
/// client would.
#[derive(Debug, Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

/// Calls `method` (`/package.Service/Method`) with `body` as the request message.
async fn call_raw(
    server: &TestServer,
    who: &Caller,
    method: &'static str,
    body: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    let channel: InterceptedService<Channel, Caller> =
        InterceptedService::new(server.channel().await, who.clone());
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(body),
        PathAndQuery::from_static(method),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

const CHECK_ACTION: &str = "/countersign.v1.ActionGate/CheckAction";

fn varint(value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_varint(value, &mut out);
    out
}

/// Field `number` holding the varint `value`.
fn varint_field(number: u64, value: u64) -> Vec<u8> {
    [varint(number << 3), varint(value)].concat()
}

/// Field `number` holding `payload` (a string, bytes or an encoded message).
fn len_field(number: u64, payload: &[u8]) -> Vec<u8> {
    [
        varint((number << 3) | 2),
        varint(payload.len() as u64),
        payload.to_vec(),
    ]
    .concat()
}

fn assert_refused_naming(status: &Status, expected: &str, field: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains(expected),
        "message should name {expected:?}: {}",
        status.message()
    );
    let bad_request = status
        .get_details_bad_request()
        .expect("a BadRequest names the field");
    assert_eq!(
        bad_request
            .field_violations
            .first()
            .map(|v| v.field.as_str()),
        Some(field)
    );
}

#[tokio::test]
async fn an_unknown_top_level_field_is_refused() {
    let server = TestServer::start().await;
    let mut body = check("storage.object.read", "production", &[]).encode_to_vec();
    body.extend(varint_field(17, 1));

    let status = call_raw(&server, &Caller::agent("reader-bot"), CHECK_ACTION, body)
        .await
        .expect_err("refused");

    assert_refused_naming(
        &status,
        "request has a field this server does not know: \
         countersign.v1.CheckActionRequest field 17 (at the top level)",
        "#17",
    );
}

#[tokio::test]
async fn an_unknown_field_inside_action_is_refused() {
    let server = TestServer::start().await;
    let request = check("storage.object.read", "production", &[]);
    let mut action = request.action.clone().expect("action").encode_to_vec();
    action.extend(varint_field(42, 1));
    let task = request.task.clone().expect("task").encode_to_vec();
    let body = [len_field(1, &action), len_field(2, &task)].concat();

    let status = call_raw(&server, &Caller::agent("reader-bot"), CHECK_ACTION, body)
        .await
        .expect_err("refused");

    assert_refused_naming(
        &status,
        "countersign.v1.Action field 42 (at action); refusing rather than ignoring it",
        "action.#42",
    );
}

#[tokio::test]
async fn an_unknown_field_inside_a_parameter_is_refused() {
    let server = TestServer::start().await;
    let mut value = string("europe-west4").encode_to_vec();
    value.extend(varint_field(9, 1));
    let entry = [len_field(1, b"region"), len_field(2, &value)].concat();
    let parameters = len_field(1, &entry);
    let mut action = proto::Action {
        parameters: None,
        ..check("storage.object.read", "production", &[])
            .action
            .expect("action")
    }
    .encode_to_vec();
    action.extend(len_field(4, &parameters));
    let body = len_field(1, &action);

    let status = call_raw(&server, &Caller::agent("reader-bot"), CHECK_ACTION, body)
        .await
        .expect_err("refused");

    assert_refused_naming(
        &status,
        "google.protobuf.Value field 9 (at action.parameters.fields[\"region\"])",
        "action.parameters.fields[\"region\"].#9",
    );
}

#[tokio::test]
async fn the_same_request_without_the_unknown_field_is_allowed() {
    let server = TestServer::start().await;
    let body = check("storage.object.read", "production", &[]).encode_to_vec();

    let response = call_raw(&server, &Caller::agent("reader-bot"), CHECK_ACTION, body)
        .await
        .expect("allowed");

    let response = proto::CheckActionResponse::decode(response.as_slice()).expect("decodes");
    assert_eq!(response.status(), ActionStatus::Allowed);
}

#[tokio::test]
async fn a_normal_check_through_the_generated_client_still_works() {
    let server = TestServer::start().await;
    let mut gate = server.gate(&Caller::agent("reader-bot")).await;

    let response = gate
        .check_action(check(
            "storage.object.read",
            "production",
            &[("bucket", string("invoices"))],
        ))
        .await
        .expect("check succeeds")
        .into_inner();

    assert_eq!(response.status(), ActionStatus::Allowed);
}

/// The generated clients share the strict codec; what the server sends must pass its walk
/// even though clients read responses leniently.
#[tokio::test]
async fn responses_the_server_sends_pass_the_strict_walk() {
    let server = TestServer::start().await;
    let agent = Caller::agent("iam-bot");
    let schema = strict::schema().expect("schema");
    let walk = |message: &str, bytes: &[u8]| {
        let id = schema.find(message).expect("in the schema");
        schema
            .check(id, bytes)
            .unwrap_or_else(|e| panic!("{message} from the server: {e}"));
    };

    let pending = check(
        "iam.role.grant",
        "production",
        &[
            ("role", string("admin")),
            ("member", string("bob@example.com")),
        ],
    );
    let response = call_raw(&server, &agent, CHECK_ACTION, pending.encode_to_vec())
        .await
        .expect("check succeeds");
    walk("countersign.v1.CheckActionResponse", &response);
    let response = proto::CheckActionResponse::decode(response.as_slice()).expect("decodes");
    assert_eq!(response.status(), ActionStatus::Pending);

    let get = proto::GetActionRequest {
        action_id: response.action_id,
    };
    let record = call_raw(
        &server,
        &Caller::human("carol", "security"),
        "/countersign.v1.ReviewService/GetAction",
        get.encode_to_vec(),
    )
    .await
    .expect("get succeeds");
    walk("countersign.v1.GetActionResponse", &record);

    let verify = call_raw(
        &server,
        &Caller::human("erin", "auditors"),
        "/countersign.v1.AuditService/VerifyLog",
        Vec::new(),
    )
    .await
    .expect("verify succeeds");
    walk("countersign.v1.VerifyLogResponse", &verify);
}
