//! Object names: `[a-z0-9][a-z0-9._-]{0,62}`. Names are unique per kind and may be used wherever an
//! API path takes an object, beside its UUID; the rule keeps them safe in paths, file names and URLs.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A validated object name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

/// Why a string is not a valid [`Name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("a name must not be empty")]
    Empty,
    #[error("a name has at most 63 characters")]
    TooLong,
    #[error("a name starts with a lowercase letter or a digit")]
    BadStart,
    #[error("a name holds only lowercase letters, digits, '.', '_' and '-'")]
    BadChar,
}

impl Name {
    pub const MAX_LEN: usize = 63;

    pub fn parse(s: &str) -> Result<Name, NameError> {
        let bytes = s.as_bytes();
        let Some(first) = bytes.first() else {
            return Err(NameError::Empty);
        };
        if bytes.len() > Self::MAX_LEN {
            return Err(NameError::TooLong);
        }
        if !(first.is_ascii_lowercase() || first.is_ascii_digit()) {
            return Err(NameError::BadStart);
        }
        if !bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')) {
            return Err(NameError::BadChar);
        }
        Ok(Name(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Name::parse(&s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl utoipa::PartialSchema for Name {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .pattern(Some("^[a-z0-9][a-z0-9._-]{0,62}$"))
            .min_length(Some(1))
            .max_length(Some(63))
            .into()
    }
}

impl utoipa::ToSchema for Name {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_good_names() {
        for s in ["a", "0", "web-1", "team_a.b", &"x".repeat(63)] {
            assert!(Name::parse(s).is_ok(), "{s}");
        }
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(Name::parse(""), Err(NameError::Empty));
        assert_eq!(Name::parse(&"x".repeat(64)), Err(NameError::TooLong));
        assert_eq!(Name::parse("../x"), Err(NameError::BadStart));
        assert_eq!(Name::parse("-x"), Err(NameError::BadStart));
        assert_eq!(Name::parse("A"), Err(NameError::BadStart));
        assert_eq!(Name::parse("a b"), Err(NameError::BadChar));
        assert_eq!(Name::parse("a/b"), Err(NameError::BadChar));
        assert_eq!(Name::parse("aB"), Err(NameError::BadChar));
    }

    #[test]
    fn deserialize_validates() {
        let e = serde_json::from_str::<Name>("\"A B\"").unwrap_err();
        assert!(e.to_string().contains("starts with"), "{e}");
    }
}
