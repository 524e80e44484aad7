//! Values that cannot be invalid once parsed: the edge of the service parses requests into
//! these, and everything inside trusts them.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use shared::http::{ApiError, FieldError};
use uuid::Uuid;

/// Trimmed text of `min..=max` characters without control characters (`multiline` lets
/// newlines and tabs through).
fn text(raw: &str, min: usize, max: usize, multiline: bool) -> Result<String, String> {
    let value = raw.trim();
    let chars = value.chars().count();
    if chars < min {
        return Err(if min == 1 {
            "must not be empty".into()
        } else {
            format!("must be at least {min} characters")
        });
    }
    if chars > max {
        return Err(format!("must be at most {max} characters"));
    }
    let allowed = |c: char| multiline && matches!(c, '\n' | '\r' | '\t');
    if value.chars().any(|c| c.is_control() && !allowed(c)) {
        return Err("must not contain control characters".into());
    }
    Ok(value.to_owned())
}

/// A product's name: 1 to 200 characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProductName(String);

impl ProductName {
    pub const MAX: usize = 200;

    pub fn parse(raw: &str) -> Result<Self, String> {
        text(raw, 1, Self::MAX, false).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A product's description: up to 10,000 characters, line breaks allowed; may be empty.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Description(String);

impl Description {
    pub const MAX: usize = 10_000;

    pub fn parse(raw: &str) -> Result<Self, String> {
        text(raw, 0, Self::MAX, true).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A price in minor units (cents): positive, and small enough that order totals of many
/// units cannot overflow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PriceCents(i64);

impl PriceCents {
    /// 100 million in major units.
    pub const MAX: i64 = 10_000_000_000;

    pub fn parse(raw: i64) -> Result<Self, String> {
        if raw <= 0 {
            return Err("must be greater than 0".into());
        }
        if raw > Self::MAX {
            return Err(format!("must be at most {}", Self::MAX));
        }
        Ok(Self(raw))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

/// Active ISO 4217 codes of circulating currencies (funds, metals, test codes and
/// withdrawn currencies excluded). Sorted, for binary search.
const ISO_4217: &[&str] = &[
    "AED", "AFN", "ALL", "AMD", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT", "BHD",
    "BIF", "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF", "CHF",
    "CLP", "CNY", "COP", "CRC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD", "EGP", "ERN",
    "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD", "HKD",
    "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD", "JOD", "JPY", "KES",
    "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP", "LKR", "LRD", "LSL",
    "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN",
    "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK", "PHP",
    "PKR", "PLN", "PYG", "QAR", "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG", "SEK",
    "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS", "TMT",
    "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "UYU", "UZS", "VED", "VES",
    "VND", "VUV", "WST", "XAF", "XCD", "XCG", "XOF", "XPF", "YER", "ZAR", "ZMW", "ZWG",
];

/// An ISO 4217 currency code, upper case as the standard writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Currency(String);

impl Currency {
    pub fn parse(raw: &str) -> Result<Self, String> {
        if raw.len() != 3 || !raw.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err("must be an upper-case ISO 4217 code such as EUR or USD".into());
        }
        if ISO_4217.binary_search(&raw).is_err() {
            return Err(format!("{raw} is not an ISO 4217 currency code"));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Units of stock a new product starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitialStock(i64);

impl InitialStock {
    pub const MAX: i64 = 1_000_000_000;

    pub fn parse(raw: i64) -> Result<Self, String> {
        if raw < 0 {
            return Err("must not be negative".into());
        }
        if raw > Self::MAX {
            return Err(format!("must be at most {}", Self::MAX));
        }
        Ok(Self(raw))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

/// A category's name in URLs: 1 to 64 of `a-z`, `0-9` and single inner hyphens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slug(String);

impl Slug {
    pub const MAX: usize = 64;

    pub fn parse(raw: &str) -> Result<Self, String> {
        let valid = !raw.is_empty()
            && raw.len() <= Self::MAX
            && raw
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !raw.starts_with('-')
            && !raw.ends_with('-')
            && !raw.contains("--");
        if valid {
            Ok(Self(raw.to_owned()))
        } else {
            Err(format!(
                "must be 1 to {} characters of a-z, 0-9 and single hyphens inside, e.g. \
                 home-garden",
                Self::MAX
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A category's display name: 1 to 100 characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CategoryName(String);

impl CategoryName {
    pub fn parse(raw: &str) -> Result<Self, String> {
        text(raw, 1, 100, false).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Stars given in a review: 1 to 5.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rating(i16);

impl Rating {
    pub fn parse(raw: i64) -> Result<Self, String> {
        match i16::try_from(raw) {
            Ok(stars @ 1..=5) => Ok(Self(stars)),
            _ => Err("must be a whole number from 1 to 5".into()),
        }
    }

    pub fn get(self) -> i16 {
        self.0
    }
}

/// What a review says: 1 to 5,000 characters, line breaks allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReviewBody(String);

impl ReviewBody {
    pub fn parse(raw: &str) -> Result<Self, String> {
        text(raw, 1, 5_000, true).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Items per page: 1 to 100, 20 when not given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit(i64);

impl Limit {
    pub const DEFAULT: i64 = 20;
    pub const MAX: i64 = 100;

    pub fn parse(raw: Option<&str>) -> Result<Self, String> {
        let Some(raw) = raw else {
            return Ok(Self(Self::DEFAULT));
        };
        match raw.trim().parse::<i64>() {
            Ok(n) if (1..=Self::MAX).contains(&n) => Ok(Self(n)),
            _ => Err(format!("must be a whole number from 1 to {}", Self::MAX)),
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

/// Words to search for in names and descriptions: at most 200 characters; blank means no
/// search.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SearchText(String);

impl SearchText {
    pub fn parse(raw: Option<&str>) -> Result<Option<Self>, String> {
        match raw.map(str::trim) {
            None | Some("") => Ok(None),
            Some(q) => text(q, 1, 200, false).map(|q| Some(Self(q))),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Where the next page of a listing starts: the sort key of the last item shown. Opaque
/// to clients (base64url of JSON), so the sort key can change without breaking them.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    /// Search relevance of the last item, in listings ordered by relevance.
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<f32>,
    #[serde(rename = "id")]
    pub id: Uuid,
}

const NOT_A_CURSOR: &str = "is not a cursor given by this listing";

impl Cursor {
    pub fn encode(&self) -> String {
        // Serialising a struct of a float and a UUID cannot fail.
        let json = serde_json::to_vec(self).unwrap_or_default();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    /// Parses a cursor given back by a client; `ranked` says whether the listing it is
    /// used with is ordered by relevance.
    pub fn parse(raw: Option<&str>, ranked: bool) -> Result<Option<Self>, String> {
        let Some(raw) = raw.filter(|r| !r.is_empty()) else {
            return Ok(None);
        };
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(raw)
            .map_err(|_| NOT_A_CURSOR.to_owned())?;
        let cursor: Self = serde_json::from_slice(&bytes).map_err(|_| NOT_A_CURSOR.to_owned())?;
        match cursor.rank {
            Some(rank) if !ranked || !rank.is_finite() => Err(NOT_A_CURSOR.into()),
            None if ranked => Err(NOT_A_CURSOR.into()),
            _ => Ok(Some(cursor)),
        }
    }
}

/// Parses an id from a path; anything that is not a UUID names nothing.
pub fn path_id(raw: &str, what: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::NotFound(format!("no such {what}")))
}

/// Collects the problems of several fields into one validation error.
#[derive(Default)]
pub struct Problems(Vec<FieldError>);

impl Problems {
    pub fn check<T>(&mut self, field: &str, result: Result<T, String>) -> Option<T> {
        result.map_err(|message| self.add(field, message)).ok()
    }

    /// A field the request must have.
    pub fn required<T>(&mut self, field: &str, value: Option<T>) -> Option<T> {
        if value.is_none() {
            self.add(field, "is required".into());
        }
        value
    }

    /// A field the request must have, parsed.
    pub fn require<T, U>(
        &mut self,
        field: &str,
        value: Option<T>,
        parse: impl FnOnce(T) -> Result<U, String>,
    ) -> Option<U> {
        let value = self.required(field, value)?;
        self.check(field, parse(value))
    }

    pub fn add(&mut self, field: &str, message: String) {
        self.0.push(FieldError {
            field: field.to_owned(),
            message,
        });
    }

    pub fn into_result(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(self.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(
            ProductName::parse("  Teapot ").expect("valid").as_str(),
            "Teapot"
        );
        assert!(ProductName::parse("   ").is_err());
        assert!(ProductName::parse(&"a".repeat(200)).is_ok());
        assert!(ProductName::parse(&"a".repeat(201)).is_err());
        assert!(ProductName::parse("tea\npot").is_err());
        assert!(Description::parse("").is_ok());
        assert!(Description::parse("two\nlines\tand a tab").is_ok());
        assert!(Description::parse("bell\u{7}").is_err());
    }

    #[test]
    fn prices_are_positive_and_bounded() {
        assert!(PriceCents::parse(0).is_err());
        assert!(PriceCents::parse(-5).is_err());
        assert_eq!(PriceCents::parse(1).map(PriceCents::get), Ok(1));
        assert!(PriceCents::parse(PriceCents::MAX).is_ok());
        assert!(PriceCents::parse(PriceCents::MAX + 1).is_err());
    }

    #[test]
    fn currencies_are_upper_case_iso_4217_codes() {
        assert!(
            ISO_4217.windows(2).all(|w| w[0] < w[1]),
            "sorted, no repeats"
        );
        for good in ["EUR", "USD", "JPY", "CHF", "XOF"] {
            assert!(Currency::parse(good).is_ok(), "{good}");
        }
        for bad in ["usd", "Usd", "US", "USDT", "XYZ", "XXX", "XAU", "", "€"] {
            assert!(Currency::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn stock_may_be_zero_but_not_negative() {
        assert_eq!(InitialStock::parse(0).map(InitialStock::get), Ok(0));
        assert!(InitialStock::parse(-1).is_err());
        assert!(InitialStock::parse(InitialStock::MAX + 1).is_err());
    }

    #[test]
    fn slugs_are_lower_case_words_joined_by_hyphens() {
        for good in ["books", "home-garden", "a", "tv-4k"] {
            assert!(Slug::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Books",
            "home_garden",
            "-a",
            "a-",
            "a--b",
            "a b",
            &"a".repeat(65),
        ] {
            assert!(Slug::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn ratings_are_one_to_five_stars() {
        assert_eq!(Rating::parse(1).map(Rating::get), Ok(1));
        assert_eq!(Rating::parse(5).map(Rating::get), Ok(5));
        for bad in [0, 6, -1, 70_000] {
            assert!(Rating::parse(bad).is_err(), "{bad}");
        }
        assert!(ReviewBody::parse("  ").is_err());
        assert!(ReviewBody::parse("Lovely.\nWould buy again.").is_ok());
    }

    #[test]
    fn limits_default_and_stay_in_range() {
        assert_eq!(Limit::parse(None).map(Limit::get), Ok(Limit::DEFAULT));
        assert_eq!(Limit::parse(Some("5")).map(Limit::get), Ok(5));
        for bad in ["0", "101", "-1", "ten", "2.5"] {
            assert!(Limit::parse(Some(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn blank_search_text_is_no_search() {
        assert_eq!(SearchText::parse(None), Ok(None));
        assert_eq!(SearchText::parse(Some("   ")), Ok(None));
        assert_eq!(
            SearchText::parse(Some(" tea ")).map(|q| q.map(|q| q.as_str().to_owned())),
            Ok(Some("tea".into()))
        );
        assert!(SearchText::parse(Some(&"a".repeat(201))).is_err());
    }

    #[test]
    fn cursors_round_trip_and_refuse_anything_else() {
        let plain = Cursor {
            rank: None,
            id: Uuid::now_v7(),
        };
        assert_eq!(Cursor::parse(Some(&plain.encode()), false), Ok(Some(plain)));
        assert!(
            Cursor::parse(Some(&plain.encode()), true).is_err(),
            "a plain cursor in a search"
        );

        // The rank must come back bit for bit: the database compares it exactly.
        let ranked = Cursor {
            rank: Some(0.060_793_53),
            id: Uuid::now_v7(),
        };
        let back = Cursor::parse(Some(&ranked.encode()), true)
            .expect("valid")
            .expect("some");
        assert_eq!(
            back.rank.map(f32::to_bits),
            ranked.rank.map(f32::to_bits),
            "exact"
        );
        assert!(Cursor::parse(Some(&ranked.encode()), false).is_err());

        assert_eq!(Cursor::parse(None, false), Ok(None));
        for bad in ["!!", "e30", "bm90IGpzb24", "eyJpZCI6MX0"] {
            assert!(Cursor::parse(Some(bad), false).is_err(), "{bad}");
        }
    }
}
