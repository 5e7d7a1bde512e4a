//! The edge's one gate: every countersign call is authenticated, then authorized for its
//! RPC, before any handler sees it.
//!
//! [`Guard`] wraps each countersign service (health and reflection stay open). It runs the
//! configured [`Authenticator`] on the call's metadata and connection, checks the RPC's
//! [`Requirement`](super::roles::Requirement) against the caller's roles, and stores the
//! [`AuthContext`] and [`Grants`] in the request extensions for the handlers. A call that
//! writes first spends its caller's rate budget ([`RateLimiter`]), when one is set. A
//! refusal is answered here (UNAUTHENTICATED, RESOURCE_EXHAUSTED or PERMISSION_DENIED) and
//! reported to the [`DenialReporter`], which records it without letting repeats flood the
//! log. The one exception: a vote from someone who may not review is admitted with a
//! [`RoleRefusal`], to be refused on the action it targeted (see
//! [`roles::refused_on_record`](super::roles::refused_on_record)).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use chrono::Utc;
use tonic::Status;
use tonic::body::Body;
use tonic::metadata::MetadataMap;
use tonic::server::NamedService;
use tower::{Layer, Service};

use super::context::AuthContext;
use super::denials::{Denial, DenialReporter, DeniedAs};
use super::rate_limit::{Budget, RateLimiter};
use super::roles::{self, RoleRefusal, Roles};
use super::{AuthError, Authenticator};

/// What [`Guard`] needs, shared by every service it wraps.
#[derive(Clone)]
pub struct GuardLayer {
    authenticator: Arc<dyn Authenticator>,
    roles: Arc<Roles>,
    denials: DenialReporter,
    /// Per-principal budgets of the calls that write; `None`: no limits.
    limiter: Option<Arc<RateLimiter>>,
}

impl GuardLayer {
    pub fn new(
        authenticator: Arc<dyn Authenticator>,
        roles: Arc<Roles>,
        denials: DenialReporter,
    ) -> Self {
        GuardLayer {
            authenticator,
            roles,
            denials,
            limiter: None,
        }
    }

    /// Calls that write spend their caller's budget in `limiter` first.
    pub fn with_rate_limiter(mut self, limiter: Arc<RateLimiter>) -> Self {
        self.limiter = Some(limiter);
        self
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            gate: self.clone(),
        }
    }
}

/// A countersign service behind the gate.
#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    gate: GuardLayer,
}

// === impl Guard ===

impl<S: NamedService> NamedService for Guard<S> {
    const NAME: &'static str = S::NAME;
}

type Answer = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

impl<S, B> Service<http::Request<B>> for Guard<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Answer;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Answer {
        let span = rpc_span(&request);
        let answer: Answer = match self.gate.admit(request) {
            Ok(admitted) => Box::pin(self.inner.call(admitted)),
            Err(refusal) => Box::pin(std::future::ready(Ok(refusal.into_http()))),
        };
        if span.is_disabled() {
            answer
        } else {
            Box::pin(tracing::Instrument::instrument(answer, span))
        }
    }
}

/// What the guard knows of an admitted call, for handlers that refuse it on the merits of
/// a particular record (see [`Refuser`]).
struct Admitted {
    rpc: String,
    peer: Option<std::net::IpAddr>,
    principal: crate::domain::Principal,
    denials: DenialReporter,
}

/// Refuses an admitted call on the merits of a particular record (someone else's action, a
/// human the caller may not name): PERMISSION_DENIED, recorded like the guard's own
/// refusals. Taken from the request before its body is consumed.
#[derive(Clone)]
pub struct Refuser(Option<Arc<Admitted>>);

impl Refuser {
    pub fn of<T>(request: &tonic::Request<T>) -> Refuser {
        Refuser(request.extensions().get::<Arc<Admitted>>().cloned())
    }

    pub fn permission_denied(&self, reason: impl Into<String>) -> Status {
        let reason = reason.into();
        if let Some(call) = &self.0 {
            call.denials.report(Denial {
                status: DeniedAs::PermissionDenied,
                rpc: call.rpc.clone(),
                peer: call.peer,
                principal: Some(call.principal.clone()),
                reason: reason.clone(),
                at: Utc::now(),
            });
        }
        Status::permission_denied(reason)
    }
}

/// RESOURCE_EXHAUSTED for a call over its budget, with a `google.rpc.RetryInfo` saying when
/// to try again (the message says it too).
fn resource_exhausted(message: String, retry_after: std::time::Duration) -> Status {
    use tonic_types::{ErrorDetails, StatusExt};
    Status::with_error_details(
        tonic::Code::ResourceExhausted,
        message,
        ErrorDetails::with_retry_info(Some(retry_after)),
    )
}

/// The span of one RPC, a child of the caller's span when it sent a `traceparent`. At
/// DEBUG level: exported when an OTLP endpoint is set, shown in logs with
/// `RUST_LOG=countersign::rpc=debug`, and otherwise disabled, which costs next to nothing.
fn rpc_span<B>(request: &http::Request<B>) -> tracing::Span {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let path = request.uri().path();
    let name = path.trim_start_matches('/');
    let (service, method) = name.split_once('/').unwrap_or((name, ""));
    let span = tracing::debug_span!(
        target: crate::telemetry::RPC_TARGET,
        "rpc",
        otel.name = name,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
    );
    if !span.is_disabled() && crate::telemetry::rpc_tracing() {
        let _ = span.set_parent(crate::telemetry::remote_context(request.headers()));
    }
    span
}

// === impl GuardLayer ===

impl GuardLayer {
    /// The request with its caller's identity and grants attached, or the refusal.
    fn admit<B>(&self, request: http::Request<B>) -> Result<http::Request<B>, Status> {
        let (mut parts, body) = request.into_parts();
        let rpc = parts.uri.path().to_string();
        // The authenticators read metadata and the connection (peer certificates) through a
        // tonic request; move the parts in and back out, copying nothing.
        let call = tonic::Request::from_parts(
            MetadataMap::from_headers(std::mem::take(&mut parts.headers)),
            std::mem::take(&mut parts.extensions),
            (),
        );
        let peer = call.remote_addr().map(|addr| addr.ip());
        let refuse = |status: DeniedAs, principal, reason: String| {
            self.denials.report(Denial {
                status,
                rpc: rpc.clone(),
                peer,
                principal,
                reason,
                at: Utc::now(),
            });
        };

        let context: AuthContext = self
            .authenticator
            .authenticate_context(&call)
            .inspect_err(|e: &AuthError| refuse(DeniedAs::Unauthenticated, None, e.to_string()))?;
        // Before the role: refusals spend the budget too, or they would be free to repeat.
        if let (Some(limiter), Some(budget)) = (&self.limiter, Budget::of(&rpc))
            && let Err(limited) =
                limiter.admit(&context.principal.id, budget, std::time::Instant::now())
        {
            let message = limited.message(&context.principal.id);
            refuse(
                DeniedAs::ResourceExhausted,
                Some(context.principal.clone()),
                message.clone(),
            );
            return Err(resource_exhausted(message, limited.retry_after));
        }
        let (grants, role_refusal) = match self.roles.authorize(&rpc, &context.principal) {
            Ok(grants) => (grants, None),
            Err(denied) if roles::refused_on_record(&rpc) => (
                self.roles.grants(&context.principal),
                Some(denied.to_string()),
            ),
            Err(denied) => {
                let reason = denied.to_string();
                refuse(
                    DeniedAs::PermissionDenied,
                    Some(context.principal.clone()),
                    reason.clone(),
                );
                return Err(Status::permission_denied(reason));
            }
        };

        let (metadata, mut extensions, ()) = call.into_parts();
        // Behind an Arc: handlers take a `Refuser` on every call, refused or not.
        extensions.insert(Arc::new(Admitted {
            rpc,
            peer,
            denials: self.denials.clone(),
            principal: context.principal.clone(),
        }));
        // Also clears an ActingFor a call without one could otherwise carry.
        context.insert_into(&mut extensions);
        extensions.insert(grants);
        match role_refusal {
            Some(reason) => extensions.insert(RoleRefusal(reason)),
            None => extensions.remove::<RoleRefusal>(),
        };
        parts.headers = metadata.into_headers();
        parts.extensions = extensions;
        Ok(http::Request::from_parts(parts, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::development::{DevelopmentIdentity, KIND_HEADER, PRINCIPAL_HEADER};
    use crate::auth::roles::RolesConfig;
    use crate::auth::{ActingFor, acting_for, grants, principal};

    /// The handler behind the guard: answers with what the guard left for it.
    #[derive(Clone)]
    struct Echo;

    impl NamedService for Echo {
        const NAME: &'static str = "countersign.v1.AuditService";
    }

    impl Service<http::Request<()>> for Echo {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<http::Response<Body>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<()>) -> Self::Future {
            let request = tonic::Request::from_http(request);
            let who = principal(&request).map(|p| p.id).unwrap_or_default();
            let stale = acting_for(&request).is_some();
            let answer = http::Response::builder()
                .header("who", who)
                .header("auditor", grants(&request).auditor.to_string())
                .header("acting-for", stale.to_string())
                .body(Body::empty());
            std::future::ready(Ok(answer.unwrap()))
        }
    }

    fn guard() -> (Guard<Echo>, tokio::sync::mpsc::Receiver<Denial>) {
        let (denials, refused) = DenialReporter::new();
        let roles = Roles::new(RolesConfig::default()).unwrap();
        let layer = GuardLayer::new(Arc::new(DevelopmentIdentity), Arc::new(roles), denials);
        (layer.layer(Echo), refused)
    }

    fn call(path: &str, headers: &[(&str, &str)]) -> http::Request<()> {
        let mut request = http::Request::builder().uri(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let mut request = request.body(()).unwrap();
        // Nothing a client sends can become an extension, but make sure a stale one would
        // not survive the guard either.
        request.extensions_mut().insert(ActingFor {
            human: "mallory".into(),
            asserted: false,
        });
        request
    }

    fn grpc_status(response: &http::Response<Body>) -> Option<&str> {
        response
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
    }

    #[tokio::test]
    async fn an_admitted_call_reaches_the_handler_with_identity_and_grants() {
        let (mut guard, mut refused) = guard();
        let response = guard
            .call(call(
                "/countersign.v1.AuditService/VerifyLog",
                &[
                    (PRINCIPAL_HEADER, "erin"),
                    ("x-countersign-groups", "auditors"),
                ],
            ))
            .await
            .unwrap();
        assert_eq!(grpc_status(&response), None);
        assert_eq!(response.headers()["who"], "erin");
        assert_eq!(response.headers()["auditor"], "true");
        assert_eq!(response.headers()["acting-for"], "false");
        assert!(refused.try_recv().is_err());
    }

    #[tokio::test]
    async fn the_wrong_role_is_permission_denied_and_reported() {
        let (mut guard, mut refused) = guard();
        let response = guard
            .call(call(
                "/countersign.v1.AuditService/ReadEvents",
                &[(PRINCIPAL_HEADER, "alice"), (KIND_HEADER, "human")],
            ))
            .await
            .unwrap();
        assert_eq!(grpc_status(&response), Some("7"));
        let denial = refused.try_recv().unwrap();
        assert_eq!(denial.status, DeniedAs::PermissionDenied);
        assert_eq!(denial.rpc, "/countersign.v1.AuditService/ReadEvents");
        assert_eq!(denial.principal.map(|p| p.id), Some("alice".into()));
    }

    #[tokio::test]
    async fn no_identity_is_unauthenticated_and_reported() {
        let (mut guard, mut refused) = guard();
        let response = guard
            .call(call("/countersign.v1.AuditService/VerifyLog", &[]))
            .await
            .unwrap();
        assert_eq!(grpc_status(&response), Some("16"));
        let denial = refused.try_recv().unwrap();
        assert_eq!(denial.status, DeniedAs::Unauthenticated);
        assert_eq!(denial.principal, None);
    }
}
