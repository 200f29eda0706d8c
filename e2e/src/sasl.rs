//! SASL in front of librdkafka's mock brokers, which speak none: what a Kafka broker with
//! `SASL_PLAINTEXT` or `SASL_SSL` listeners does at a connection's start, then the
//! connection's bytes forwarded to the mock unchanged.
//!
//! Per connection: the client's ApiVersions request goes to the mock, and its answer comes
//! back with SaslHandshake (v1) and SaslAuthenticate (v0–v1) added; the handshake and the
//! authentication are answered here, with Kafka's error codes (UNSUPPORTED_SASL_MECHANISM 33,
//! ILLEGAL_SASL_STATE 34, SASL_AUTHENTICATION_FAILED 58 and a message); any other request
//! before authentication closes the connection, as Kafka does. Mechanisms:
//!
//! - `PLAIN` (RFC 4616) and `SCRAM-SHA-256`/`SCRAM-SHA-512` (RFC 5802, RFC 7677) for the
//!   `users` of the configuration;
//! - `OAUTHBEARER` (RFC 7628, KIP-255): `n,,\x01auth=Bearer <jwt>\x01...\x01`, the JWT's
//!   signature verified with the issuer's public key (ES256 or RS256), its `exp`, `iss` and
//!   `aud` checked and a `sub` required. An OAUTHBEARER connection is closed when its token
//!   expires, as a broker with `connections.max.reauth.ms` closes a client that does not
//!   re-authenticate: a client that does not refresh its token fails its next connection.
//!
//! The handshake v0 (SASL tokens without Kafka framing) is not offered.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZeroU32;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::{digest, hmac, pbkdf2};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const API_VERSIONS: i16 = 18;
pub const SASL_HANDSHAKE: i16 = 17;
pub const SASL_AUTHENTICATE: i16 = 36;
pub const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
pub const ILLEGAL_SASL_STATE: i16 = 34;
pub const SASL_AUTHENTICATION_FAILED: i16 = 58;

const SCRAM_ITERATIONS: u32 = 4096;

/// The `--sasl FILE` of the test broker (JSON):
/// `{"users": {"name": "password"}, "oauthbearer": {"issuer": "...", "audience": "...",
/// "publicKeyPem": "-----BEGIN PUBLIC KEY-----..."}}`, either part optional.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SaslConfig {
    #[serde(default)]
    pub users: BTreeMap<String, String>,
    #[serde(default)]
    pub oauthbearer: Option<OAuthBearerConfig>,
}

#[derive(Deserialize, Serialize, Clone)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OAuthBearerConfig {
    pub issuer: String,
    pub audience: String,
    /// The issuer's signing key: an EC P-256 (ES256) or RSA (RS256) public key.
    pub public_key_pem: String,
}

impl fmt::Debug for SaslConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaslConfig")
            .field("users", &self.users.keys().collect::<Vec<_>>())
            .field("oauthbearer", &self.oauthbearer.as_ref().map(|o| &o.issuer))
            .finish()
    }
}

/// SCRAM's stored credentials of one user for one hash (RFC 5802 section 2.2): what a broker
/// keeps instead of the password.
struct ScramCredential {
    salt: Vec<u8>,
    iterations: u32,
    stored_key: Vec<u8>,
    server_key: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ScramHash {
    Sha256,
    Sha512,
}

impl ScramHash {
    fn hmac(self) -> hmac::Algorithm {
        match self {
            ScramHash::Sha256 => hmac::HMAC_SHA256,
            ScramHash::Sha512 => hmac::HMAC_SHA512,
        }
    }
    fn digest(self) -> &'static digest::Algorithm {
        match self {
            ScramHash::Sha256 => &digest::SHA256,
            ScramHash::Sha512 => &digest::SHA512,
        }
    }
    fn pbkdf2(self) -> pbkdf2::Algorithm {
        match self {
            ScramHash::Sha256 => pbkdf2::PBKDF2_HMAC_SHA256,
            ScramHash::Sha512 => pbkdf2::PBKDF2_HMAC_SHA512,
        }
    }
    fn len(self) -> usize {
        self.digest().output_len()
    }
    fn mechanism(self) -> &'static str {
        match self {
            ScramHash::Sha256 => "SCRAM-SHA-256",
            ScramHash::Sha512 => "SCRAM-SHA-512",
        }
    }
}

fn hmac(hash: ScramHash, key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hash.hmac(), key), data)
        .as_ref()
        .to_vec()
}

impl ScramCredential {
    fn new(hash: ScramHash, password: &str, salt: Vec<u8>, iterations: u32) -> Self {
        let mut salted = vec![0; hash.len()];
        pbkdf2::derive(
            hash.pbkdf2(),
            NonZeroU32::new(iterations).expect("iterations"),
            &salt,
            password.as_bytes(),
            &mut salted,
        );
        let client_key = hmac(hash, &salted, b"Client Key");
        ScramCredential {
            stored_key: digest::digest(hash.digest(), &client_key).as_ref().to_vec(),
            server_key: hmac(hash, &salted, b"Server Key"),
            salt,
            iterations,
        }
    }
}

/// What a broker knows to authenticate clients.
pub struct Authenticator {
    plain: BTreeMap<String, String>,
    scram: BTreeMap<(ScramHash, String), ScramCredential>,
    oauthbearer: Option<(
        OAuthBearerConfig,
        jsonwebtoken::DecodingKey,
        jsonwebtoken::Algorithm,
    )>,
}

impl Authenticator {
    pub fn new(config: &SaslConfig) -> anyhow::Result<Self> {
        let mut scram = BTreeMap::new();
        for (user, password) in &config.users {
            for hash in [ScramHash::Sha256, ScramHash::Sha512] {
                let salt: [u8; 16] = rand::random();
                scram.insert(
                    (hash, user.clone()),
                    ScramCredential::new(hash, password, salt.to_vec(), SCRAM_ITERATIONS),
                );
            }
        }
        let oauthbearer = match &config.oauthbearer {
            None => None,
            Some(o) => {
                let pem = o.public_key_pem.as_bytes();
                let (key, alg) = match jsonwebtoken::DecodingKey::from_ec_pem(pem) {
                    Ok(key) => (key, jsonwebtoken::Algorithm::ES256),
                    Err(_) => (
                        jsonwebtoken::DecodingKey::from_rsa_pem(pem)?,
                        jsonwebtoken::Algorithm::RS256,
                    ),
                };
                Some((o.clone(), key, alg))
            }
        };
        Ok(Authenticator {
            plain: config.users.clone(),
            scram,
            oauthbearer,
        })
    }

    /// The mechanisms offered, in the handshake's order.
    pub fn mechanisms(&self) -> Vec<&'static str> {
        let mut m = Vec::new();
        if !self.plain.is_empty() {
            m.extend(["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]);
        }
        if self.oauthbearer.is_some() {
            m.push("OAUTHBEARER");
        }
        m
    }

    /// A new exchange for `mechanism`, if offered.
    pub fn start(&self, mechanism: &str) -> Option<Exchange> {
        if !self.mechanisms().contains(&mechanism) {
            return None;
        }
        Some(match mechanism {
            "PLAIN" => Exchange::Plain,
            "SCRAM-SHA-256" => Exchange::Scram(ScramHash::Sha256, None),
            "SCRAM-SHA-512" => Exchange::Scram(ScramHash::Sha512, None),
            _ => Exchange::OAuthBearer,
        })
    }

    /// One step of `exchange` with the client's `message`.
    pub fn step(&self, exchange: &mut Exchange, message: &[u8]) -> Step {
        match exchange {
            Exchange::Plain => self.plain(message),
            Exchange::Scram(hash, state) => {
                let hash = *hash;
                match state.take() {
                    None => match self.scram_first(hash, message, random_nonce()) {
                        Ok((server_first, next)) => {
                            *state = Some(next);
                            Step::Continue(server_first.into_bytes())
                        }
                        Err(why) => Step::Failed(failure(hash.mechanism(), &why)),
                    },
                    Some(first) => match self.scram_final(hash, &first, message) {
                        Ok(server_final) => Step::Done {
                            response: server_final.into_bytes(),
                            principal: first.user,
                            expires: None,
                        },
                        Err(why) => Step::Failed(failure(hash.mechanism(), &why)),
                    },
                }
            }
            Exchange::OAuthBearer => match self.oauthbearer(message, SystemTime::now()) {
                Ok((principal, expires)) => Step::Done {
                    response: Vec::new(),
                    principal,
                    expires: Some(expires),
                },
                Err(why) => Step::Failed(failure("OAUTHBEARER", &why)),
            },
        }
    }

    /// RFC 4616: `[authzid] NUL authcid NUL passwd`.
    fn plain(&self, message: &[u8]) -> Step {
        let parts: Vec<&[u8]> = message.split(|b| *b == 0).collect();
        let ok = match parts.as_slice() {
            [authzid, user, password] => {
                let user = String::from_utf8_lossy(user);
                (authzid.is_empty() || **authzid == *user.as_bytes())
                    && self.plain.get(user.as_ref()).map(String::as_bytes) == Some(password)
            }
            _ => false,
        };
        if ok {
            Step::Done {
                response: Vec::new(),
                principal: String::from_utf8_lossy(parts[1]).into_owned(),
                expires: None,
            }
        } else {
            Step::Failed(failure("PLAIN", "invalid username or password"))
        }
    }

    /// The client-first message `gs2-header client-first-bare` (`n,,n=user,r=nonce`); returns
    /// the server-first message.
    fn scram_first(
        &self,
        hash: ScramHash,
        message: &[u8],
        server_nonce: String,
    ) -> Result<(String, ScramFirst), String> {
        let message = std::str::from_utf8(message).map_err(|_| "client-first is not UTF-8")?;
        // gs2-header: channel binding flag ("n" or "y": none is offered) and an authzid.
        let mut gs2 = message.splitn(3, ',');
        let (flag, authzid, bare) = (gs2.next(), gs2.next(), gs2.next());
        let (Some(flag), Some(authzid), Some(bare)) = (flag, authzid, bare) else {
            return Err("malformed client-first message".into());
        };
        if !(flag == "n" || flag == "y") {
            return Err(format!("channel binding {flag:?} is not supported"));
        }
        let attrs = attributes(bare);
        let user = attrs
            .get("n")
            .map(|n| n.replace("=2C", ",").replace("=3D", "="))
            .ok_or("client-first without a user name")?;
        if !authzid.is_empty() && authzid.strip_prefix("a=") != Some(user.as_str()) {
            return Err("authorization id differs from the user".into());
        }
        let client_nonce = attrs.get("r").ok_or("client-first without a nonce")?;
        let credential = self
            .scram
            .get(&(hash, user.clone()))
            .ok_or("invalid user credentials")?;
        let nonce = format!("{client_nonce}{server_nonce}");
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&credential.salt),
            credential.iterations
        );
        Ok((
            server_first.clone(),
            ScramFirst {
                user,
                gs2_header: format!("{flag},{authzid},"),
                client_first_bare: bare.to_string(),
                server_first,
                nonce,
            },
        ))
    }

    /// The client-final message `c=...,r=...,p=proof`: the proof checked against the stored
    /// key; returns the server-final message `v=signature`.
    fn scram_final(
        &self,
        hash: ScramHash,
        first: &ScramFirst,
        message: &[u8],
    ) -> Result<String, String> {
        let message = std::str::from_utf8(message).map_err(|_| "client-final is not UTF-8")?;
        let (without_proof, proof) = message
            .rsplit_once(",p=")
            .ok_or("client-final without a proof")?;
        let attrs = attributes(without_proof);
        if attrs.get("c").map(String::as_str) != Some(&B64.encode(&first.gs2_header)) {
            return Err("channel binding differs from the client-first message".into());
        }
        if attrs.get("r") != Some(&first.nonce) {
            return Err("nonce differs from the server-first message".into());
        }
        let proof = B64.decode(proof).map_err(|_| "proof is not base64")?;
        let credential = &self.scram[&(hash, first.user.clone())];
        let auth_message = format!(
            "{},{},{without_proof}",
            first.client_first_bare, first.server_first
        );
        let client_signature = hmac(hash, &credential.stored_key, auth_message.as_bytes());
        if proof.len() != client_signature.len() {
            return Err("invalid credentials".into());
        }
        let client_key: Vec<u8> = proof
            .iter()
            .zip(&client_signature)
            .map(|(p, s)| p ^ s)
            .collect();
        if digest::digest(hash.digest(), &client_key).as_ref() != credential.stored_key {
            return Err("invalid credentials".into());
        }
        let server_signature = hmac(hash, &credential.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }

    /// RFC 7628's client response `gs2-header \x01 auth=Bearer <token> \x01 (key=value
    /// \x01)* \x01`; returns the token's subject and when it expires.
    fn oauthbearer(&self, message: &[u8], now: SystemTime) -> Result<(String, SystemTime), String> {
        let Some((config, key, alg)) = &self.oauthbearer else {
            return Err("OAUTHBEARER is not enabled".into());
        };
        let token = bearer_token(message)?;
        let mut validation = jsonwebtoken::Validation::new(*alg);
        validation.set_issuer(&[&config.issuer]);
        validation.set_audience(&[&config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 0;
        // `exp` is checked below against `now`, so that tests can move the clock.
        validation.validate_exp = false;
        let data = jsonwebtoken::decode::<Claims>(&token, key, &validation)
            .map_err(|e| format!("invalid token: {e}"))?;
        let expires = UNIX_EPOCH + Duration::from_secs(data.claims.exp);
        if expires <= now {
            return Err("invalid token: expired".into());
        }
        Ok((data.claims.sub, expires))
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
}

/// The bearer token of an OAUTHBEARER client response.
fn bearer_token(message: &[u8]) -> Result<String, String> {
    let message = std::str::from_utf8(message).map_err(|_| "client response is not UTF-8")?;
    let (gs2, rest) = message
        .split_once('\u{1}')
        .ok_or("client response without key/value pairs")?;
    if !gs2.starts_with("n,") && !gs2.starts_with("y,") {
        return Err("client response without a GS2 header".into());
    }
    let body = rest
        .strip_suffix("\u{1}\u{1}")
        .or_else(|| (rest == "\u{1}").then_some(""))
        .ok_or("client response not ended by two separators")?;
    let mut token = None;
    for pair in body.split('\u{1}').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or("key without a value")?;
        if k == "auth" {
            let t = v
                .strip_prefix("Bearer ")
                .ok_or("auth is not a Bearer token")?;
            token = Some(t.trim().to_string());
        }
    }
    token.ok_or_else(|| "client response without auth".into())
}

fn failure(mechanism: &str, why: &str) -> String {
    // Kafka's own message, with why.
    format!(
        "Authentication failed during authentication due to invalid credentials with SASL mechanism {mechanism}: {why}"
    )
}

fn attributes(s: &str) -> BTreeMap<String, String> {
    s.split(',')
        .filter_map(|a| a.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn random_nonce() -> String {
    let bytes: [u8; 18] = rand::random();
    B64.encode(bytes)
}

pub struct ScramFirst {
    user: String,
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

/// One authentication in progress.
pub enum Exchange {
    Plain,
    Scram(ScramHash, Option<ScramFirst>),
    OAuthBearer,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Send this challenge and wait for the client's next message.
    Continue(Vec<u8>),
    /// Authenticated (a final response to send); `expires` ends the session.
    Done {
        response: Vec<u8>,
        principal: String,
        expires: Option<SystemTime>,
    },
    /// SASL_AUTHENTICATION_FAILED with this message.
    Failed(String),
}

// ---- Kafka framing -------------------------------------------------------------------------

/// Reads one size-delimited Kafka frame (without its size); `None` at the end of the stream.
pub async fn read_frame<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Option<Vec<u8>>> {
    let mut size = [0u8; 4];
    match s.read_exact(&mut size).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let size = i32::from_be_bytes(size);
    if !(0..=100 << 20).contains(&size) {
        return Err(std::io::Error::other(format!("frame size {size}")));
    }
    let mut frame = vec![0; size as usize];
    s.read_exact(&mut frame).await?;
    Ok(Some(frame))
}

pub async fn write_frame<S: AsyncWrite + Unpin>(s: &mut S, frame: &[u8]) -> std::io::Result<()> {
    let mut out = (frame.len() as i32).to_be_bytes().to_vec();
    out.extend_from_slice(frame);
    s.write_all(&out).await?;
    s.flush().await
}

/// A cursor over a message.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        let end = end.ok_or_else(|| format!("message ends before byte {}", self.pos + n))?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }
    fn i16(&mut self) -> Result<i16, String> {
        Ok(i16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn i32(&mut self) -> Result<i32, String> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn uvarint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.take(1)?[0];
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint too long".into())
    }
    /// A nullable STRING (int16 length).
    fn nullable_string(&mut self) -> Result<Option<String>, String> {
        let len = self.i16()?;
        if len < 0 {
            return Ok(None);
        }
        Ok(Some(
            String::from_utf8_lossy(self.take(len as usize)?).into_owned(),
        ))
    }
    /// BYTES (int32 length).
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let len = self.i32()?;
        if len < 0 {
            return Err("null bytes".into());
        }
        self.take(len as usize)
    }
    fn tagged_fields(&mut self) -> Result<(), String> {
        for _ in 0..self.uvarint()? {
            self.uvarint()?;
            let size = self.uvarint()? as usize;
            self.take(size)?;
        }
        Ok(())
    }
    fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }
}

fn put_uvarint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as i16).to_be_bytes());
    out.extend(s.as_bytes());
}

/// A request's header (v1: no tagged fields, as in every request answered here) and body.
#[derive(Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
    pub client_id: Option<String>,
    body: &'a [u8],
}

pub fn parse_request(frame: &[u8]) -> Result<Request<'_>, String> {
    let mut r = Reader::new(frame);
    let api_key = r.i16()?;
    let api_version = r.i16()?;
    let correlation_id = r.i32()?;
    let client_id = r.nullable_string()?;
    Ok(Request {
        api_key,
        api_version,
        correlation_id,
        client_id,
        body: r.rest(),
    })
}

/// SaslHandshake v1's mechanism.
pub fn handshake_mechanism(request: &Request) -> Result<String, String> {
    Reader::new(request.body)
        .nullable_string()?
        .ok_or_else(|| "null mechanism".into())
}

/// SaslHandshake response: error code and the mechanisms enabled.
pub fn handshake_response(correlation_id: i32, error: i16, mechanisms: &[&str]) -> Vec<u8> {
    let mut out = correlation_id.to_be_bytes().to_vec();
    out.extend(error.to_be_bytes());
    out.extend((mechanisms.len() as i32).to_be_bytes());
    for m in mechanisms {
        put_string(&mut out, m);
    }
    out
}

/// SaslAuthenticate v0/v1's auth bytes.
pub fn authenticate_bytes<'a>(request: &Request<'a>) -> Result<&'a [u8], String> {
    Reader::new(request.body).bytes()
}

/// SaslAuthenticate v0/v1 response.
pub fn authenticate_response(
    correlation_id: i32,
    version: i16,
    error: i16,
    message: Option<&str>,
    auth_bytes: &[u8],
    session_lifetime_ms: i64,
) -> Vec<u8> {
    let mut out = correlation_id.to_be_bytes().to_vec();
    out.extend(error.to_be_bytes());
    match message {
        Some(m) => put_string(&mut out, m),
        None => out.extend((-1i16).to_be_bytes()),
    }
    out.extend((auth_bytes.len() as i32).to_be_bytes());
    out.extend(auth_bytes);
    if version >= 1 {
        out.extend(session_lifetime_ms.to_be_bytes());
    }
    out
}

/// The mock's ApiVersions response (`version` of the request), listing SaslHandshake v1 and
/// SaslAuthenticate v0–v1 in place of whatever it said of them. An error response (an
/// unsupported version: the client retries with another) passes unchanged.
pub fn patch_api_versions(response: &[u8], version: i16) -> Result<Vec<u8>, String> {
    let flexible = version >= 3;
    let mut r = Reader::new(response);
    // The response header is v0 (no tagged fields) even for flexible versions (KIP-511).
    let correlation_id = r.i32()?;
    let error = r.i16()?;
    if error != 0 {
        return Ok(response.to_vec());
    }
    let count = if flexible {
        (r.uvarint()? as usize)
            .checked_sub(1)
            .ok_or("null api keys")?
    } else {
        r.i32()? as usize
    };
    let mut entries = Vec::new();
    for _ in 0..count {
        let start = r.pos;
        let key = r.i16()?;
        r.take(4)?;
        if flexible {
            r.tagged_fields()?;
        }
        if key != SASL_HANDSHAKE && key != SASL_AUTHENTICATE {
            entries.push(&response[start..r.pos]);
        }
    }
    let ours: Vec<Vec<u8>> = [(SASL_HANDSHAKE, 1i16, 1i16), (SASL_AUTHENTICATE, 0, 1)]
        .iter()
        .map(|(key, min, max)| {
            let mut e = [key.to_be_bytes(), min.to_be_bytes(), max.to_be_bytes()].concat();
            if flexible {
                e.push(0);
            }
            e
        })
        .collect();
    let mut out = correlation_id.to_be_bytes().to_vec();
    out.extend(error.to_be_bytes());
    let n = entries.len() + ours.len();
    if flexible {
        put_uvarint(&mut out, n as u64 + 1);
    } else {
        out.extend((n as i32).to_be_bytes());
    }
    for e in entries {
        out.extend(e);
    }
    for e in &ours {
        out.extend(e);
    }
    out.extend(r.rest());
    Ok(out)
}

/// How a connection's authentication ended.
#[derive(Debug)]
pub enum Outcome {
    /// Authenticated as `principal`; forward the rest until `expires`.
    Authenticated {
        principal: String,
        mechanism: String,
        expires: Option<SystemTime>,
    },
    /// The client failed, or spoke out of turn, or left: close the connection.
    Closed(String),
}

/// Runs a connection's start: ApiVersions through `upstream` (patched), the handshake and the
/// authentication answered from `auth`.
pub async fn authenticate<C, U>(client: &mut C, upstream: &mut U, auth: &Authenticator) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    match authenticate_inner(client, upstream, auth).await {
        Ok(outcome) => outcome,
        Err(e) => Outcome::Closed(e),
    }
}

async fn authenticate_inner<C, U>(
    client: &mut C,
    upstream: &mut U,
    auth: &Authenticator,
) -> Result<Outcome, String>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let io = |e: std::io::Error| e.to_string();
    let mut exchange: Option<(String, Exchange)> = None;
    loop {
        let Some(frame) = read_frame(client).await.map_err(io)? else {
            return Ok(Outcome::Closed("the client closed the connection".into()));
        };
        let request = parse_request(&frame)?;
        let id = request.correlation_id;
        match request.api_key {
            API_VERSIONS => {
                write_frame(upstream, &frame).await.map_err(io)?;
                let answer = read_frame(upstream)
                    .await
                    .map_err(io)?
                    .ok_or("the broker closed the connection")?;
                let patched = patch_api_versions(&answer, request.api_version)?;
                write_frame(client, &patched).await.map_err(io)?;
            }
            SASL_HANDSHAKE if request.api_version == 1 => {
                let mechanism = handshake_mechanism(&request)?;
                let offered = auth.mechanisms();
                match auth.start(&mechanism) {
                    Some(started) => {
                        write_frame(client, &handshake_response(id, 0, &offered))
                            .await
                            .map_err(io)?;
                        exchange = Some((mechanism, started));
                    }
                    None => {
                        let answer = handshake_response(id, UNSUPPORTED_SASL_MECHANISM, &offered);
                        write_frame(client, &answer).await.map_err(io)?;
                        return Ok(Outcome::Closed(format!(
                            "mechanism {mechanism:?} is not enabled"
                        )));
                    }
                }
            }
            SASL_AUTHENTICATE if request.api_version <= 1 => {
                let v = request.api_version;
                let Some((mechanism, current)) = exchange.as_mut() else {
                    let message = "SaslAuthenticate before SaslHandshake";
                    let answer =
                        authenticate_response(id, v, ILLEGAL_SASL_STATE, Some(message), &[], 0);
                    write_frame(client, &answer).await.map_err(io)?;
                    return Ok(Outcome::Closed(message.into()));
                };
                match auth.step(current, authenticate_bytes(&request)?) {
                    Step::Continue(challenge) => {
                        let answer = authenticate_response(id, v, 0, None, &challenge, 0);
                        write_frame(client, &answer).await.map_err(io)?;
                    }
                    Step::Done {
                        response,
                        principal,
                        expires,
                    } => {
                        // No session lifetime: the client is not asked to re-authenticate
                        // (the connection is closed at `expires` instead).
                        let answer = authenticate_response(id, v, 0, None, &response, 0);
                        write_frame(client, &answer).await.map_err(io)?;
                        return Ok(Outcome::Authenticated {
                            principal,
                            mechanism: mechanism.clone(),
                            expires,
                        });
                    }
                    Step::Failed(message) => {
                        let answer = authenticate_response(
                            id,
                            v,
                            SASL_AUTHENTICATION_FAILED,
                            Some(&message),
                            &[],
                            0,
                        );
                        write_frame(client, &answer).await.map_err(io)?;
                        return Ok(Outcome::Closed(message));
                    }
                }
            }
            key => {
                // (The mock cluster's own client, which learns the advertised addresses from
                // metadata, is one that connects here without SASL.)
                return Ok(Outcome::Closed(format!(
                    "unexpected request (api key {key} v{}, client id {:?}) before authentication",
                    request.api_version, request.client_id
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn users() -> Authenticator {
        let config: SaslConfig =
            serde_json::from_value(serde_json::json!({"users": {"user": "pencil"}})).unwrap();
        Authenticator::new(&config).unwrap()
    }

    #[test]
    fn plain_checks_the_password() {
        let auth = users();
        let mut ex = auth.start("PLAIN").unwrap();
        assert!(matches!(
            auth.step(&mut ex, b"\0user\0pencil"),
            Step::Done { principal, .. } if principal == "user"
        ));
        for wrong in [
            &b"\0user\0pen"[..],
            b"\0nobody\0pencil",
            b"other\0user\0pencil",
            b"user",
        ] {
            let Step::Failed(message) = auth.step(&mut ex, wrong) else {
                panic!("{wrong:?} accepted")
            };
            assert!(message.starts_with("Authentication failed"), "{message}");
        }
    }

    /// RFC 7677 section 3's example exchange, byte for byte.
    #[test]
    fn scram_sha_256_follows_rfc_7677() {
        let mut auth = users();
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        auth.scram.insert(
            (ScramHash::Sha256, "user".into()),
            ScramCredential::new(ScramHash::Sha256, "pencil", salt, 4096),
        );
        let (server_first, first) = auth
            .scram_first(
                ScramHash::Sha256,
                b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
                "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into(),
            )
            .unwrap();
        assert_eq!(
            server_first,
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let client_final = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        assert_eq!(
            auth.scram_final(ScramHash::Sha256, &first, client_final.as_bytes()),
            Ok("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=".into())
        );
        // A proof from another password, or another nonce, fails.
        let wrong_proof = client_final.replace("p=dHzb", "p=dHzc");
        assert!(
            auth.scram_final(ScramHash::Sha256, &first, wrong_proof.as_bytes())
                .is_err()
        );
        let wrong_nonce = client_final.replace("k0,p=", "k1,p=");
        assert!(
            auth.scram_final(ScramHash::Sha256, &first, wrong_nonce.as_bytes())
                .is_err()
        );
        assert!(
            auth.scram_first(ScramHash::Sha256, b"n,,n=nobody,r=x", "y".into())
                .is_err()
        );
        assert!(
            auth.scram_first(ScramHash::Sha256, b"p=tls-unique,,n=user,r=x", "y".into())
                .is_err()
        );
    }

    #[test]
    fn oauthbearer_client_responses_are_parsed_per_rfc_7628() {
        assert_eq!(
            bearer_token(b"n,,\x01auth=Bearer abc.def.ghi\x01\x01"),
            Ok("abc.def.ghi".into())
        );
        assert_eq!(
            bearer_token(b"n,a=user,\x01host=h\x01auth=Bearer t\x01logicalCluster=lkc\x01\x01"),
            Ok("t".into())
        );
        for bad in [
            &b"n,,\x01auth=Basic dXNlcg==\x01\x01"[..],
            b"n,,\x01host=h\x01\x01",
            b"n,,\x01auth=Bearer t\x01",
            b"auth=Bearer t",
            b"\x01",
        ] {
            assert!(bearer_token(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn oauthbearer_tokens_are_verified() {
        let issuer = crate::oidc::Signer::generate("https://issuer", "kafka");
        let config = SaslConfig {
            users: BTreeMap::new(),
            oauthbearer: Some(issuer.verification()),
        };
        let auth = Authenticator::new(&config).unwrap();
        assert_eq!(auth.mechanisms(), ["OAUTHBEARER"]);
        let now = SystemTime::now();
        let message = |token: &str| format!("n,,\x01auth=Bearer {token}\x01\x01").into_bytes();
        let good = issuer.token("client-1", Duration::from_secs(20));
        let (sub, expires) = auth.oauthbearer(&message(&good), now).unwrap();
        assert_eq!(sub, "client-1");
        assert!(expires > now + Duration::from_secs(15));
        // Expired (the clock moved past exp).
        let err = auth
            .oauthbearer(&message(&good), now + Duration::from_secs(21))
            .unwrap_err();
        assert!(err.contains("expired"), "{err}");
        // Another issuer, another audience, another key, a changed payload.
        let other_iss = crate::oidc::Signer::with_key(&issuer, "https://other", "kafka");
        let other_aud = crate::oidc::Signer::with_key(&issuer, "https://issuer", "other");
        let other_key = crate::oidc::Signer::generate("https://issuer", "kafka");
        for (what, token) in [
            ("issuer", other_iss.token("c", Duration::from_secs(20))),
            ("audience", other_aud.token("c", Duration::from_secs(20))),
            ("key", other_key.token("c", Duration::from_secs(20))),
            ("payload", tamper(&good)),
        ] {
            assert!(
                auth.oauthbearer(&message(&token), now).is_err(),
                "a token with another {what} was accepted"
            );
        }
    }

    /// The token with its payload's subject changed, the signature kept.
    fn tamper(token: &str) -> String {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let parts: Vec<&str> = token.split('.').collect();
        let payload = String::from_utf8(URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        let payload = payload.replace("client-1", "client-2");
        format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(payload),
            parts[2]
        )
    }

    fn request(api_key: i16, version: i16, id: i32, body: &[u8]) -> Vec<u8> {
        let mut out = [api_key.to_be_bytes(), version.to_be_bytes()].concat();
        out.extend(id.to_be_bytes());
        put_string(&mut out, "rdkafka");
        out.extend(body);
        out
    }

    #[test]
    fn handshake_and_authenticate_messages() {
        let mut body = Vec::new();
        put_string(&mut body, "SCRAM-SHA-256");
        let frame = request(SASL_HANDSHAKE, 1, 7, &body);
        let r = parse_request(&frame).unwrap();
        assert_eq!((r.api_key, r.api_version, r.correlation_id), (17, 1, 7));
        assert_eq!(handshake_mechanism(&r).unwrap(), "SCRAM-SHA-256");
        assert_eq!(
            handshake_response(7, 33, &["PLAIN"]),
            [
                0, 0, 0, 7, 0, 33, 0, 0, 0, 1, 0, 5, b'P', b'L', b'A', b'I', b'N'
            ]
        );
        let frame = request(SASL_AUTHENTICATE, 1, 8, &[0, 0, 0, 3, b'a', 0, b'b']);
        let r = parse_request(&frame).unwrap();
        assert_eq!(authenticate_bytes(&r).unwrap(), b"a\0b");
        let answer = authenticate_response(8, 1, 58, Some("no"), &[], 0);
        assert_eq!(
            answer,
            [
                vec![0, 0, 0, 8, 0, 58, 0, 2, b'n', b'o', 0, 0, 0, 0],
                vec![0; 8]
            ]
            .concat()
        );
        assert_eq!(
            authenticate_response(8, 0, 0, None, b"x", 0).len(),
            4 + 2 + 2 + 5
        );
    }

    #[test]
    fn api_versions_list_the_sasl_requests_in_every_encoding() {
        // v0-v2: int32 count; [key, min, max]; v1+: throttle time.
        let mut v1 = vec![0, 0, 0, 9, 0, 0, 0, 0, 0, 2];
        v1.extend([0, 3, 0, 0, 0, 12]); // Metadata 0..12
        v1.extend([0, 17, 0, 0, 0, 1]); // SaslHandshake, replaced
        v1.extend([0, 0, 0, 0]); // throttle
        let patched = patch_api_versions(&v1, 1).unwrap();
        let mut expected = vec![0, 0, 0, 9, 0, 0, 0, 0, 0, 3];
        expected.extend([0, 3, 0, 0, 0, 12, 0, 17, 0, 1, 0, 1, 0, 36, 0, 0, 0, 1]);
        expected.extend([0, 0, 0, 0]);
        assert_eq!(patched, expected);
        // v3+: compact array (count + 1), a tagged-field section per entry and at the end.
        let mut v3 = vec![0, 0, 0, 9, 0, 0, 2];
        v3.extend([0, 3, 0, 0, 0, 12, 1, 0, 1, b'x']); // an entry with a tagged field
        v3.extend([0, 0, 0, 0, 0]); // throttle, no tagged fields
        let patched = patch_api_versions(&v3, 3).unwrap();
        let mut expected = vec![0, 0, 0, 9, 0, 0, 4];
        expected.extend([0, 3, 0, 0, 0, 12, 1, 0, 1, b'x']);
        expected.extend([0, 17, 0, 1, 0, 1, 0, 0, 36, 0, 0, 0, 1, 0]);
        expected.extend([0, 0, 0, 0, 0]);
        assert_eq!(patched, expected);
        // An error (unsupported version) passes unchanged.
        let error = [0, 0, 0, 9, 0, 35, 0, 0, 0, 0];
        assert_eq!(patch_api_versions(&error, 4).unwrap(), error);
        assert!(patch_api_versions(&[0, 0, 0, 9, 0, 0, 0, 0, 0, 2], 1).is_err());
    }

    #[tokio::test]
    async fn a_connection_authenticates_then_its_bytes_pass_unchanged() {
        let auth = users();
        let (mut client, mut front) = tokio::io::duplex(4096);
        let (mut upstream_front, mut upstream) = tokio::io::duplex(4096);
        let broker = tokio::spawn(async move {
            // The mock's side: one ApiVersions v0 request and its answer.
            let req = read_frame(&mut upstream).await.unwrap().unwrap();
            assert_eq!(parse_request(&req).unwrap().api_key, API_VERSIONS);
            write_frame(&mut upstream, &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0])
                .await
                .unwrap();
            upstream
        });
        let front_task = tokio::spawn(async move {
            let outcome = authenticate(&mut front, &mut upstream_front, &auth).await;
            (outcome, front)
        });
        write_frame(&mut client, &request(API_VERSIONS, 0, 1, &[]))
            .await
            .unwrap();
        let versions = read_frame(&mut client).await.unwrap().unwrap();
        assert_eq!(versions.len(), 4 + 2 + 4 + 2 * 6);
        let mut body = Vec::new();
        put_string(&mut body, "PLAIN");
        write_frame(&mut client, &request(SASL_HANDSHAKE, 1, 2, &body))
            .await
            .unwrap();
        let answer = read_frame(&mut client).await.unwrap().unwrap();
        assert_eq!(&answer[4..6], [0, 0]);
        let mut body = Vec::new();
        body.extend(12i32.to_be_bytes());
        body.extend(b"\0user\0pencil");
        write_frame(&mut client, &request(SASL_AUTHENTICATE, 1, 3, &body))
            .await
            .unwrap();
        let answer = read_frame(&mut client).await.unwrap().unwrap();
        assert_eq!(&answer[..6], [0, 0, 0, 3, 0, 0]);
        let (outcome, _) = front_task.await.unwrap();
        assert!(
            matches!(outcome, Outcome::Authenticated { ref principal, .. } if principal == "user"),
            "{outcome:?}"
        );
        broker.await.unwrap();

        // A wrong password: error 58 with Kafka's message, and the connection is done.
        let auth = users();
        let (mut client, mut front) = tokio::io::duplex(4096);
        let (mut upstream_front, _upstream) = tokio::io::duplex(4096);
        let front_task =
            tokio::spawn(async move { authenticate(&mut front, &mut upstream_front, &auth).await });
        let mut body = Vec::new();
        put_string(&mut body, "PLAIN");
        write_frame(&mut client, &request(SASL_HANDSHAKE, 1, 2, &body))
            .await
            .unwrap();
        read_frame(&mut client).await.unwrap().unwrap();
        let mut body = Vec::new();
        body.extend(10i32.to_be_bytes());
        body.extend(b"\0user\0pen!");
        write_frame(&mut client, &request(SASL_AUTHENTICATE, 1, 3, &body))
            .await
            .unwrap();
        let answer = read_frame(&mut client).await.unwrap().unwrap();
        assert_eq!(&answer[4..6], SASL_AUTHENTICATION_FAILED.to_be_bytes());
        assert!(matches!(front_task.await.unwrap(), Outcome::Closed(_)));

        // A request other than ApiVersions or SASL before authentication closes it.
        let auth = users();
        let (mut client, mut front) = tokio::io::duplex(4096);
        let (mut upstream_front, _upstream) = tokio::io::duplex(4096);
        let front_task =
            tokio::spawn(async move { authenticate(&mut front, &mut upstream_front, &auth).await });
        write_frame(&mut client, &request(3, 12, 1, &[]))
            .await
            .unwrap();
        assert!(matches!(front_task.await.unwrap(), Outcome::Closed(m) if m.contains("api key 3")));
    }
}
