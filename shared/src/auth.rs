//! Access tokens: Ed25519-signed JWTs with a `kid`. user-svc signs with the newest key of
//! its key directory and publishes every key as a JWKS; every service (and the gateway)
//! verifies with those public keys, so a service reached directly is as safe as one
//! reached through the gateway.
//!
//! Rotation: `commerce keys rotate` adds a key to the directory; user-svc signs with it
//! from its next token on, and keeps publishing the older keys, so tokens they signed
//! verify until they expire. Delete an old key file once the access-token lifetime has
//! passed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::extract::{FromRef, FromRequestParts};
use axum::http::{header, request::Parts};
use base64::Engine as _;
use chrono::Utc;
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::{
    DecodePrivateKey as _, EncodePrivateKey as _, spki::der::pem::LineEnding,
};
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, Jwk, KeyAlgorithm,
    OctetKeyPairParameters, OctetKeyPairType, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::AuthSettings;
use crate::http::ApiError;

pub use jsonwebtoken::jwk::JwkSet;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Customer,
    Seller,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Customer => "customer",
            Self::Seller => "seller",
            Self::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "customer" => Some(Self::Customer),
            "seller" => Some(Self::Seller),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }

    /// Roles as stored in a `TEXT[]` column.
    pub fn to_strings(roles: &[Self]) -> Vec<String> {
        roles.iter().map(|r| r.as_str().to_owned()).collect()
    }

    /// Roles from a `TEXT[]` column; unknown names are dropped.
    pub fn from_strings(roles: &[String]) -> Vec<Self> {
        roles.iter().filter_map(|r| Self::parse(r)).collect()
    }
}

/// What an access token says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: Uuid,
    pub roles: Vec<Role>,
    pub iss: String,
    pub aud: String,
    pub exp: i64,
    pub iat: i64,
    pub jti: Uuid,
}

impl Claims {
    /// Claims for `user` valid from now for the configured lifetime.
    pub fn new(user: Uuid, roles: Vec<Role>, settings: &AuthSettings) -> Self {
        let now = Utc::now().timestamp();
        Self {
            sub: user,
            roles,
            iss: settings.issuer.clone(),
            aud: settings.audience.clone(),
            exp: now + i64::try_from(settings.access_token_ttl_secs).unwrap_or(900),
            iat: now,
            jti: Uuid::now_v7(),
        }
    }
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

struct Key {
    kid: String,
    encoding: EncodingKey,
    /// The public key, base64url: the JWK's `x`.
    x: String,
}

impl Key {
    fn load(path: &Path) -> anyhow::Result<Self> {
        let kid = path
            .file_stem()
            .and_then(|s| s.to_str())
            .context("key file without a name")?
            .to_owned();
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("reading signing key {}", path.display()))?;
        let signing = SigningKey::from_pkcs8_pem(&pem)
            .map_err(|e| anyhow::anyhow!("{} is not an Ed25519 PKCS#8 key: {e}", path.display()))?;
        let der = signing
            .to_pkcs8_der()
            .map_err(|e| anyhow::anyhow!("encoding {kid}: {e}"))?;
        Ok(Self {
            x: b64url(signing.verifying_key().as_bytes()),
            encoding: EncodingKey::from_ed_der(der.as_bytes()),
            kid,
        })
    }

    fn jwk(&self) -> Jwk {
        Jwk {
            common: CommonParameters {
                public_key_use: Some(PublicKeyUse::Signature),
                key_algorithm: Some(KeyAlgorithm::EdDSA),
                key_id: Some(self.kid.clone()),
                ..CommonParameters::default()
            },
            algorithm: AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
                key_type: OctetKeyPairType::OctetKeyPair,
                curve: EllipticCurve::Ed25519,
                x: self.x.clone(),
            }),
        }
    }
}

/// Adds a new Ed25519 key to `dir` and returns its id. Ids sort by creation time, and
/// the newest key signs.
pub fn generate_key(dir: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let signing = SigningKey::from_bytes(&seed);
    let mut suffix = [0u8; 4];
    getrandom::fill(&mut suffix).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let kid = format!(
        "{}-{}",
        Utc::now().format("%Y%m%dT%H%M%S%6f"),
        crate::hex(&suffix)
    );
    let pem = signing
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| anyhow::anyhow!("encoding the new key: {e}"))?;
    let path = dir.join(format!("{kid}.pem"));
    write_private(&path, pem.as_bytes())?;
    Ok(kid)
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents)?;
    Ok(())
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("creating {}", path.display()))
}

/// The key files in `dir`, sorted: what changes when a key is added or removed.
fn key_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "pem"))
            .collect::<Vec<_>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    paths.sort();
    Ok(paths)
}

struct Loaded {
    files: Vec<PathBuf>,
    checked: Instant,
    /// Oldest first; the last one signs.
    keys: Vec<Arc<Key>>,
}

/// The signing keys of a key directory (user-svc). Picks up keys added while running.
pub struct SigningKeys {
    dir: PathBuf,
    loaded: RwLock<Loaded>,
}

impl SigningKeys {
    /// Loads every key in `dir`, creating the first one if there is none.
    pub fn open(dir: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let dir = dir.into();
        let read =
            |dir: &Path| key_files(dir).with_context(|| format!("reading {}", dir.display()));
        let mut files = read(&dir)?;
        if files.is_empty() {
            let kid = generate_key(&dir)?;
            tracing::info!(dir = %dir.display(), kid, "created the first signing key");
            files = read(&dir)?;
        }
        Ok(Self {
            loaded: RwLock::new(Loaded {
                keys: Self::load(&files)?,
                files,
                checked: Instant::now(),
            }),
            dir,
        })
    }

    fn load(files: &[PathBuf]) -> anyhow::Result<Vec<Arc<Key>>> {
        files.iter().map(|p| Key::load(p).map(Arc::new)).collect()
    }

    /// The keys as they are now: re-read when the directory changed (checked once a second).
    fn keys(&self) -> Vec<Arc<Key>> {
        {
            let loaded = self.loaded.read().unwrap_or_else(|e| e.into_inner());
            if loaded.checked.elapsed() < Duration::from_secs(1) {
                return loaded.keys.clone();
            }
        }
        let mut loaded = self.loaded.write().unwrap_or_else(|e| e.into_inner());
        loaded.checked = Instant::now();
        match key_files(&self.dir) {
            Ok(files) if files.is_empty() => {
                tracing::error!("the key directory is empty; keeping the keys in memory");
            }
            Ok(files) if files != loaded.files => match Self::load(&files) {
                Ok(keys) => {
                    tracing::info!(keys = keys.len(), "signing keys reloaded");
                    loaded.keys = keys;
                    loaded.files = files;
                }
                Err(error) => {
                    tracing::error!(%error, "could not reload signing keys; keeping the old ones")
                }
            },
            Ok(_) => {}
            Err(error) => {
                tracing::error!(%error, "could not read the key directory; keeping the keys")
            }
        }
        loaded.keys.clone()
    }

    /// A token for `claims`, signed with the newest key.
    pub fn sign(&self, claims: &Claims) -> anyhow::Result<String> {
        let keys = self.keys();
        let key = keys.last().context("no signing key")?;
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, &key.encoding).context("signing a token")
    }

    /// Every key's public half, for verifiers.
    pub fn jwks(&self) -> JwkSet {
        JwkSet {
            keys: self.keys().iter().map(|k| k.jwk()).collect(),
        }
    }

    fn decoding_key(&self, kid: &str) -> Option<DecodingKey> {
        let keys = self.keys();
        let key = keys.iter().find(|k| k.kid == kid)?;
        DecodingKey::from_ed_components(&key.x).ok()
    }
}

/// Where a verifier finds public keys.
enum Source {
    /// user-svc's own keys.
    Local(Arc<SigningKeys>),
    /// A JWKS document, fetched on first use and again when a token names an unknown key.
    Remote(Jwks),
}

struct Jwks {
    url: String,
    client: reqwest::Client,
    keys: RwLock<HashMap<String, DecodingKey>>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

/// Fetches of the JWKS are at least this far apart, so tokens with made-up key ids
/// cannot turn into a flood of requests to user-svc.
const JWKS_MIN_INTERVAL: Duration = Duration::from_secs(1);

impl Jwks {
    fn cached(&self, kid: &str) -> Option<DecodingKey> {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(kid)
            .cloned()
    }

    async fn key(&self, kid: &str) -> Option<DecodingKey> {
        if let Some(key) = self.cached(kid) {
            return Some(key);
        }
        let mut last = self.last_fetch.lock().await;
        // Another request may have fetched while this one waited.
        if let Some(key) = self.cached(kid) {
            return Some(key);
        }
        // A new key id right after a fetch is likely a rotation: wait out the interval
        // rather than refuse a good token. Made-up ids queue here, one fetch a second.
        if let Some(at) = *last {
            let wait = JWKS_MIN_INTERVAL.saturating_sub(at.elapsed());
            tokio::time::sleep(wait).await;
        }
        *last = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => {
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
            }
            Err(error) => tracing::warn!(%error, url = %self.url, "could not fetch the JWKS"),
        }
        self.cached(kid)
    }

    async fn fetch(&self) -> anyhow::Result<HashMap<String, DecodingKey>> {
        let set: JwkSet = self
            .client
            .get(&self.url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(set
            .keys
            .iter()
            .filter_map(|jwk| {
                let kid = jwk.common.key_id.clone()?;
                let key = DecodingKey::from_jwk(jwk).ok()?;
                Some((kid, key))
            })
            .collect())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Checks access tokens: signature by a known key, EdDSA only, issuer, audience, expiry.
/// Tokens that passed are remembered until they expire, since a client sends the same
/// token with many requests; a refused token is checked in full every time.
#[derive(Clone)]
pub struct Verifier {
    source: Arc<Source>,
    validation: Arc<Validation>,
    verified: Arc<quick_cache::sync::Cache<String, Arc<Claims>>>,
}

/// Verified tokens remembered per process.
const VERIFIED_CAPACITY: usize = 20_000;

impl Verifier {
    fn with_source(source: Source, settings: &AuthSettings) -> Self {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&settings.issuer]);
        validation.set_audience(&[&settings.audience]);
        validation.set_required_spec_claims(&["exp", "iat", "sub", "iss", "aud"]);
        validation.leeway = 5;
        Self {
            source: Arc::new(source),
            validation: Arc::new(validation),
            verified: Arc::new(quick_cache::sync::Cache::new(VERIFIED_CAPACITY)),
        }
    }

    /// Verifies with the JWKS at `settings.jwks_url` (or user-svc's, by default).
    pub fn remote(settings: &crate::Settings) -> Self {
        let url = settings
            .auth
            .jwks_url
            .clone()
            .unwrap_or_else(|| format!("{}/.well-known/jwks.json", settings.user.base_url()));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        Self::with_source(
            Source::Remote(Jwks {
                url,
                client,
                keys: RwLock::default(),
                last_fetch: tokio::sync::Mutex::new(None),
            }),
            &settings.auth,
        )
    }

    /// Verifies with keys held in this process (user-svc).
    pub fn local(keys: Arc<SigningKeys>, settings: &AuthSettings) -> Self {
        Self::with_source(Source::Local(keys), settings)
    }

    /// Shared, not copied: a remembered token's claims are handed out on every request.
    pub async fn verify(&self, token: &str) -> Result<Arc<Claims>, AuthError> {
        if let Some(claims) = self.verified.get(token) {
            if claims.exp > Utc::now().timestamp() {
                return Ok(claims);
            }
            self.verified.remove(token);
        }
        // Boxed: the key fetch of a first sighting would otherwise make every caller's
        // future, cache hits included, a kilobyte and a half larger.
        let claims = Arc::new(Box::pin(self.verify_uncached(token)).await?);
        self.verified.insert(token.to_owned(), claims.clone());
        Ok(claims)
    }

    async fn verify_uncached(&self, token: &str) -> Result<Claims, AuthError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| AuthError::Invalid(e.to_string()))?;
        if header.alg != Algorithm::EdDSA {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| AuthError::Invalid("no key id".into()))?;
        let key = match &*self.source {
            Source::Local(keys) => keys.decoding_key(&kid),
            Source::Remote(jwks) => jwks.key(&kid).await,
        }
        .ok_or_else(|| AuthError::Invalid(format!("unknown key id {kid:?}")))?;
        jsonwebtoken::decode::<Claims>(token, &key, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| AuthError::Invalid(e.to_string()))
    }

    /// Verifies the `Authorization: Bearer` token of a request, if it has one.
    pub async fn verify_header(&self, parts: &Parts) -> Result<Arc<Claims>, AuthError> {
        let value = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or(AuthError::Missing)?;
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .ok_or_else(|| AuthError::Invalid("not a bearer token".into()))?;
        self.verify(token.trim()).await
    }
}

const TOKEN_REQUIRED: &str = "a valid bearer token is required";

/// The signed-in caller. Rejects the request with 401 when the token is missing or bad.
#[derive(Clone, Debug)]
pub struct AuthUser(pub Arc<Claims>);

impl AuthUser {
    pub fn id(&self) -> Uuid {
        self.0.sub
    }

    pub fn has_role(&self, role: Role) -> bool {
        self.0.roles.contains(&role)
    }

    pub fn is_admin(&self) -> bool {
        self.has_role(Role::Admin)
    }

    /// 403 unless the caller has one of `roles`.
    pub fn require_any(&self, roles: &[Role]) -> Result<(), ApiError> {
        if roles.iter().any(|r| self.has_role(*r)) {
            Ok(())
        } else {
            Err(ApiError::Forbidden)
        }
    }

    /// 403 unless the caller owns the resource or is an admin.
    pub fn require_owner_or_admin(&self, owner: Uuid) -> Result<(), ApiError> {
        if self.id() == owner || self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::Forbidden)
        }
    }
}

impl<S> FromRequestParts<S> for AuthUser
where
    Verifier: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let verifier = Verifier::from_ref(state);
        match verifier.verify_header(parts).await {
            Ok(claims) => Ok(Self(claims)),
            Err(error) => {
                tracing::info!(%error, "request refused");
                Err(ApiError::Unauthorized(TOKEN_REQUIRED))
            }
        }
    }
}

/// The caller if signed in; a bad token is still refused with 401.
#[derive(Clone, Debug)]
pub struct MaybeAuthUser(pub Option<AuthUser>);

impl<S> FromRequestParts<S> for MaybeAuthUser
where
    Verifier: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let verifier = Verifier::from_ref(state);
        match verifier.verify_header(parts).await {
            Ok(claims) => Ok(Self(Some(AuthUser(claims)))),
            Err(AuthError::Missing) => Ok(Self(None)),
            Err(error) => {
                tracing::info!(%error, "request refused");
                Err(ApiError::Unauthorized(TOKEN_REQUIRED))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> AuthSettings {
        AuthSettings::default()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("commerce-keys-{name}-{}", Uuid::now_v7()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[tokio::test]
    async fn a_signed_token_verifies_and_a_tampered_one_does_not() {
        let dir = temp_dir("sign");
        let keys = Arc::new(SigningKeys::open(&dir).expect("keys"));
        let verifier = Verifier::local(keys.clone(), &settings());
        let claims = Claims::new(Uuid::now_v7(), vec![Role::Seller], &settings());
        let token = keys.sign(&claims).expect("sign");
        assert_eq!(*verifier.verify(&token).await.expect("valid"), claims);

        let mut tampered = token.clone();
        let last = tampered.pop().expect("non-empty");
        tampered.push(if last == 'A' { 'B' } else { 'A' });
        assert!(verifier.verify(&tampered).await.is_err());
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[tokio::test]
    async fn remembered_tokens_are_trusted_only_until_they_expire() {
        let dir = temp_dir("remember");
        let keys = Arc::new(SigningKeys::open(&dir).expect("keys"));
        let verifier = Verifier::local(keys, &settings());
        let claims = Claims::new(Uuid::now_v7(), vec![Role::Customer], &settings());
        // Not a token at all: only the memory could make it pass.
        let forged = "remembered-but-not-a-token";
        verifier
            .verified
            .insert(forged.to_owned(), Arc::new(claims.clone()));
        assert_eq!(*verifier.verify(forged).await.expect("remembered"), claims);

        let expired = Claims {
            exp: Utc::now().timestamp() - 1,
            ..claims
        };
        verifier
            .verified
            .insert(forged.to_owned(), Arc::new(expired));
        assert!(
            verifier.verify(forged).await.is_err(),
            "checked in full again"
        );
        assert!(verifier.verified.get(forged).is_none(), "and forgotten");
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[tokio::test]
    async fn expired_wrong_audience_and_none_tokens_are_refused() {
        let dir = temp_dir("refuse");
        let keys = Arc::new(SigningKeys::open(&dir).expect("keys"));
        let verifier = Verifier::local(keys.clone(), &settings());
        let mut expired = Claims::new(Uuid::now_v7(), vec![Role::Customer], &settings());
        expired.exp = Utc::now().timestamp() - 3600;
        expired.iat = expired.exp - 900;
        assert!(
            verifier
                .verify(&keys.sign(&expired).expect("sign"))
                .await
                .is_err()
        );

        let mut other = Claims::new(Uuid::now_v7(), vec![Role::Customer], &settings());
        other.aud = "someone-else".into();
        assert!(
            verifier
                .verify(&keys.sign(&other).expect("sign"))
                .await
                .is_err()
        );

        let claims = Claims::new(Uuid::now_v7(), vec![Role::Admin], &settings());
        let body = b64url(&serde_json::to_vec(&claims).expect("json"));
        let none = format!("{}.{body}.", b64url(br#"{"alg":"none","typ":"JWT"}"#));
        assert!(verifier.verify(&none).await.is_err());
        std::fs::remove_dir_all(dir).expect("cleanup");
    }

    #[tokio::test]
    async fn after_rotation_the_new_key_signs_and_the_old_one_still_verifies() {
        let dir = temp_dir("rotate");
        let keys = Arc::new(SigningKeys::open(&dir).expect("keys"));
        let verifier = Verifier::local(keys.clone(), &settings());
        let claims = Claims::new(Uuid::now_v7(), vec![Role::Customer], &settings());
        let old = keys.sign(&claims).expect("sign");
        let old_kid = jsonwebtoken::decode_header(&old).expect("header").kid;

        let new_kid = generate_key(&dir).expect("rotate");
        // The key directory is looked at again at most once a second.
        let rotated = Arc::new(SigningKeys::open(&dir).expect("reopen"));
        let fresh = rotated.sign(&claims).expect("sign");
        assert_eq!(
            jsonwebtoken::decode_header(&fresh).expect("header").kid,
            Some(new_kid)
        );
        assert_ne!(
            old_kid,
            jsonwebtoken::decode_header(&fresh).expect("header").kid
        );
        let verifier_after = Verifier::local(rotated.clone(), &settings());
        assert!(
            verifier_after.verify(&old).await.is_ok(),
            "old tokens still verify"
        );
        assert!(verifier.verify(&old).await.is_ok());
        assert_eq!(rotated.jwks().keys.len(), 2);
        std::fs::remove_dir_all(dir).expect("cleanup");
    }
}
