//! Conditions on grants (attribute-based access on top of the role tree, DESIGN §15): a grant with
//! conditions applies only where and when they all hold.
//!
//! - `annotations`: the object checked (a VM) carries each of these annotations with this value.
//! - `source_cidrs`: the request comes from one of these networks.
//! - `hours_utc`: the request comes within these hours (`"08-18"`: from 08:00 to 17:59 UTC; `"22-06"`
//!   wraps past midnight).
//! - `expires_at`: the request comes before this time.
//!
//! A grant whose conditions fail does not apply: the rule of the nearest grant then looks further.

use std::collections::BTreeMap;
use std::net::IpAddr;

use chrono::{DateTime, Timelike, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Error;

/// At most this many annotations or networks in one grant's conditions.
pub const CONDITIONS_MAX: usize = 16;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantConditions {
    /// The object's annotations must include these (key → value).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// The request's address must be in one of these networks (`10.0.0.0/8`, `::1/128`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_cidrs: Vec<String>,
    /// `"HH-HH"`, UTC: from the first hour to before the second (wrapping past midnight).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hours_utc: Option<String>,
    /// The grant stops applying at this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// Which condition of a grant failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    Annotations,
    SourceCidrs,
    HoursUtc,
    ExpiresAt,
}

impl Condition {
    pub fn as_str(self) -> &'static str {
        match self {
            Condition::Annotations => "annotations",
            Condition::SourceCidrs => "source_cidrs",
            Condition::HoursUtc => "hours_utc",
            Condition::ExpiresAt => "expires_at",
        }
    }
}

fn hours(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once('-')?;
    let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
    (a <= 24 && b <= 24 && a % 24 != b % 24).then_some((a % 24, b % 24))
}

impl GrantConditions {
    pub fn is_empty(&self) -> bool {
        self == &GrantConditions::default()
    }

    /// Checks the conditions' form (`field` is where they are in the request).
    pub fn check(&self, field: &str) -> Result<(), Error> {
        if self.annotations.len() > CONDITIONS_MAX || self.source_cidrs.len() > CONDITIONS_MAX {
            return Err(Error::invalid(field, format!("at most {CONDITIONS_MAX} annotations or networks")));
        }
        for (k, v) in &self.annotations {
            if k.is_empty() || k.len() > 64 || v.len() > 256 {
                return Err(Error::invalid(
                    &format!("{field}.annotations.{k}"),
                    "an annotation key has 1 to 64 bytes, its value at most 256",
                ));
            }
        }
        for (i, c) in self.source_cidrs.iter().enumerate() {
            if c.parse::<ipnet::IpNet>().is_err() {
                return Err(Error::invalid(
                    &format!("{field}.source_cidrs[{i}]"),
                    format!("{c} is not a network like 10.0.0.0/8 or fd00::/8"),
                ));
            }
        }
        if let Some(h) = &self.hours_utc
            && hours(h).is_none()
        {
            return Err(Error::invalid(
                &format!("{field}.hours_utc"),
                format!("{h} is not hours like 08-18 (from 08:00 to before 18:00 UTC; 22-06 wraps)"),
            ));
        }
        Ok(())
    }

    /// The first condition about the request (address, time) that fails, if any; annotations are
    /// the object's and are checked where the object is known.
    pub fn request_failure(&self, addr: Option<IpAddr>, now: DateTime<Utc>) -> Option<Condition> {
        if let Some(exp) = self.expires_at
            && now >= exp
        {
            return Some(Condition::ExpiresAt);
        }
        if !self.source_cidrs.is_empty() {
            let inside = addr.is_some_and(|a| {
                let a = match a {
                    IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(a),
                    v4 @ IpAddr::V4(_) => v4,
                };
                self.source_cidrs.iter().filter_map(|c| c.parse::<ipnet::IpNet>().ok()).any(|n| n.contains(&a))
            });
            if !inside {
                return Some(Condition::SourceCidrs);
            }
        }
        if let Some((from, to)) = self.hours_utc.as_deref().and_then(hours) {
            let h = now.hour();
            let within = if from < to { h >= from && h < to } else { h >= from || h < to };
            if !within {
                return Some(Condition::HoursUtc);
            }
        }
        None
    }

    /// Whether an object with these annotations meets the annotation condition.
    pub fn annotations_match(&self, annotations: &BTreeMap<String, String>) -> bool {
        self.annotations.iter().all(|(k, v)| annotations.get(k) == Some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 30, h, 30, 0).unwrap()
    }

    #[test]
    fn each_request_condition_allows_and_denies() {
        let c = GrantConditions { source_cidrs: vec!["10.0.0.0/8".into()], ..Default::default() };
        assert_eq!(c.request_failure(Some("10.1.2.3".parse().unwrap()), at(9)), None);
        assert_eq!(c.request_failure(Some("::ffff:10.1.2.3".parse().unwrap()), at(9)), None);
        assert_eq!(c.request_failure(Some("192.168.0.1".parse().unwrap()), at(9)), Some(Condition::SourceCidrs));
        assert_eq!(c.request_failure(None, at(9)), Some(Condition::SourceCidrs));
        let day = GrantConditions { hours_utc: Some("08-18".into()), ..Default::default() };
        assert_eq!(day.request_failure(None, at(8)), None);
        assert_eq!(day.request_failure(None, at(17)), None);
        assert_eq!(day.request_failure(None, at(18)), Some(Condition::HoursUtc));
        let night = GrantConditions { hours_utc: Some("22-06".into()), ..Default::default() };
        assert_eq!(night.request_failure(None, at(23)), None);
        assert_eq!(night.request_failure(None, at(5)), None);
        assert_eq!(night.request_failure(None, at(12)), Some(Condition::HoursUtc));
        let exp = GrantConditions { expires_at: Some(at(10)), ..Default::default() };
        assert_eq!(exp.request_failure(None, at(9)), None);
        assert_eq!(exp.request_failure(None, at(11)), Some(Condition::ExpiresAt));
        let ann = GrantConditions { annotations: [("env".to_owned(), "dev".to_owned())].into(), ..Default::default() };
        assert!(
            ann.annotations_match(&[("env".to_owned(), "dev".to_owned()), ("x".to_owned(), "y".to_owned())].into())
        );
        assert!(!ann.annotations_match(&[("env".to_owned(), "prod".to_owned())].into()));
        assert!(!ann.annotations_match(&BTreeMap::new()));
    }

    #[test]
    fn bad_conditions_are_named() {
        for (c, field) in [
            (GrantConditions { source_cidrs: vec!["10.0.0.0/33".into()], ..Default::default() }, "c.source_cidrs[0]"),
            (GrantConditions { hours_utc: Some("8-8".into()), ..Default::default() }, "c.hours_utc"),
            (GrantConditions { hours_utc: Some("25-02".into()), ..Default::default() }, "c.hours_utc"),
            (GrantConditions { hours_utc: Some("nine".into()), ..Default::default() }, "c.hours_utc"),
        ] {
            assert_eq!(c.check("c").unwrap_err().field.as_deref(), Some(field));
        }
    }
}
