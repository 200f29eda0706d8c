//! An OpenID Connect identity provider for tests, on loopback: a signing key, and a token
//! endpoint that grants client credentials (RFC 6749 section 4.4) with short-lived JWTs,
//! counting what it issues and refuses.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use serde_json::json;

use crate::sasl::OAuthBearerConfig;

/// An issuer's ES256 key pair, and the `iss` and `aud` of its tokens.
#[derive(Clone)]
pub struct Signer {
    pub issuer: String,
    pub audience: String,
    private_pem: String,
    public_pem: String,
}

impl Signer {
    pub fn generate(issuer: &str, audience: &str) -> Signer {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("EC key");
        Signer {
            issuer: issuer.into(),
            audience: audience.into(),
            private_pem: key.serialize_pem(),
            public_pem: key.public_key_pem(),
        }
    }

    /// `other`'s key with another issuer and audience.
    pub fn with_key(other: &Signer, issuer: &str, audience: &str) -> Signer {
        Signer {
            issuer: issuer.into(),
            audience: audience.into(),
            ..other.clone()
        }
    }

    /// A JWT for `subject` that expires in `lifetime`.
    pub fn token(&self, subject: &str, lifetime: Duration) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let claims = json!({
            "iss": self.issuer, "aud": self.audience, "sub": subject,
            "iat": now, "exp": now + lifetime.as_secs(),
        });
        let key = jsonwebtoken::EncodingKey::from_ec_pem(self.private_pem.as_bytes())
            .expect("EC key PEM");
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
            &claims,
            &key,
        )
        .expect("signed JWT")
    }

    /// What a broker needs to verify the tokens (the test broker's `--sasl` file).
    pub fn verification(&self) -> OAuthBearerConfig {
        OAuthBearerConfig {
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            public_key_pem: self.public_pem.clone(),
        }
    }
}

/// A token endpoint on 127.0.0.1 for one client, served on the caller's runtime.
pub struct TokenEndpoint {
    pub url: String,
    state: Arc<EndpointState>,
    task: tokio::task::JoinHandle<()>,
}

struct EndpointState {
    signer: Signer,
    client_id: String,
    client_secret: String,
    lifetime: Duration,
    issued: Mutex<Vec<(Instant, String)>>,
    refused: Mutex<usize>,
}

impl TokenEndpoint {
    pub async fn spawn(
        signer: Signer,
        client_id: &str,
        client_secret: &str,
        lifetime: Duration,
    ) -> TokenEndpoint {
        let state = Arc::new(EndpointState {
            signer,
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            lifetime,
            issued: Mutex::default(),
            refused: Mutex::default(),
        });
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind the token endpoint");
        let url = format!("http://{}/token", listener.local_addr().expect("address"));
        let app = Router::new()
            .route("/token", post(grant))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TokenEndpoint { url, state, task }
    }

    /// The tokens issued, with when.
    pub fn issued(&self) -> Vec<(Instant, String)> {
        self.state.issued.lock().expect("lock").clone()
    }

    /// How many requests were refused (wrong client, wrong grant).
    pub fn refused(&self) -> usize {
        *self.state.refused.lock().expect("lock")
    }
}

impl Drop for TokenEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The client-credentials grant: the client authenticated by HTTP Basic (what librdkafka
/// sends) or by `client_id`/`client_secret` in the form.
async fn grant(State(s): State<Arc<EndpointState>>, headers: HeaderMap, body: String) -> Response {
    let form: std::collections::HashMap<String, String> =
        url::form_urlencoded::parse(body.as_bytes())
            .into_owned()
            .collect();
    let basic = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|b| {
            b.split_once(':')
                .map(|(i, s)| (i.to_string(), s.to_string()))
        });
    let client = basic.or_else(|| {
        Some((
            form.get("client_id")?.clone(),
            form.get("client_secret")?.clone(),
        ))
    });
    let refuse = |status: StatusCode, error: &str| {
        *s.refused.lock().expect("lock") += 1;
        (status, axum::Json(json!({"error": error}))).into_response()
    };
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return refuse(StatusCode::BAD_REQUEST, "unsupported_grant_type");
    }
    match client {
        Some((id, secret)) if id == s.client_id && secret == s.client_secret => {}
        _ => return refuse(StatusCode::UNAUTHORIZED, "invalid_client"),
    }
    let token = s.signer.token(&s.client_id, s.lifetime);
    s.issued
        .lock()
        .expect("lock")
        .push((Instant::now(), token.clone()));
    axum::Json(json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": s.lifetime.as_secs(),
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn grants_tokens_to_its_client_only() {
        let endpoint = TokenEndpoint::spawn(
            Signer::generate("https://issuer", "kafka"),
            "c",
            "s3cret",
            Duration::from_secs(20),
        )
        .await;
        let post = |auth: Option<&str>, body: &str| {
            let (url, auth, body) = (
                endpoint.url.clone(),
                auth.map(str::to_string),
                body.to_string(),
            );
            async move {
                let uri: http::Uri = url.parse().unwrap();
                let addr = uri.authority().unwrap().as_str().to_string();
                let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                let auth = auth
                    .map(|a| {
                        format!(
                            "Authorization: Basic {}\r\n",
                            base64::engine::general_purpose::STANDARD.encode(a)
                        )
                    })
                    .unwrap_or_default();
                let request = format!(
                    "POST /token HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                stream.write_all(request.as_bytes()).await.unwrap();
                let mut answer = String::new();
                stream.read_to_string(&mut answer).await.unwrap();
                answer
            }
        };
        let ok = post(
            Some("c:s3cret"),
            "grant_type=client_credentials&scope=kafka",
        )
        .await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("\"expires_in\":20"), "{ok}");
        let form = post(
            None,
            "grant_type=client_credentials&client_id=c&client_secret=s3cret",
        )
        .await;
        assert!(form.starts_with("HTTP/1.1 200"), "{form}");
        let wrong = post(Some("c:wrong"), "grant_type=client_credentials").await;
        assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
        let grant = post(Some("c:s3cret"), "grant_type=password").await;
        assert!(grant.starts_with("HTTP/1.1 400"), "{grant}");
        assert_eq!((endpoint.issued().len(), endpoint.refused()), (2, 2));
    }
}
