//! The event envelope every message carries (DESIGN.md §4).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use uuid::Uuid;

/// One event as it travels on the broker. `T` is the event's own data.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Envelope<T = serde_json::Value> {
    pub id: Uuid,
    #[serde(rename = "type")]
    pub event_type: String,
    pub version: u32,
    pub occurred_at: DateTime<Utc>,
    pub source: String,
    /// The saga (or other unit of work) this event belongs to.
    pub correlation_id: Uuid,
    /// The event that caused this one; `None` for events caused by an HTTP request.
    pub causation_id: Option<Uuid>,
    pub data: T,
}

impl Envelope {
    /// The data as the handler's own type.
    pub fn data_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&self.data)
    }
}

/// An event a service is about to write to its outbox. The outbox fills in the id,
/// time and source.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub event_type: String,
    pub version: u32,
    pub correlation_id: Uuid,
    pub causation_id: Option<Uuid>,
    pub data: serde_json::Value,
}

impl NewEvent {
    /// A version-1 event in the saga `correlation_id`.
    pub fn new(
        event_type: impl Into<String>,
        correlation_id: Uuid,
        data: impl Serialize,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self {
            event_type: event_type.into(),
            version: 1,
            correlation_id,
            causation_id: None,
            data: serde_json::to_value(data)?,
        })
    }

    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Marks this event as a consequence of `cause`, in the same saga.
    pub fn caused_by<T>(mut self, cause: &Envelope<T>) -> Self {
        self.correlation_id = cause.correlation_id;
        self.causation_id = Some(cause.id);
        self
    }

    pub(crate) fn into_envelope(self, source: &str) -> Envelope {
        Envelope {
            id: Uuid::now_v7(),
            event_type: self.event_type,
            version: self.version,
            occurred_at: Utc::now(),
            source: source.to_owned(),
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            data: self.data,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_serialises_with_the_contract_field_names() {
        let order = Uuid::now_v7();
        let cause = NewEvent::new("order.created", order, serde_json::json!({"n": 1}))
            .expect("serialisable")
            .into_envelope("order-svc");
        let next = NewEvent::new("inventory.reserved", Uuid::nil(), serde_json::json!({}))
            .expect("serialisable")
            .caused_by(&cause)
            .into_envelope("inventory-svc");
        let json = serde_json::to_value(&next).expect("serialisable");
        assert_eq!(json["type"], "inventory.reserved");
        assert_eq!(json["version"], 1);
        assert_eq!(json["source"], "inventory-svc");
        assert_eq!(json["correlation_id"], order.to_string());
        assert_eq!(json["causation_id"], cause.id.to_string());
        let back: Envelope = serde_json::from_value(json).expect("parses");
        assert_eq!(back, next);
    }
}
