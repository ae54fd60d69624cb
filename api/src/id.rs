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
        Self::random::<23>()
    }

    /// A fresh random id for a batch of events: `ev-` and 96 random bits in
    /// 16 URL-safe base64 characters. Its `i`-th event is [`Id::item`]`(i)`,
    /// 24 characters at most for the largest batch, so still inline.
    pub fn new_batch() -> Self {
        Self::random::<19>()
    }

    /// `ev-` and `N - 3` random URL-safe base64 characters (`N` ≤ 24).
    fn random<const N: usize>() -> Self {
        const DIGITS: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut bits: u128 = rand::random();
        let mut id = [b'-'; N];
        id[..3].copy_from_slice(b"ev-");
        for digit in &mut id[3..] {
            *digit = DIGITS[(bits & 63) as usize];
            bits >>= 6;
        }
        let id = std::str::from_utf8(&id).expect("base64url digits are ASCII");
        Id(CompactString::new(id))
    }

    /// The id of the `i`-th event of the batch `self`: `{self}.{i}`; `None`
    /// if that would be longer than [`MAX_ID_LEN`].
    pub fn item(&self, i: usize) -> Option<Id> {
        let mut digits = [0u8; 20];
        let mut at = digits.len();
        let mut n = i;
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        let (base, digits) = (self.0.as_bytes(), &digits[at..]);
        let len = base.len() + 1 + digits.len();
        if len > MAX_ID_LEN {
            return None;
        }
        // Built in place: a batch's items are made once per ping.
        let mut id = [0u8; MAX_ID_LEN];
        id[..base.len()].copy_from_slice(base);
        id[base.len()] = b'.';
        id[base.len() + 1..len].copy_from_slice(digits);
        let id = std::str::from_utf8(&id[..len]).expect("an id and digits are ASCII");
        Some(Id(CompactString::new(id)))
    }

    /// The batch id `self` is item `i` of (see [`Id::item`]), if it is one.
    pub fn batch_of(&self, i: usize) -> Option<&str> {
        let (base, index) = self.0.rsplit_once('.')?;
        let canonical = index == "0" || !index.starts_with('0');
        (canonical && index.parse() == Ok(i)).then_some(base)
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

    #[test]
    fn batch_items_name_their_batch_and_index() {
        let batch = Id::new_batch();
        assert_eq!(batch.as_str().len(), 19);
        assert_ne!(batch, Id::new_batch());
        let last = batch.item(9_999).unwrap();
        assert_eq!(last.as_str(), format!("{batch}.9999"));
        assert_eq!(Id::new(last.as_str()).as_ref(), Ok(&last));
        assert!(last.as_str().len() <= 24, "kept inline");
        for i in [0, 7, 10, 123] {
            let item = batch.item(i).unwrap();
            assert_eq!(item.batch_of(i), Some(batch.as_str()));
            assert_eq!(item.batch_of(i + 1), None);
        }
        assert_eq!(
            Id::new("b.07").unwrap().batch_of(7),
            None,
            "one spelling per index"
        );
        assert_eq!(Id::new("b7").unwrap().batch_of(7), None);
        assert_eq!(Id::new(&"x".repeat(62)).unwrap().item(10), None);
        assert_eq!(
            Id::new(&"x".repeat(62))
                .unwrap()
                .item(9)
                .unwrap()
                .as_str()
                .len(),
            64
        );
    }
}
