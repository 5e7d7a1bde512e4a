//! Keys are generated and tokens signed inside the tests; nothing is read from the network
//! or committed as a fixture.

use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{EncodingKey, Header};
use rand_core::{OsRng, RngCore as _};
use serde_json::{Value, json};

use super::*;

pub(crate) const ISS: &str = "https://idp.example.com";
pub(crate) const AUD: &str = "countersign";

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// Claims of a valid token for `sub`: right issuer and audience, expiring in 5 minutes.
pub(crate) fn claims(sub: &str) -> Value {
    json!({"iss": ISS, "aud": AUD, "sub": sub, "iat": now(), "exp": now() + 300})
}

/// A signing key pair with its public half as PEM and as a JWK.
pub(crate) struct Issuer {
    alg: Algorithm,
    /// PKCS#1 DER for RSA, PKCS#8 DER for EC and Ed25519 (what jsonwebtoken signs with).
    private_der: Vec<u8>,
    pub(crate) public_pem: String,
    pub(crate) jwk: Value,
    /// Put into the token header when set.
    kid: Option<String>,
}

/// RSA key generation is slow in debug builds: one key for the whole test binary.
fn rsa_issuer() -> &'static Issuer {
    static RSA: OnceLock<Issuer> = OnceLock::new();
    RSA.get_or_init(|| {
        use rsa::pkcs1::EncodeRsaPrivateKey as _;
        use rsa::pkcs8::{EncodePublicKey as _, LineEnding};
        use rsa::traits::PublicKeyParts as _;
        let private = rsa::RsaPrivateKey::new(&mut OsRng, 2048).unwrap();
        let public = rsa::RsaPublicKey::from(&private);
        Issuer {
            alg: Algorithm::RS256,
            private_der: private.to_pkcs1_der().unwrap().as_bytes().to_vec(),
            public_pem: public.to_public_key_pem(LineEnding::LF).unwrap(),
            jwk: json!({
                "kty": "RSA", "use": "sig", "alg": "RS256",
                "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
                "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
            }),
            kid: None,
        }
    })
}

impl Issuer {
    pub(crate) fn rsa() -> Issuer {
        let shared = rsa_issuer();
        Issuer {
            alg: shared.alg,
            private_der: shared.private_der.clone(),
            public_pem: shared.public_pem.clone(),
            jwk: shared.jwk.clone(),
            kid: None,
        }
    }

    pub(crate) fn p256() -> Issuer {
        use p256::elliptic_curve::sec1::ToEncodedPoint as _;
        use p256::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _, LineEnding};
        let secret = p256::SecretKey::random(&mut OsRng);
        let public = secret.public_key();
        let point = public.to_encoded_point(false);
        Issuer {
            alg: Algorithm::ES256,
            private_der: secret.to_pkcs8_der().unwrap().as_bytes().to_vec(),
            public_pem: public.to_public_key_pem(LineEnding::LF).unwrap(),
            jwk: json!({
                "kty": "EC", "crv": "P-256",
                "x": URL_SAFE_NO_PAD.encode(point.x().unwrap()),
                "y": URL_SAFE_NO_PAD.encode(point.y().unwrap()),
            }),
            kid: None,
        }
    }

    pub(crate) fn ed25519() -> Issuer {
        use ed25519_dalek::pkcs8::{
            EncodePrivateKey as _, EncodePublicKey as _, spki::der::pem::LineEnding,
        };
        let mut seed = [0u8; 32];
        OsRng.fill_bytes(&mut seed);
        let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
        let public = signing.verifying_key();
        Issuer {
            alg: Algorithm::EdDSA,
            private_der: signing.to_pkcs8_der().unwrap().as_bytes().to_vec(),
            public_pem: public.to_public_key_pem(LineEnding::LF).unwrap(),
            jwk: json!({
                "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA",
                "x": URL_SAFE_NO_PAD.encode(public.as_bytes()),
            }),
            kid: None,
        }
    }

    pub(crate) fn with_kid(mut self, kid: &str) -> Issuer {
        self.kid = Some(kid.into());
        self.jwk["kid"] = json!(kid);
        self
    }

    fn encoding_key(&self) -> EncodingKey {
        match self.alg {
            Algorithm::RS256 => EncodingKey::from_rsa_der(&self.private_der),
            Algorithm::ES256 => EncodingKey::from_ec_der(&self.private_der),
            _ => EncodingKey::from_ed_der(&self.private_der),
        }
    }

    pub(crate) fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(self.alg);
        header.kid = self.kid.clone();
        jsonwebtoken::encode(&header, claims, &self.encoding_key()).unwrap()
    }

    /// An authenticator trusting this key as a PEM file, with the default settings.
    pub(crate) fn authenticator(&self) -> JwtAuthenticator {
        self.authenticator_with(|_| {})
    }

    pub(crate) fn authenticator_with(
        &self,
        change: impl FnOnce(&mut JwtConfig),
    ) -> JwtAuthenticator {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("issuer.pem"), &self.public_pem).unwrap();
        let mut config = JwtConfig::new(ISS, AUD);
        config.public_keys.push(PublicKeyFile {
            path: "issuer.pem".into(),
            kid: self.kid.clone(),
        });
        change(&mut config);
        JwtAuthenticator::from_config(&config, dir.path()).unwrap()
    }
}

/// Ok principal, or the error with a check that it does not quote the token.
fn check(auth: &JwtAuthenticator, token: &str) -> Result<AuthContext, AuthError> {
    auth.verify(token).inspect_err(|err| {
        let message = err.to_string();
        for part in token.split('.').filter(|p| p.len() > 3) {
            assert!(!message.contains(part), "error quotes the token: {message}");
        }
    })
}

fn reason(auth: &JwtAuthenticator, token: &str) -> String {
    match check(auth, token) {
        Ok(context) => panic!("accepted: {context:?}"),
        Err(AuthError::Invalid(reason)) => reason,
        Err(other) => panic!("not Invalid: {other}"),
    }
}

fn unsigned(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

// === valid tokens ===

#[test]
fn valid_tokens_of_each_algorithm_make_the_principal() {
    for issuer in [Issuer::rsa(), Issuer::p256(), Issuer::ed25519()] {
        let auth = issuer.authenticator();
        let mut c = claims("alice@example.com");
        c["countersign_kind"] = json!("human");
        c["groups"] = json!(["sre", "reviewers", "sre"]);
        let context = check(&auth, &issuer.sign(&c)).unwrap();
        let p = context.principal;
        assert_eq!(p.id, "alice@example.com", "{:?}", issuer.alg);
        assert_eq!(p.kind, PrincipalKind::Human);
        assert_eq!(p.groups, vec!["reviewers", "sre"]);
        assert_eq!(p.authenticated_by, "jwt:https://idp.example.com");
        assert_eq!(context.acting_for, None);
    }
}

#[test]
fn the_kind_defaults_to_the_configured_kind_and_unknown_kinds_are_refused() {
    let issuer = Issuer::ed25519();
    let p = check(&issuer.authenticator(), &issuer.sign(&claims("deployer")))
        .unwrap()
        .principal;
    assert_eq!(p.kind, PrincipalKind::Agent);
    assert!(p.groups.is_empty());

    let humans = issuer.authenticator_with(|c| c.default_kind = PrincipalKind::Human);
    let p = check(&humans, &issuer.sign(&claims("alice")))
        .unwrap()
        .principal;
    assert_eq!(p.kind, PrincipalKind::Human);

    let mut c = claims("deployer");
    c["countersign_kind"] = json!("admin");
    assert_eq!(
        reason(&issuer.authenticator(), &issuer.sign(&c)),
        "claim `countersign_kind` must be `agent` or `human`"
    );
}

#[test]
fn groups_may_be_a_space_separated_string_and_claim_names_are_configurable() {
    let issuer = Issuer::p256();
    let mut c = claims("ignored");
    c["email"] = json!("bob@example.com");
    c["roles"] = json!("dev  ops dev");
    c["typ_kind"] = json!("human");
    let auth = issuer.authenticator_with(|config| {
        config.id_claim = "email".into();
        config.groups_claim = "roles".into();
        config.kind_claim = "typ_kind".into();
    });
    let p = check(&auth, &issuer.sign(&c)).unwrap().principal;
    assert_eq!(p.id, "bob@example.com");
    assert_eq!(p.groups, vec!["dev", "ops"]);
    assert_eq!(p.kind, PrincipalKind::Human);
}

#[test]
fn malformed_ids_and_groups_are_refused() {
    let issuer = Issuer::ed25519();
    let auth = issuer.authenticator();
    let mut c = claims("deployer");
    c["groups"] = json!(["ok", 7]);
    assert!(reason(&auth, &issuer.sign(&c)).contains("claim `groups`"));
    c["groups"] = json!({"a": 1});
    assert!(reason(&auth, &issuer.sign(&c)).contains("claim `groups`"));
    c["groups"] = json!((0..=64).map(|i| format!("g{i}")).collect::<Vec<_>>());
    assert!(reason(&auth, &issuer.sign(&c)).contains("at most 64 groups"));
    let mut c = claims("has space");
    assert!(reason(&auth, &issuer.sign(&c)).contains("claim `sub`"));
    c.as_object_mut().unwrap().remove("sub");
    assert_eq!(reason(&auth, &issuer.sign(&c)), "token has no `sub` claim");
}

// === time, issuer, audience ===

#[test]
fn an_expired_token_is_refused_but_the_leeway_absorbs_small_skew() {
    let issuer = Issuer::ed25519();
    let auth = issuer.authenticator();
    let mut c = claims("deployer");
    c["exp"] = json!(now() - 120);
    assert_eq!(reason(&auth, &issuer.sign(&c)), "token expired");
    c["exp"] = json!(now() - 10);
    assert!(check(&auth, &issuer.sign(&c)).is_ok());
    let strict = issuer.authenticator_with(|c| c.leeway_seconds = 0);
    assert_eq!(reason(&strict, &issuer.sign(&c)), "token expired");
}

#[test]
fn a_token_not_yet_valid_is_refused() {
    let issuer = Issuer::ed25519();
    let mut c = claims("deployer");
    c["nbf"] = json!(now() + 120);
    assert_eq!(
        reason(&issuer.authenticator(), &issuer.sign(&c)),
        "token not yet valid"
    );
}

#[test]
fn a_token_without_exp_is_refused() {
    let issuer = Issuer::p256();
    let mut c = claims("deployer");
    c.as_object_mut().unwrap().remove("exp");
    assert_eq!(
        reason(&issuer.authenticator(), &issuer.sign(&c)),
        "token has no `exp` claim"
    );
    // A non-numeric exp is as good as none.
    c["exp"] = json!("tomorrow");
    assert!(reason(&issuer.authenticator(), &issuer.sign(&c)).contains("`exp`"));
}

#[test]
fn a_wrong_or_ambiguous_issuer_is_refused() {
    let issuer = Issuer::ed25519();
    let auth = issuer.authenticator();
    let mut c = claims("deployer");
    c["iss"] = json!("https://idp.example.com.evil");
    assert_eq!(reason(&auth, &issuer.sign(&c)), "wrong issuer");
    c["iss"] = json!([ISS, "https://other"]);
    assert_eq!(reason(&auth, &issuer.sign(&c)), "wrong issuer");
    c.as_object_mut().unwrap().remove("iss");
    assert_eq!(reason(&auth, &issuer.sign(&c)), "token has no `iss` claim");
}

#[test]
fn the_audience_must_be_among_the_tokens() {
    let issuer = Issuer::ed25519();
    let auth = issuer.authenticator();
    let mut c = claims("deployer");
    c["aud"] = json!("another-service");
    assert_eq!(reason(&auth, &issuer.sign(&c)), "wrong audience");
    c["aud"] = json!(["another-service", AUD]);
    assert!(check(&auth, &issuer.sign(&c)).is_ok());
    c.as_object_mut().unwrap().remove("aud");
    assert_eq!(reason(&auth, &issuer.sign(&c)), "token has no `aud` claim");
}

// === signatures and algorithms ===

#[test]
fn a_token_signed_by_another_key_does_not_verify() {
    for (trusted, other) in [
        (Issuer::p256(), Issuer::p256()),
        (Issuer::ed25519(), Issuer::ed25519()),
    ] {
        let token = other.sign(&claims("deployer"));
        assert_eq!(
            reason(&trusted.authenticator(), &token),
            "signature does not verify"
        );
    }
    // A tampered payload under a genuine signature.
    let issuer = Issuer::rsa();
    let token = issuer.sign(&claims("deployer"));
    let parts: Vec<&str> = token.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(claims("admin").to_string()),
        parts[2]
    );
    assert_eq!(
        reason(&issuer.authenticator(), &forged),
        "signature does not verify"
    );
}

#[test]
fn alg_none_is_refused() {
    let issuer = Issuer::ed25519();
    let auth = issuer.authenticator();
    for alg in ["none", "None", "NONE"] {
        let token = unsigned(&json!({"alg": alg, "typ": "JWT"}), &claims("admin"), b"");
        assert_eq!(
            reason(&auth, &token),
            "algorithm not allowed (RS256, ES256 or EdDSA)"
        );
    }
}

#[test]
fn hs256_keyed_with_the_public_key_is_refused() {
    let issuer = Issuer::rsa();
    let auth = issuer.authenticator();
    let key = EncodingKey::from_secret(issuer.public_pem.as_bytes());
    let token =
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims("admin"), &key).unwrap();
    assert_eq!(
        reason(&auth, &token),
        "algorithm not allowed (RS256, ES256 or EdDSA)"
    );
}

#[test]
fn an_algorithm_other_than_the_keys_is_refused() {
    // An RSA-only verifier and a genuine ES256 token.
    let rsa = Issuer::rsa();
    let ec = Issuer::p256();
    assert_eq!(
        reason(&rsa.authenticator(), &ec.sign(&claims("deployer"))),
        "algorithm does not match the key"
    );
    // An ES256 header over an RS256 signature.
    let token = rsa.sign(&claims("deployer"));
    let signature = token.rsplit('.').next().unwrap();
    let relabelled = format!(
        "{}.{}.{signature}",
        URL_SAFE_NO_PAD.encode(json!({"alg": "ES256"}).to_string()),
        URL_SAFE_NO_PAD.encode(claims("deployer").to_string()),
    );
    assert_eq!(
        reason(&rsa.authenticator(), &relabelled),
        "algorithm does not match the key"
    );
    // Algorithms outside RS256/ES256/EdDSA, even for a key of the same family.
    let token = unsigned(&json!({"alg": "PS256"}), &claims("deployer"), b"sig");
    assert_eq!(
        reason(&rsa.authenticator(), &token),
        "algorithm not allowed (RS256, ES256 or EdDSA)"
    );
}

#[test]
fn critical_header_extensions_and_garbage_are_refused() {
    let issuer = Issuer::ed25519();
    let auth = issuer.authenticator();
    let token = unsigned(
        &json!({"alg": "EdDSA", "crit": ["exp"], "exp": 1}),
        &claims("deployer"),
        b"sig",
    );
    assert_eq!(
        reason(&auth, &token),
        "token header has unsupported critical extensions"
    );
    for garbage in ["a.b.c", "....", "", "eyJhbGciOiJFZERTQSJ9.!!.x"] {
        assert!(check(&auth, garbage).is_err(), "{garbage}");
    }
}

#[test]
fn an_oversized_token_is_refused_before_decoding() {
    let issuer = Issuer::ed25519();
    let mut c = claims("deployer");
    c["padding"] = json!("x".repeat(MAX_CREDENTIAL_BYTES));
    let token = issuer.sign(&c);
    assert!(token.len() > MAX_CREDENTIAL_BYTES);
    assert_eq!(
        reason(&issuer.authenticator(), &token),
        format!("token longer than {MAX_CREDENTIAL_BYTES} bytes")
    );
}

// === JWKS and key ids ===

fn jwks_authenticator(jwks: &Value) -> Result<JwtAuthenticator, AuthConfigError> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), jwks.to_string()).unwrap();
    let mut config = JwtConfig::new(ISS, AUD);
    config.jwks_file = Some("jwks.json".into());
    JwtAuthenticator::from_config(&config, dir.path())
}

#[test]
fn jwks_keys_are_matched_by_kid() {
    let rsa = Issuer::rsa().with_kid("rsa-1");
    let ec = Issuer::p256().with_kid("ec-1");
    let ed = Issuer::ed25519().with_kid("ed-1");
    let auth = jwks_authenticator(&json!({"keys": [
        rsa.jwk, ec.jwk, ed.jwk,
        // Skipped: encryption key, symmetric key, other curve.
        {"kty": "RSA", "use": "enc", "kid": "enc-1", "n": "AQAB", "e": "AQAB"},
        {"kty": "oct", "kid": "hmac-1", "k": "c2VjcmV0"},
        {"kty": "EC", "crv": "P-384", "kid": "p384-1", "x": "AA", "y": "AA"},
    ]}))
    .unwrap();
    for issuer in [&rsa, &ec, &ed] {
        assert!(check(&auth, &issuer.sign(&claims("deployer"))).is_ok());
    }
    // The right key under the wrong kid: the named key's algorithm does not match.
    let liar = Issuer::ed25519().with_kid("rsa-1");
    assert_eq!(
        reason(&auth, &liar.sign(&claims("deployer"))),
        "algorithm does not match the key"
    );
}

#[test]
fn a_kid_not_in_the_jwks_is_refused() {
    let known = Issuer::ed25519().with_kid("ed-1");
    let auth = jwks_authenticator(&json!({"keys": [known.jwk]})).unwrap();
    let stranger = Issuer::ed25519().with_kid("ed-2");
    assert_eq!(
        reason(&auth, &stranger.sign(&claims("deployer"))),
        "unknown key id"
    );
}

#[test]
fn a_token_without_kid_is_tried_against_every_key_of_its_algorithm() {
    let a = Issuer::ed25519().with_kid("a");
    let b = Issuer::ed25519().with_kid("b");
    let auth = jwks_authenticator(&json!({"keys": [a.jwk, b.jwk]})).unwrap();
    let mut anonymous = Issuer::ed25519();
    anonymous.private_der = b.private_der.clone();
    assert!(check(&auth, &anonymous.sign(&claims("deployer"))).is_ok());
}

#[test]
fn a_jwks_with_private_keys_or_no_usable_key_is_refused() {
    let ed = Issuer::ed25519();
    let mut private = ed.jwk.clone();
    private["d"] = json!("c2VjcmV0");
    let err = jwks_authenticator(&json!({"keys": [private]})).unwrap_err();
    assert!(err.to_string().contains("private key material"), "{err}");
    assert!(!err.to_string().contains("c2VjcmV0"), "{err}");
    let err = jwks_authenticator(&json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]})).unwrap_err();
    assert!(err.to_string().contains("no usable signing key"), "{err}");
    let err = jwks_authenticator(&json!({"keys": [
        {"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}
    ]}))
    .unwrap_err();
    assert!(err.to_string().contains("32 bytes"), "{err}");
    let err = jwks_authenticator(&json!({"keys": [
        {"kty": "EC", "crv": "P-256", "x": URL_SAFE_NO_PAD.encode([1u8; 32]), "y": URL_SAFE_NO_PAD.encode([2u8; 32])}
    ]}))
    .unwrap_err();
    assert!(err.to_string().contains("not a point on P-256"), "{err}");
    let err = jwks_authenticator(&json!({"keys": [
        {"kty": "RSA", "n": URL_SAFE_NO_PAD.encode([0xffu8; 128]), "e": "AQAB"}
    ]}))
    .unwrap_err();
    assert!(err.to_string().contains("shorter than 2048 bits"), "{err}");
    assert!(jwks_authenticator(&json!({"nope": []})).is_err());
}

// === acting for a human ===

#[test]
fn an_act_claim_makes_the_actor_the_caller_and_the_subject_the_human() {
    let issuer = Issuer::ed25519();
    let auth = issuer.authenticator();
    let mut c = claims("alice@example.com");
    // The human's groups and kind are not the agent's.
    c["groups"] = json!(["reviewers"]);
    c["countersign_kind"] = json!("human");
    c["act"] = json!({"sub": "deployer", "groups": ["agents"], "act": {"sub": "orchestrator"}});
    let context = check(&auth, &issuer.sign(&c)).unwrap();
    assert_eq!(context.principal.id, "deployer");
    assert_eq!(context.principal.kind, PrincipalKind::Agent);
    assert_eq!(context.principal.groups, vec!["agents"]);
    assert_eq!(
        context.acting_for,
        Some(ActingFor {
            human: "alice@example.com".into(),
            asserted: false
        })
    );
}

#[test]
fn a_configured_acting_for_claim_names_the_human() {
    let issuer = Issuer::p256();
    let auth = issuer.authenticator_with(|c| c.acting_for_claim = Some("on_behalf_of".into()));
    let mut c = claims("deployer");
    c["on_behalf_of"] = json!("alice@example.com");
    let context = check(&auth, &issuer.sign(&c)).unwrap();
    assert_eq!(context.principal.id, "deployer");
    assert_eq!(
        context.acting_for.map(|a| (a.human, a.asserted)),
        Some(("alice@example.com".into(), false))
    );
    // Without the setting the claim means nothing.
    let context = check(&issuer.authenticator(), &issuer.sign(&c)).unwrap();
    assert_eq!(context.acting_for, None);
}

#[test]
fn odd_delegations_are_refused() {
    let issuer = Issuer::ed25519();
    let auth = issuer.authenticator_with(|c| c.acting_for_claim = Some("on_behalf_of".into()));
    let cases = [
        (
            json!({"sub": "bob"}),
            "`act` naming a human caller",
            "only an agent may act for a human",
        ),
        (
            json!("deployer"),
            "`act` not an object",
            "claim `act` must be an object",
        ),
        (
            json!({"groups": []}),
            "`act` without sub",
            "token has no `act.sub` claim",
        ),
        (
            json!({"sub": "alice@example.com"}),
            "acting for itself",
            "a principal cannot act for itself",
        ),
        (
            json!({"sub": "deployer", "iss": "https://elsewhere"}),
            "actor of another issuer",
            "claim `act` names an actor of another issuer",
        ),
    ];
    for (act, case, expected) in cases {
        let mut c = claims("alice@example.com");
        c["act"] = act.clone();
        if case.contains("human caller") {
            c["act"]["countersign_kind"] = json!("human");
        }
        assert_eq!(reason(&auth, &issuer.sign(&c)), expected, "{case}");
    }
    let mut c = claims("alice@example.com");
    c["act"] = json!({"sub": "deployer"});
    c["on_behalf_of"] = json!("alice@example.com");
    assert!(reason(&auth, &issuer.sign(&c)).contains("twice"));
}

// === configuration ===

#[test]
fn key_file_problems_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let attempt = |file: &str, content: Option<&str>| {
        if let Some(content) = content {
            std::fs::write(dir.path().join(file), content).unwrap();
        }
        let mut config = JwtConfig::new(ISS, AUD);
        config.public_keys.push(PublicKeyFile {
            path: file.into(),
            kid: None,
        });
        JwtAuthenticator::from_config(&config, dir.path())
            .unwrap_err()
            .to_string()
    };
    let missing = attempt("missing.pem", None);
    assert!(
        missing.contains("missing.pem") && missing.contains("cannot read"),
        "{missing}"
    );

    let private_pem = {
        use ed25519_dalek::pkcs8::{EncodePrivateKey as _, spki::der::pem::LineEnding};
        ed25519_dalek::SigningKey::from_bytes(&[7u8; 32])
            .to_pkcs8_pem(LineEnding::LF)
            .unwrap()
            .to_string()
    };
    let private = attempt("private.pem", Some(&private_pem));
    assert!(
        private.contains("private.pem") && private.contains("private key"),
        "{private}"
    );
    assert!(!private.contains("BEGIN"), "{private}");

    let garbage = attempt("garbage.pem", Some("hello"));
    assert!(
        garbage.contains("garbage.pem") && garbage.contains("PUBLIC KEY"),
        "{garbage}"
    );
    let broken = attempt(
        "broken.pem",
        Some("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"),
    );
    assert!(broken.contains("broken.pem"), "{broken}");
}

#[test]
fn settings_are_checked_at_construction() {
    let issuer = Issuer::ed25519();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("k.pem"), &issuer.public_pem).unwrap();
    let base = || {
        let mut c = JwtConfig::new(ISS, AUD);
        c.public_keys.push(PublicKeyFile {
            path: "k.pem".into(),
            kid: None,
        });
        c
    };
    assert!(JwtAuthenticator::from_config(&base(), dir.path()).is_ok());
    let refused: [fn(&mut JwtConfig); 5] = [
        |c| c.issuer = " ".into(),
        |c| c.audience = String::new(),
        |c| c.leeway_seconds = 3600,
        |c| c.public_keys.clear(),
        |c| c.acting_for_claim = Some("act".into()),
    ];
    for change in refused {
        let mut c = base();
        change(&mut c);
        assert!(
            JwtAuthenticator::from_config(&c, dir.path()).is_err(),
            "{c:?}"
        );
    }
    let mut twice = base();
    twice.public_keys[0].kid = Some("k".into());
    twice.public_keys.push(twice.public_keys[0].clone());
    let err = JwtAuthenticator::from_config(&twice, dir.path()).unwrap_err();
    assert!(err.to_string().contains("configured twice"), "{err}");
}

#[test]
fn the_config_reads_from_toml_with_defaults_and_refuses_unknown_fields() {
    let config: JwtConfig = toml::from_str(
        r#"
        issuer = "https://idp.example.com"
        audience = "countersign"
        public_keys = [{ path = "keys/idp.pem", kid = "2026-01" }]
        jwks_file = "keys/jwks.json"
        "#,
    )
    .unwrap();
    assert_eq!(config.leeway_seconds, 30);
    assert_eq!(config.id_claim, "sub");
    assert_eq!(config.groups_claim, "groups");
    assert_eq!(config.kind_claim, "countersign_kind");
    assert_eq!(config.default_kind, PrincipalKind::Agent);
    assert_eq!(config.public_keys[0].kid.as_deref(), Some("2026-01"));
    assert!(
        toml::from_str::<JwtConfig>("issuer = \"a\"\naudience = \"b\"\nalgorithms = [\"HS256\"]")
            .is_err()
    );
}

#[test]
fn a_static_token_header_is_not_a_jwt() {
    let issuer = Issuer::ed25519();
    let mut request = Request::new(());
    request.metadata_mut().insert(
        "x-countersign-token",
        issuer.sign(&claims("deployer")).parse().unwrap(),
    );
    assert!(matches!(
        issuer.authenticator().authenticate(&request),
        Err(AuthError::Invalid(_))
    ));
    assert!(matches!(
        issuer.authenticator().authenticate(&Request::new(())),
        Err(AuthError::Missing(_))
    ));
}
