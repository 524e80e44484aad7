//! The gateway's dead-letter API as the CLI calls it: a token (given, or from a login),
//! and problem+json answers turned into readable errors.

use anyhow::{Context as _, bail};
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub struct Client {
    http: reqwest::Client,
    gateway: Url,
    token: String,
}

/// How to get a token: one given, or an admin's email and password to log in with.
pub struct Credentials {
    pub token: Option<String>,
    pub email: Option<String>,
    pub password: Option<String>,
}

impl Client {
    pub async fn connect(gateway: &str, credentials: Credentials) -> anyhow::Result<Self> {
        let gateway =
            Url::parse(gateway).with_context(|| format!("--gateway {gateway:?} is not a URL"))?;
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .context("making the HTTP client")?;
        let token = match credentials {
            Credentials {
                token: Some(token), ..
            } => token,
            Credentials {
                email: Some(email),
                password,
                ..
            } => {
                let password = match password {
                    Some(p) => p,
                    None => rpassword::prompt_password(format!("Password for {email}: "))
                        .context("reading the password")?,
                };
                login(&http, &gateway, &email, &password).await?
            }
            _ => bail!(
                "an admin token is needed: --token (or COMMERCE_TOKEN), or --email to log in \
                 (the password is asked for)"
            ),
        };
        Ok(Self {
            http,
            gateway,
            token,
        })
    }

    fn url(&self, path: &str, query: &[(&str, String)]) -> anyhow::Result<Url> {
        let mut url = self
            .gateway
            .join(path)
            .with_context(|| format!("building the URL of {path}"))?;
        if !query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (key, value) in query {
                pairs.append_pair(key, value);
            }
        }
        Ok(url)
    }

    /// Sends one request; a non-2xx answer becomes an error with the problem's detail.
    pub async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&impl Serialize>,
    ) -> anyhow::Result<Option<T>> {
        let url = self.url(path, query)?;
        let mut request = self
            .http
            .request(method.clone(), url.clone())
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("{method} {url}: the gateway did not answer"))?;
        let status = response.status();
        if status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let bytes = response.bytes().await.context("reading the answer")?;
        if !status.is_success() {
            bail!("{method} {}: {}", url.path(), problem_text(status, &bytes));
        }
        serde_json::from_slice(&bytes).map(Some).with_context(|| {
            format!(
                "{method} {}: the answer is not what was expected",
                url.path()
            )
        })
    }

    pub async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> anyhow::Result<T> {
        self.send(Method::GET, path, query, None::<&()>)
            .await?
            .context("the gateway answered without a body")
    }
}

async fn login(
    http: &reqwest::Client,
    gateway: &Url,
    email: &str,
    password: &str,
) -> anyhow::Result<String> {
    let url = gateway.join("/api/v1/auth/login")?;
    let response = http
        .post(url)
        .json(&serde_json::json!({"email": email, "password": password}))
        .send()
        .await
        .context("logging in: the gateway did not answer")?;
    let status = response.status();
    let bytes = response.bytes().await.context("reading the login answer")?;
    if !status.is_success() {
        bail!("logging in as {email}: {}", problem_text(status, &bytes));
    }
    let body: Value = serde_json::from_slice(&bytes).context("reading the login answer")?;
    body["access_token"]
        .as_str()
        .map(str::to_owned)
        .context("the login answer has no access_token")
}

/// `403 Forbidden: detail`, with each field error on its own line.
pub fn problem_text(status: StatusCode, body: &[u8]) -> String {
    let mut text = status.to_string();
    if let Ok(problem) = serde_json::from_slice::<Value>(body) {
        if let Some(detail) = problem["detail"].as_str() {
            text.push_str(": ");
            text.push_str(detail);
        }
        for error in problem["errors"].as_array().into_iter().flatten() {
            text.push_str(&format!(
                "\n  {}: {}",
                error["field"].as_str().unwrap_or("?"),
                error["message"].as_str().unwrap_or("?")
            ));
        }
        if let Some(id) = problem["request_id"].as_str() {
            text.push_str(&format!(" (request id {id})"));
        }
    } else if !body.is_empty() {
        text.push_str(": ");
        text.push_str(&String::from_utf8_lossy(&body[..body.len().min(300)]));
    }
    if status == StatusCode::FORBIDDEN {
        text.push_str("\n  the dead-letter routes are for administrators only");
    }
    text
}
