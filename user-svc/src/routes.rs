//! Accounts and tokens (DESIGN.md §6): register, login, refresh, logout, me, JWKS.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use shared::auth::{AuthUser, JwkSet, Role};
use shared::events::{Event as _, UserRegistered};
use shared::http::{ApiError, FieldError, Json, Problem};
use uuid::Uuid;

use crate::AppState;
use crate::domain::{Email, Name, Password, Problems, registrable_role};
use crate::tokens::{Refused, TokenPair};

/// Login failures look the same whether the email is unknown or the password wrong.
const BAD_CREDENTIALS: &str = "email or password is wrong";
const BAD_REFRESH: &str = "the refresh token is not valid";

/// This service's part of the API document; the gateway merges it with the others'.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(register, login, refresh, logout, me, list_users),
    components(schemas(Problem, FieldError, Role, TokenPair)),
    tags(
        (name = "auth", description = "Accounts and tokens"),
        (name = "users", description = "The signed-in user"),
        (name = "admin", description = "For administrators"),
    )
)]
pub struct ApiDoc;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/openapi.json",
            get(|| async { Json(<ApiDoc as utoipa::OpenApi>::openapi()) }),
        )
        .route("/api/v1/auth/register", post(register))
        .route("/api/v1/auth/login", post(login))
        .route("/api/v1/auth/refresh", post(refresh))
        .route("/api/v1/auth/logout", post(logout))
        .route("/api/v1/auth/jwks.json", get(jwks))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/api/v1/users/me", get(me))
        .route("/api/v1/admin/users", get(list_users))
        .with_state(state)
}

#[derive(Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct UserView {
    pub id: Uuid,
    pub email: String,
    pub name: String,
    pub roles: Vec<Role>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AuthResponse {
    pub user: UserView,
    #[serde(flatten)]
    pub tokens: TokenPair,
}

#[derive(Deserialize, utoipa::ToSchema)]
struct RegisterRequest {
    #[schema(example = "ada@example.com")]
    email: String,
    /// 10 to 128 characters, hard to guess.
    #[schema(example = "correct horse battery staple")]
    password: String,
    #[schema(example = "Ada Lovelace")]
    name: String,
    /// `customer` (default) or `seller`.
    #[schema(example = "customer")]
    role: Option<String>,
}

/// Creates an account and signs it in.
#[utoipa::path(
    post, path = "/api/v1/auth/register", tag = "auth",
    request_body = RegisterRequest,
    responses(
        (status = 201, description = "Registered and signed in", body = AuthResponse),
        (status = 400, description = "Not valid JSON", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The email has an account", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields, listed in `errors`", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many attempts", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn register(
    State(state): State<AppState>,
    Json(request): Json<RegisterRequest>,
) -> Result<(StatusCode, Json<AuthResponse>), ApiError> {
    let mut problems = Problems::default();
    let email = problems.check("email", Email::parse(&request.email));
    let name = problems.check("name", Name::parse(&request.name));
    let role = problems.check("role", registrable_role(request.role.as_deref()));
    let password = problems.check(
        "password",
        Password::parse(
            &request.password,
            email.as_ref().map_or("", Email::as_str),
            name.as_ref().map_or("", Name::as_str),
        ),
    );
    problems.into_result()?;
    let (Some(email), Some(name), Some(role), Some(password)) = (email, name, role, password)
    else {
        return Err(anyhow::anyhow!("validated fields missing").into());
    };

    let hash = state.passwords.hash(password.expose()).await?;
    let user = UserView {
        id: Uuid::now_v7(),
        email: email.as_str().to_owned(),
        name: name.as_str().to_owned(),
        roles: vec![role],
    };
    let mut tx = state.pool.begin().await?;
    sqlx::query(
        "INSERT INTO users (id, email, name, password_hash, roles) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(user.id)
    .bind(&user.email)
    .bind(&user.name)
    .bind(&hash)
    .bind(Role::to_strings(&user.roles))
    .execute(&mut *tx)
    .await
    .map_err(|e| {
        ApiError::from_db(
            e,
            &[(
                "users_email_unique",
                "an account with this email already exists",
            )],
        )
    })?;
    let registered = UserRegistered {
        user_id: user.id,
        email: user.email.clone(),
        name: user.name.clone(),
        roles: user.roles.clone(),
        registered_at: chrono::Utc::now(),
    };
    state
        .outbox
        .enqueue(&mut tx, registered.to_new(user.id))
        .await?;
    let tokens = state
        .tokens
        .issue(&mut tx, user.id, user.roles.clone(), Uuid::now_v7())
        .await?;
    tx.commit().await?;
    tracing::info!(user = %user.id, role = role.as_str(), "registered");
    Ok((StatusCode::CREATED, Json(AuthResponse { user, tokens })))
}

#[derive(Deserialize, utoipa::ToSchema)]
struct LoginRequest {
    #[schema(example = "ada@example.com")]
    email: String,
    #[schema(example = "correct horse battery staple")]
    password: String,
}

#[derive(sqlx::FromRow)]
struct UserRow {
    id: Uuid,
    email: String,
    name: String,
    password_hash: String,
    roles: Vec<String>,
}

impl UserRow {
    fn view(self) -> UserView {
        UserView {
            id: self.id,
            email: self.email,
            name: self.name,
            roles: Role::from_strings(&self.roles),
        }
    }
}

async fn find_user(
    executor: impl sqlx::PgExecutor<'_>,
    column: &str,
    value: impl for<'q> sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send,
) -> Result<Option<UserRow>, sqlx::Error> {
    let sql =
        format!("SELECT id, email, name, password_hash, roles FROM users WHERE {column} = $1");
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(value)
        .fetch_optional(executor)
        .await
}

/// Signs in: a new token pair.
#[utoipa::path(
    post, path = "/api/v1/auth/login", tag = "auth",
    request_body = LoginRequest,
    responses(
        (status = 200, description = "Signed in", body = AuthResponse),
        (status = 401, description = "Unknown email or wrong password (the same answer for both)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Too many attempts", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn login(
    State(state): State<AppState>,
    Json(request): Json<LoginRequest>,
) -> Result<Json<AuthResponse>, ApiError> {
    let user = match Email::parse(&request.email) {
        Ok(email) => find_user(&state.pool, "email", email.as_str().to_owned()).await?,
        Err(_) => None,
    };
    let matches = state
        .passwords
        .verify(
            &request.password,
            user.as_ref().map(|u| u.password_hash.as_str()),
        )
        .await?;
    let Some(user) = user.filter(|_| matches) else {
        tracing::info!("login refused");
        return Err(ApiError::Unauthorized(BAD_CREDENTIALS));
    };
    let user = user.view();
    let mut tx = state.pool.begin().await?;
    let tokens = state
        .tokens
        .issue(&mut tx, user.id, user.roles.clone(), Uuid::now_v7())
        .await?;
    tx.commit().await?;
    Ok(Json(AuthResponse { user, tokens }))
}

#[derive(Deserialize, utoipa::ToSchema)]
struct RefreshRequest {
    refresh_token: String,
}

/// Trades a refresh token for a new pair. Each refresh token works once; presenting a
/// used one revokes every token of its sign-in.
#[utoipa::path(
    post, path = "/api/v1/auth/refresh", tag = "auth",
    request_body = RefreshRequest,
    responses(
        (status = 200, description = "A new pair", body = AuthResponse),
        (status = 401, description = "Unknown, expired, revoked or reused", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn refresh(
    State(state): State<AppState>,
    Json(request): Json<RefreshRequest>,
) -> Result<Json<AuthResponse>, ApiError> {
    let mut tx = state.pool.begin().await?;
    let redeemed = state.tokens.redeem(&mut tx, &request.refresh_token).await?;
    let (user_id, family) = match redeemed {
        Ok(found) => found,
        Err(refused) => {
            // Keep the family's revocation when the token was reused.
            tx.commit().await?;
            if refused == Refused::Reused {
                return Err(ApiError::Unauthorized(
                    "the refresh token was already used; sign in again",
                ));
            }
            return Err(ApiError::Unauthorized(BAD_REFRESH));
        }
    };
    let Some(user) = find_user(&mut *tx, "id", user_id).await? else {
        return Err(ApiError::Unauthorized(BAD_REFRESH));
    };
    let user = user.view();
    let tokens = state
        .tokens
        .issue(&mut tx, user.id, user.roles.clone(), family)
        .await?;
    tx.commit().await?;
    Ok(Json(AuthResponse { user, tokens }))
}

/// Revokes every token of the sign-in the refresh token belongs to.
#[utoipa::path(
    post, path = "/api/v1/auth/logout", tag = "auth",
    request_body = RefreshRequest,
    responses((status = 204, description = "Signed out (also for an unknown token)"))
)]
async fn logout(
    State(state): State<AppState>,
    Json(request): Json<RefreshRequest>,
) -> Result<StatusCode, ApiError> {
    let mut tx = state.pool.begin().await?;
    if let Some(family) = state
        .tokens
        .family_of(&mut tx, &request.refresh_token)
        .await?
    {
        state.tokens.revoke_family(&mut tx, family).await?;
    }
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The signed-in user.
#[utoipa::path(
    get, path = "/api/v1/users/me", tag = "users",
    security(("bearer" = [])),
    responses(
        (status = 200, body = UserView),
        (status = 401, body = Problem, content_type = "application/problem+json"),
    )
)]
async fn me(State(state): State<AppState>, caller: AuthUser) -> Result<Json<UserView>, ApiError> {
    find_user(&state.pool, "id", caller.id())
        .await?
        .map(|u| Json(u.view()))
        .ok_or_else(|| ApiError::NotFound("this account no longer exists".into()))
}

#[derive(Deserialize, utoipa::IntoParams)]
struct Page {
    /// 1 to 200, default 50.
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<Uuid>,
}

#[derive(Serialize, utoipa::ToSchema)]
struct UserList {
    items: Vec<UserView>,
    next_cursor: Option<Uuid>,
}

/// Every account, oldest first, a page at a time.
#[utoipa::path(
    get, path = "/api/v1/admin/users", tag = "admin",
    params(Page),
    security(("bearer" = [])),
    responses(
        (status = 200, body = UserList),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_users(
    State(state): State<AppState>,
    caller: AuthUser,
    axum::extract::Query(page): axum::extract::Query<Page>,
) -> Result<Json<UserList>, ApiError> {
    caller.require_any(&[Role::Admin])?;
    let limit = page.limit.unwrap_or(50).clamp(1, 200);
    let mut rows: Vec<UserRow> = sqlx::query_as(
        "SELECT id, email, name, password_hash, roles FROM users \
         WHERE ($1::uuid IS NULL OR id > $1) ORDER BY id LIMIT $2",
    )
    .bind(page.cursor)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let more = rows.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let items: Vec<UserView> = rows.into_iter().map(UserRow::view).collect();
    let next_cursor = if more {
        items.last().map(|u| u.id)
    } else {
        None
    };
    Ok(Json(UserList { items, next_cursor }))
}

async fn jwks(State(state): State<AppState>) -> Json<JwkSet> {
    Json(state.tokens.jwks())
}
