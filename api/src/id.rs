//! Identifiers.
//!
//! Every entity (merchant, rider, order) and every event carries an [`Id`]: a
//! string of 1–64 characters from `[A-Za-z0-9_.:-]` (API.md). Ids are kept as
//! [`CompactString`] so the common short id lives inline and cloning one per
//! location ping costs no allocation.

use compact_str::CompactString;
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;

/// The longest id accepted.
pub const MAX_ID_LEN: usize = 64;

/// A validated identifier. Construct with [`Id::new`] or by deserializing,
/// both of which reject anything outside the contract.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Id(CompactString);

/// Why a string is not an [`Id`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The string is empty.
    #[error("id must not be empty")]
    Empty,
    /// The string is longer than [`MAX_ID_LEN`].
    #[error("id is longer than {MAX_ID_LEN} characters")]
    TooLong,
    /// The string holds a character outside `[A-Za-z0-9_.:-]`.
    #[error("id may only contain A-Z a-z 0-9 _ . : - (found {0:?})")]
    BadChar(char),
}

impl Id {
    /// Validates `s` as an id.
    pub fn new(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(IdError::TooLong);
        }
        let ok = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-');
        if !s.as_bytes().iter().all(ok) {
            let c = s.chars().find(|c| !c.is_ascii() || !ok(&(*c as u8)));
            return Err(IdError::BadChar(c.expect("a byte failed")));
        }
        Ok(Id(CompactString::from(s)))
    }

    /// A fresh random event id: `ev-` and 120 random bits in 20 URL-safe
    /// base64 characters (23 in all, short enough to be kept inline).
    pub fn new_event() -> Self {
        const DIGITS: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut bits: u128 = rand::random();
        let mut id = *b"ev-....................";
        for digit in &mut id[3..] {
            *digit = DIGITS[(bits & 63) as usize];
            bits >>= 6;
        }
        let id = std::str::from_utf8(&id).expect("base64url digits are ASCII");
        Id(CompactString::new(id))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0.as_str())
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Id::new(&s).map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for Id {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        Id::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_contract_alphabet_and_rejects_the_rest() {
        assert!(Id::new("R1").is_ok());
        assert!(Id::new("order:2026-11-22_a.b").is_ok());
        assert_eq!(Id::new(""), Err(IdError::Empty));
        assert_eq!(Id::new(&"x".repeat(65)), Err(IdError::TooLong));
        assert!(Id::new(&"x".repeat(64)).is_ok());
        assert_eq!(Id::new("a b"), Err(IdError::BadChar(' ')));
        assert_eq!(Id::new("é"), Err(IdError::BadChar('é')));
        assert!(serde_json::from_str::<Id>("\"a/b\"").is_err());
        assert_eq!(serde_json::from_str::<Id>("\"ok\"").unwrap().as_str(), "ok");
    }

    #[test]
    fn event_ids_are_valid_and_distinct() {
        let ids: std::collections::HashSet<Id> = (0..1000).map(|_| Id::new_event()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert_eq!(Id::new(id.as_str()).as_ref(), Ok(id));
            assert_eq!(id.as_str().len(), 23);
            assert!(id.as_str().starts_with("ev-"));
        }
    }
}
