//! A small OpenID Connect provider the tests start on loopback, built on `jsonwebtoken` (ES256 ID
//! tokens, a JWKS) and axum: discovery, the authorization code flow with PKCE (a login form that takes
//! a user name and password), the device authorization flow (RFC 8628, with a page where the user
//! approves a code), and the token endpoint for both. It checks what a real provider checks (client
//! secret, redirect URI, PKCE verifier, single-use codes). Shared by the API tests and the CLI tests
//! (`covm/tests/cli.rs` includes this file).

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Form;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use sha2::Digest;

pub const CLIENT_ID: &str = "covm";
pub const CLIENT_SECRET: &str = "covm-client-secret";

#[derive(Clone)]
pub struct IdpUser {
    pub sub: String,
    pub password: String,
    pub groups: Vec<String>,
    /// Said in the ID token's `covm_disabled` claim (the provider still signs the user in).
    pub disabled: bool,
}

struct Grant {
    user: String,
    nonce: Option<String>,
    challenge: String,
    redirect_uri: String,
}

struct DeviceGrant {
    user_code: String,
    approved: Option<String>,
}

struct Idp {
    issuer: String,
    key: EncodingKey,
    jwk: jsonwebtoken::jwk::Jwk,
    users: Mutex<HashMap<String, IdpUser>>,
    codes: Mutex<HashMap<String, Grant>>,
    devices: Mutex<HashMap<String, DeviceGrant>>,
}

/// A running provider.
pub struct TestIdp {
    pub issuer: String,
    state: Arc<Idp>,
}

impl TestIdp {
    /// Starts a provider on a loopback port, on the current tokio runtime.
    pub async fn start() -> TestIdp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let issuer = format!("http://{}", listener.local_addr().unwrap());
        let pair = rcgen::KeyPair::generate().unwrap();
        let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some("k1".into());
        let state = Arc::new(Idp {
            issuer: issuer.clone(),
            key,
            jwk,
            users: Mutex::default(),
            codes: Mutex::default(),
            devices: Mutex::default(),
        });
        let app = axum::Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/authorize", get(login_page).post(login))
            .route("/token", post(token))
            .route("/device_authorization", post(device_authorization))
            .route("/device", post(device_approve))
            .with_state(state.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        TestIdp { issuer, state }
    }

    /// Adds (or changes) a user of the provider.
    pub fn user(&self, name: &str, password: &str, groups: &[&str]) {
        self.state.users.lock().unwrap().insert(
            name.to_owned(),
            IdpUser {
                sub: format!("sub-{name}"),
                password: password.to_owned(),
                groups: groups.iter().map(|g| (*g).to_owned()).collect(),
                disabled: false,
            },
        );
    }

    /// Marks a user disabled (or not) in the ID tokens the provider issues.
    pub fn disable(&self, name: &str, disabled: bool) {
        if let Some(u) = self.state.users.lock().unwrap().get_mut(name) {
            u.disabled = disabled;
        }
    }

    /// A user approves a device code at the provider's page (what a person does in a browser).
    pub async fn approve(&self, user_code: &str, user: &str, password: &str) -> u16 {
        covm_client::tls::install_provider();
        let c = reqwest::Client::new();
        let r = c
            .post(format!("{}/device", self.issuer))
            .form(&[("user_code", user_code), ("username", user), ("password", password)])
            .send()
            .await
            .unwrap();
        r.status().as_u16()
    }
}

fn oauth_error(code: &str) -> Response {
    (StatusCode::BAD_REQUEST, axum::Json(json!({ "error": code }))).into_response()
}

async fn discovery(State(s): State<Arc<Idp>>) -> Response {
    axum::Json(json!({
        "issuer": s.issuer,
        "authorization_endpoint": format!("{}/authorize", s.issuer),
        "token_endpoint": format!("{}/token", s.issuer),
        "jwks_uri": format!("{}/jwks", s.issuer),
        "device_authorization_endpoint": format!("{}/device_authorization", s.issuer),
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "code_challenge_methods_supported": ["S256"],
    }))
    .into_response()
}

async fn jwks(State(s): State<Arc<Idp>>) -> Response {
    axum::Json(json!({ "keys": [s.jwk] })).into_response()
}

async fn login_page() -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/html")], "<form method=post>user, password</form>").into_response()
}

/// The login form, posted to the authorization URL: the OAuth parameters in the query, the
/// credentials in the body.
async fn login(
    State(s): State<Arc<Idp>>,
    Query(q): Query<HashMap<String, String>>,
    Form(f): Form<HashMap<String, String>>,
) -> Response {
    let get = |k: &str| q.get(k).cloned().unwrap_or_default();
    if get("client_id") != CLIENT_ID || get("response_type") != "code" || get("code_challenge_method") != "S256" {
        return oauth_error("invalid_request");
    }
    let (user, password) =
        (f.get("username").cloned().unwrap_or_default(), f.get("password").cloned().unwrap_or_default());
    let ok = s.users.lock().unwrap().get(&user).is_some_and(|u| u.password == password);
    if !ok {
        return (StatusCode::UNAUTHORIZED, "wrong user or password").into_response();
    }
    let code = format!("code-{}", uuid::Uuid::new_v4().simple());
    s.codes.lock().unwrap().insert(
        code.clone(),
        Grant {
            user,
            nonce: q.get("nonce").cloned(),
            challenge: get("code_challenge"),
            redirect_uri: get("redirect_uri"),
        },
    );
    let mut to = reqwest::Url::parse(&get("redirect_uri")).unwrap();
    to.query_pairs_mut().append_pair("code", &code).append_pair("state", &get("state"));
    (StatusCode::FOUND, [(header::LOCATION, to.to_string())]).into_response()
}

fn id_token(s: &Idp, user: &str, nonce: Option<&str>) -> String {
    let u = s.users.lock().unwrap().get(user).cloned().unwrap();
    let now = chrono::Utc::now().timestamp();
    let mut claims = json!({
        "iss": s.issuer, "sub": u.sub, "aud": CLIENT_ID, "iat": now, "exp": now + 300,
        "preferred_username": user, "groups": u.groups, "covm_disabled": u.disabled,
    });
    if let Some(n) = nonce {
        claims["nonce"] = json!(n);
    }
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("k1".into());
    jsonwebtoken::encode(&h, &claims, &s.key).unwrap()
}

async fn token(State(s): State<Arc<Idp>>, Form(f): Form<HashMap<String, String>>) -> Response {
    let get = |k: &str| f.get(k).cloned().unwrap_or_default();
    if get("client_id") != CLIENT_ID || get("client_secret") != CLIENT_SECRET {
        return (StatusCode::UNAUTHORIZED, axum::Json(json!({ "error": "invalid_client" }))).into_response();
    }
    match get("grant_type").as_str() {
        "authorization_code" => {
            // A code works once.
            let Some(g) = s.codes.lock().unwrap().remove(&get("code")) else { return oauth_error("invalid_grant") };
            let verifier = get("code_verifier");
            let challenge =
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()));
            if challenge != g.challenge || get("redirect_uri") != g.redirect_uri {
                return oauth_error("invalid_grant");
            }
            let t = id_token(&s, &g.user, g.nonce.as_deref());
            axum::Json(json!({ "access_token": "at", "token_type": "Bearer", "id_token": t })).into_response()
        }
        "urn:ietf:params:oauth:grant-type:device_code" => {
            let approved = match s.devices.lock().unwrap().get(&get("device_code")) {
                None => return oauth_error("expired_token"),
                Some(d) => d.approved.clone(),
            };
            match approved {
                None => oauth_error("authorization_pending"),
                Some(user) => {
                    s.devices.lock().unwrap().remove(&get("device_code"));
                    let t = id_token(&s, &user, None);
                    axum::Json(json!({ "access_token": "at", "token_type": "Bearer", "id_token": t })).into_response()
                }
            }
        }
        _ => oauth_error("unsupported_grant_type"),
    }
}

async fn device_authorization(State(s): State<Arc<Idp>>, Form(f): Form<HashMap<String, String>>) -> Response {
    if f.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
        return oauth_error("invalid_client");
    }
    let device_code = format!("dev-{}", uuid::Uuid::new_v4().simple());
    let user_code = uuid::Uuid::new_v4().simple().to_string()[..8].to_uppercase();
    s.devices.lock().unwrap().insert(device_code.clone(), DeviceGrant { user_code: user_code.clone(), approved: None });
    axum::Json(json!({
        "device_code": device_code, "user_code": user_code,
        "verification_uri": format!("{}/device", s.issuer), "interval": 1, "expires_in": 600,
    }))
    .into_response()
}

async fn device_approve(State(s): State<Arc<Idp>>, Form(f): Form<HashMap<String, String>>) -> Response {
    let get = |k: &str| f.get(k).cloned().unwrap_or_default();
    let ok = s.users.lock().unwrap().get(&get("username")).is_some_and(|u| u.password == get("password"));
    if !ok {
        return (StatusCode::UNAUTHORIZED, "wrong user or password").into_response();
    }
    let mut devices = s.devices.lock().unwrap();
    match devices.values_mut().find(|d| d.user_code == get("user_code")) {
        Some(d) => {
            d.approved = Some(get("username"));
            (StatusCode::OK, "approved").into_response()
        }
        None => (StatusCode::NOT_FOUND, "no such code").into_response(),
    }
}
