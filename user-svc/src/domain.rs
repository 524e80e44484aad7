//! Values that cannot be invalid once parsed.

use shared::auth::Role;
use shared::http::FieldError;

/// A normalised email address: trimmed and lower-cased, one `@`, a dotted domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let email = raw.trim().to_lowercase();
        let (local, domain) = email
            .split_once('@')
            .ok_or_else(|| "must be an email address".to_owned())?;
        let valid = !local.is_empty()
            && local.len() <= 64
            && domain.len() <= 253
            && email.len() <= 254
            && !domain.contains('@')
            && domain.contains('.')
            && !domain.starts_with('.')
            && !domain.ends_with('.')
            && !email.chars().any(|c| c.is_whitespace() || c.is_control());
        if valid {
            Ok(Self(email))
        } else {
            Err("must be an email address".into())
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A display name: trimmed, 1 to 100 characters, no control characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Name(String);

impl Name {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let name = raw.trim();
        if name.is_empty() {
            return Err("must not be empty".into());
        }
        if name.chars().count() > 100 {
            return Err("must be at most 100 characters".into());
        }
        if name.chars().any(char::is_control) {
            return Err("must not contain control characters".into());
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

pub const PASSWORD_MIN_CHARS: usize = 10;
/// Hashing cost grows with length; nobody needs more.
pub const PASSWORD_MAX_CHARS: usize = 128;

/// A password that passed the strength rule: 10 to 128 characters and hard to guess
/// (zxcvbn score 3 of 4 or better, counting the person's email and name as known).
pub struct Password(String);

impl Password {
    pub fn parse(raw: &str, email: &str, name: &str) -> Result<Self, String> {
        let chars = raw.chars().count();
        if chars < PASSWORD_MIN_CHARS {
            return Err(format!("must be at least {PASSWORD_MIN_CHARS} characters"));
        }
        if chars > PASSWORD_MAX_CHARS {
            return Err(format!("must be at most {PASSWORD_MAX_CHARS} characters"));
        }
        let local = email.split('@').next().unwrap_or_default();
        let entropy = zxcvbn::zxcvbn(raw, &[email, local, name]);
        if entropy.score() < zxcvbn::Score::Three {
            let hint = entropy
                .feedback()
                .and_then(|f| f.warning().map(|w| w.to_string()))
                .unwrap_or_else(|| "add more words or characters".into());
            return Err(format!("is too easy to guess: {hint}"));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// The roles one may register with; nobody can register as admin.
pub fn registrable_role(raw: Option<&str>) -> Result<Role, String> {
    match raw.map(str::trim) {
        None | Some("customer") => Ok(Role::Customer),
        Some("seller") => Ok(Role::Seller),
        Some(_) => Err("must be customer or seller".into()),
    }
}

/// Collects the problems of several fields into one validation error.
#[derive(Default)]
pub struct Problems(Vec<FieldError>);

impl Problems {
    pub fn check<T>(&mut self, field: &str, result: Result<T, String>) -> Option<T> {
        result
            .map_err(|message| {
                self.0.push(FieldError {
                    field: field.to_owned(),
                    message,
                })
            })
            .ok()
    }

    pub fn into_result(self) -> Result<(), shared::http::ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(shared::http::ApiError::Validation(self.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised() {
        assert_eq!(
            Email::parse("  Ada.Lovelace@Example.COM ")
                .expect("valid")
                .as_str(),
            "ada.lovelace@example.com"
        );
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a b@example.com",
            "ada@@x.com",
            "ada@.com",
        ] {
            assert!(Email::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn weak_passwords_are_refused_with_a_reason() {
        let email = "ada@example.com";
        assert!(Password::parse("short", email, "Ada").is_err());
        assert!(Password::parse("password123", email, "Ada").is_err());
        assert!(Password::parse("ada@example.com1", email, "Ada").is_err());
        let err = Password::parse("aaaaaaaaaaaa", email, "Ada")
            .err()
            .expect("weak");
        assert!(err.starts_with("is too easy to guess"), "{err}");
        assert!(Password::parse("correct horse battery staple", email, "Ada").is_ok());
        assert!(Password::parse(&"x".repeat(200), email, "Ada").is_err());
    }

    #[test]
    fn nobody_registers_as_admin() {
        assert_eq!(registrable_role(None), Ok(Role::Customer));
        assert_eq!(registrable_role(Some("seller")), Ok(Role::Seller));
        assert!(registrable_role(Some("admin")).is_err());
        assert!(registrable_role(Some("Admin")).is_err());
    }

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(Name::parse("  Ada ").expect("valid").as_str(), "Ada");
        assert!(Name::parse("   ").is_err());
        assert!(Name::parse(&"a".repeat(101)).is_err());
        assert!(Name::parse("a\u{7}b").is_err());
    }
}
