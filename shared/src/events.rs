//! The event catalogue (DESIGN.md §5): the data each event carries. Producers and
//! consumers share these types, so a change to an event is a change in one place.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use uuid::Uuid;

use crate::auth::Role;
use crate::messaging::NewEvent;

/// An event's data type, bound to its routing key and version.
pub trait Event: Serialize + DeserializeOwned {
    const TYPE: &'static str;
    const VERSION: u32 = 1;

    /// This event as one to write to the outbox, in the saga or unit `correlation_id`.
    fn to_new(&self, correlation_id: Uuid) -> NewEvent {
        NewEvent {
            event_type: Self::TYPE.to_owned(),
            version: Self::VERSION,
            correlation_id,
            causation_id: None,
            // Serialising our own plain data types cannot fail.
            data: serde_json::to_value(self).unwrap_or_default(),
        }
    }
}

/// A new account (user-svc).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UserRegistered {
    pub user_id: Uuid,
    pub email: String,
    pub name: String,
    pub roles: Vec<Role>,
    pub registered_at: DateTime<Utc>,
}

impl Event for UserRegistered {
    const TYPE: &'static str = "user.registered";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_new_carries_type_version_and_data() {
        let event = UserRegistered {
            user_id: Uuid::now_v7(),
            email: "ada@example.com".into(),
            name: "Ada".into(),
            roles: vec![Role::Customer],
            registered_at: Utc::now(),
        };
        let new = event.to_new(event.user_id);
        assert_eq!(new.event_type, "user.registered");
        assert_eq!(new.version, 1);
        assert_eq!(new.correlation_id, event.user_id);
        let back: UserRegistered = serde_json::from_value(new.data).expect("round trip");
        assert_eq!(back, event);
    }
}
