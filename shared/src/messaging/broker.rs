//! One AMQP connection per service instance, re-established on demand after the broker
//! goes away. Relays and consumers ask for channels and treat any channel error as
//! "reconnect and carry on".

use std::sync::Arc;
use std::time::Duration;

use lapin::{Channel, Connection, ConnectionProperties, options::ConfirmSelectOptions};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    url: SecretString,
    connection_name: String,
    connection: Mutex<Option<Arc<Connection>>>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("connection_name", &self.inner.connection_name)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("connecting to the broker timed out after {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
}

impl Broker {
    /// Does not connect yet: the first channel request does.
    pub fn new(url: SecretString, connection_name: impl Into<String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                url,
                connection_name: connection_name.into(),
                connection: Mutex::new(None),
            }),
        }
    }

    /// The live connection, connecting first if there is none or it has failed.
    pub async fn connection(&self) -> Result<Arc<Connection>, BrokerError> {
        let mut slot = self.inner.connection.lock().await;
        if let Some(conn) = slot.as_ref()
            && conn.status().connected()
        {
            return Ok(conn.clone());
        }
        let properties = ConnectionProperties::default()
            .with_connection_name(self.inner.connection_name.clone().into());
        let conn = tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect(self.inner.url.expose_secret(), properties),
        )
        .await
        .map_err(|_| BrokerError::Timeout(CONNECT_TIMEOUT))??;
        tracing::info!(connection = %self.inner.connection_name, "connected to the broker");
        let conn = Arc::new(conn);
        *slot = Some(conn.clone());
        Ok(conn)
    }

    pub async fn channel(&self) -> Result<Channel, BrokerError> {
        Ok(self.connection().await?.create_channel().await?)
    }

    /// A channel in publisher-confirm mode.
    pub async fn confirm_channel(&self) -> Result<Channel, BrokerError> {
        let channel = self.channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(channel)
    }

    /// Whether the broker answers now (connects if needed), for readiness checks.
    pub async fn check(&self) -> Result<(), BrokerError> {
        self.connection().await.map(drop)
    }

    /// Closes the connection; the next request opens a new one.
    pub async fn close(&self) {
        if let Some(conn) = self.inner.connection.lock().await.take() {
            let _ = conn.close(200, "closing".into()).await;
        }
    }
}
