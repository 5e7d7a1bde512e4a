//! A request over `limits.max_message_bytes` is answered RESOURCE_EXHAUSTED, as the gRPC
//! status-code guide says (and clients in other languages expect), not OUT_OF_RANGE.
//!
//! tonic checks the length prefix of each request message against the service's
//! `max_decoding_message_size` before it buffers a byte of it, which is the check we want;
//! only its status code is wrong. This layer, in front of every service, rewrites that one
//! answer: a trailers-only response whose `grpc-status` is OUT_OF_RANGE and whose
//! `grpc-message` is tonic's "decoded message length too large". No countersign handler
//! answers OUT_OF_RANGE, and `tests/check_action.rs` fails if tonic ever words it
//! differently.

use http::HeaderMap;
use tonic::Status;
use tonic::body::Body;
use tower::util::MapResponseLayer;

/// tonic's wording of the size check (`tonic::codec::decode`) as it is sent: percent-encoded
/// (`Status::add_header`), matched as a prefix.
const TONIC_TOO_LARGE: &[u8] = b"Error,%20decoded%20message%20length%20too%20large";

/// `grpc-status` of OUT_OF_RANGE (the numeric codes are part of the gRPC wire protocol).
const OUT_OF_RANGE: &[u8] = b"11";

/// The layer; `limit` is named in the message so the caller knows what to shrink to.
pub fn layer(
    limit: usize,
) -> MapResponseLayer<impl Fn(http::Response<Body>) -> http::Response<Body> + Clone> {
    // Encoded by tonic, like every status it sends.
    let mut replacement = HeaderMap::new();
    let _ = Status::resource_exhausted(format!(
        "the request message is larger than the server's limit of {limit} bytes \
         (limits.max_message_bytes)"
    ))
    .add_header(&mut replacement);
    MapResponseLayer::new(move |response| rewrite(response, &replacement))
}

/// Rewrites tonic's OUT_OF_RANGE for an oversized request; leaves everything else alone.
fn rewrite(mut response: http::Response<Body>, replacement: &HeaderMap) -> http::Response<Body> {
    let headers = response.headers_mut();
    let too_large = headers
        .get("grpc-status")
        .is_some_and(|status| status.as_bytes() == OUT_OF_RANGE)
        && headers
            .get("grpc-message")
            .is_some_and(|m| m.as_bytes().starts_with(TONIC_TOO_LARGE));
    if too_large {
        for (name, value) in replacement {
            headers.insert(name, value.clone());
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(headers: &HeaderMap) -> http::Response<Body> {
        let mut response = http::Response::new(Body::empty());
        *response.headers_mut() = headers.clone();
        response
    }

    #[test]
    fn only_the_size_check_is_rewritten() {
        let mut replacement = HeaderMap::new();
        let _ = Status::resource_exhausted("over the limit").add_header(&mut replacement);
        let mut sent = HeaderMap::new();
        let _ = Status::out_of_range(
            "Error, decoded message length too large: found 5 bytes, the limit is: 4 bytes",
        )
        .add_header(&mut sent);
        let too_large = rewrite(answer(&sent), &replacement);
        assert_eq!(too_large.headers()["grpc-status"], "8");
        assert_eq!(too_large.headers()["grpc-message"], "over%20the%20limit");

        let mut other = HeaderMap::new();
        let _ = Status::out_of_range("page token out of range").add_header(&mut other);
        assert_eq!(
            rewrite(answer(&other), &replacement).headers()["grpc-status"],
            "11"
        );
        let mut invalid = HeaderMap::new();
        let _ = Status::invalid_argument("Error, decoded message length too large")
            .add_header(&mut invalid);
        assert_eq!(
            rewrite(answer(&invalid), &replacement).headers()["grpc-status"],
            "3"
        );
    }
}
