//! Token pairs: a short-lived signed access token and a random refresh token stored as
//! its SHA-256. A refresh token works once; using it again (a stolen copy, or the
//! rightful owner after a thief) revokes its whole family.

use std::sync::Arc;

use base64::Engine as _;
use chrono::{Duration, Utc};
use serde::Serialize;
use sha2::Digest as _;
use shared::auth::{Claims, Role, SigningKeys};
use shared::config::AuthSettings;
use sqlx::PgConnection;
use uuid::Uuid;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TokenPair {
    pub access_token: String,
    pub refresh_token: String,
    #[schema(example = "Bearer")]
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    pub expires_in: u64,
}

fn digest(token: &str) -> Vec<u8> {
    sha2::Sha256::digest(token.as_bytes()).to_vec()
}

fn new_refresh_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

#[derive(sqlx::FromRow)]
struct StoredToken {
    id: Uuid,
    family_id: Uuid,
    user_id: Uuid,
    expires_at: chrono::DateTime<Utc>,
    used_at: Option<chrono::DateTime<Utc>>,
    revoked_at: Option<chrono::DateTime<Utc>>,
}

#[derive(Clone)]
pub struct Tokens {
    keys: Arc<SigningKeys>,
    settings: Arc<AuthSettings>,
}

/// Why a refresh token was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Unknown,
    Expired,
    Revoked,
    /// Already used: the family is now revoked.
    Reused,
}

impl Tokens {
    pub fn new(keys: Arc<SigningKeys>, settings: Arc<AuthSettings>) -> Self {
        Self { keys, settings }
    }

    /// A new pair for `user`, in `family` (a new family at sign-in).
    pub async fn issue(
        &self,
        conn: &mut PgConnection,
        user: Uuid,
        roles: Vec<Role>,
        family: Uuid,
    ) -> anyhow::Result<TokenPair> {
        let access_token = self.keys.sign(&Claims::new(user, roles, &self.settings))?;
        let refresh_token = new_refresh_token()?;
        let ttl = i64::try_from(self.settings.refresh_token_ttl_secs).unwrap_or(i64::MAX);
        sqlx::query(
            "INSERT INTO refresh_tokens (id, family_id, user_id, token_hash, expires_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(Uuid::now_v7())
        .bind(family)
        .bind(user)
        .bind(digest(&refresh_token))
        .bind(Utc::now() + Duration::seconds(ttl))
        .execute(conn)
        .await?;
        Ok(TokenPair {
            access_token,
            refresh_token,
            token_type: "Bearer",
            expires_in: self.settings.access_token_ttl_secs,
        })
    }

    /// Uses `token` and returns the user and family it belongs to. Commit the
    /// transaction even when it is refused: a reuse revokes the family.
    pub async fn redeem(
        &self,
        conn: &mut PgConnection,
        token: &str,
    ) -> anyhow::Result<Result<(Uuid, Uuid), Refused>> {
        let row: Option<StoredToken> = sqlx::query_as(
            "SELECT id, family_id, user_id, expires_at, used_at, revoked_at \
             FROM refresh_tokens WHERE token_hash = $1 FOR UPDATE",
        )
        .bind(digest(token))
        .fetch_optional(&mut *conn)
        .await?;
        let Some(StoredToken {
            id,
            family_id: family,
            user_id: user,
            expires_at,
            used_at,
            revoked_at,
        }) = row
        else {
            return Ok(Err(Refused::Unknown));
        };
        if revoked_at.is_some() {
            return Ok(Err(Refused::Revoked));
        }
        if used_at.is_some() {
            self.revoke_family(conn, family).await?;
            tracing::warn!(%user, %family, "refresh token reused; family revoked");
            return Ok(Err(Refused::Reused));
        }
        if expires_at <= Utc::now() {
            return Ok(Err(Refused::Expired));
        }
        sqlx::query("UPDATE refresh_tokens SET used_at = now() WHERE id = $1")
            .bind(id)
            .execute(&mut *conn)
            .await?;
        Ok(Ok((user, family)))
    }

    pub async fn revoke_family(&self, conn: &mut PgConnection, family: Uuid) -> anyhow::Result<()> {
        sqlx::query(
            "UPDATE refresh_tokens SET revoked_at = now() \
             WHERE family_id = $1 AND revoked_at IS NULL",
        )
        .bind(family)
        .execute(conn)
        .await?;
        Ok(())
    }

    /// The family of `token`, whatever its state.
    pub async fn family_of(
        &self,
        conn: &mut PgConnection,
        token: &str,
    ) -> anyhow::Result<Option<Uuid>> {
        Ok(
            sqlx::query_scalar("SELECT family_id FROM refresh_tokens WHERE token_hash = $1")
                .bind(digest(token))
                .fetch_optional(conn)
                .await?,
        )
    }

    pub fn jwks(&self) -> shared::auth::JwkSet {
        self.keys.jwks()
    }
}
