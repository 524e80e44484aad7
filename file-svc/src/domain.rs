//! What an upload is made of, parsed at the edge: the image kind decided by content, the
//! content hash that names stored bytes, and entity tags for conditional requests.

use std::fmt;

use sha2::Digest as _;

/// The image kinds accepted. Decided by magic bytes only: a name or a declared content
/// type is what a client says, the bytes are what a browser will act on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageKind {
    Jpeg,
    Png,
    WebP,
    Gif,
}

/// Enough leading bytes for every signature we accept (WebP needs 12: `RIFF....WEBP`).
pub const SNIFF_LEN: usize = 16;

impl ImageKind {
    /// The kind the leading bytes declare, if it is one we accept.
    pub fn sniff(head: &[u8]) -> Option<Self> {
        match image::guess_format(head).ok()? {
            image::ImageFormat::Jpeg => Some(Self::Jpeg),
            image::ImageFormat::Png => Some(Self::Png),
            image::ImageFormat::WebP => Some(Self::WebP),
            image::ImageFormat::Gif => Some(Self::Gif),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Jpeg => "image/jpeg",
            Self::Png => "image/png",
            Self::WebP => "image/webp",
            Self::Gif => "image/gif",
        }
    }

    pub fn format(self) -> image::ImageFormat {
        match self {
            Self::Jpeg => image::ImageFormat::Jpeg,
            Self::Png => image::ImageFormat::Png,
            Self::WebP => image::ImageFormat::WebP,
            Self::Gif => image::ImageFormat::Gif,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Jpeg => "JPEG",
            Self::Png => "PNG",
            Self::WebP => "WebP",
            Self::Gif => "GIF",
        }
    }
}

/// SHA-256 of stored bytes, as 64 lower-case hex digits. It is the file's name on disk
/// and its entity tag, so it can only be made from a digest or parsed from exactly that
/// shape: nothing else can ever reach a path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ContentHash(String);

impl ContentHash {
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_digest(&sha2::Sha256::digest(bytes))
    }

    pub fn from_digest(digest: &[u8]) -> Self {
        use std::fmt::Write as _;
        let hex = digest.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        });
        Self(hex)
    }

    /// A hash read back from the database; `None` unless it has the shape we write.
    pub fn parse(hex: &str) -> Option<Self> {
        let valid = hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        valid.then(|| Self(hex.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A strong entity tag: the bytes behind a hash never change.
    pub fn etag(&self) -> String {
        format!("\"{}\"", self.0)
    }

    /// Whether an `If-None-Match` header value names this content (weak comparison, as
    /// RFC 9110 §13.1.2 asks for this header).
    pub fn matches_if_none_match(&self, header: &str) -> bool {
        header
            .split(',')
            .map(str::trim)
            .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == self.etag().as_str())
    }
}

impl fmt::Display for ContentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_come_from_magic_bytes_only() {
        assert_eq!(
            ImageKind::sniff(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"),
            Some(ImageKind::Png)
        );
        assert_eq!(
            ImageKind::sniff(b"\xff\xd8\xff\xe0\0\x10JFIF"),
            Some(ImageKind::Jpeg)
        );
        assert_eq!(
            ImageKind::sniff(b"GIF89a\x01\0\x01\0"),
            Some(ImageKind::Gif)
        );
        assert_eq!(
            ImageKind::sniff(b"RIFF\x24\0\0\0WEBPVP8 "),
            Some(ImageKind::WebP)
        );
        // Recognisable images we do not take, and things that only look similar.
        assert_eq!(ImageKind::sniff(b"BM\x36\0\0\0\0\0\0\0\x36\0"), None);
        assert_eq!(ImageKind::sniff(b"II*\0\x08\0\0\0"), None);
        assert_eq!(ImageKind::sniff(b"RIFF\x24\0\0\0WAVEfmt "), None);
        assert_eq!(
            ImageKind::sniff(b"<svg xmlns=\"http://www.w3.org/2000/svg\">"),
            None
        );
        assert_eq!(ImageKind::sniff(b"not a png at all"), None);
        assert_eq!(ImageKind::sniff(b""), None);
    }

    #[test]
    fn hashes_are_lower_hex_sha256_and_nothing_else_parses() {
        let hash = ContentHash::of(b"abc");
        assert_eq!(
            hash.as_str(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(ContentHash::parse(hash.as_str()), Some(hash.clone()));
        for bad in [
            "",
            "../../etc/passwd",
            &hash.as_str().to_uppercase(),
            &hash.as_str()[1..],
            &format!("{}0", hash.as_str()),
            &format!("{}/", &hash.as_str()[1..]),
        ] {
            assert_eq!(ContentHash::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn if_none_match_compares_weakly_and_accepts_lists_and_star() {
        let hash = ContentHash::of(b"abc");
        let tag = hash.etag();
        assert!(tag.starts_with('"') && tag.ends_with('"') && !tag.starts_with("W/"));
        assert!(hash.matches_if_none_match(&tag));
        assert!(hash.matches_if_none_match(&format!("W/{tag}")));
        assert!(hash.matches_if_none_match(&format!("\"other\", {tag}")));
        assert!(hash.matches_if_none_match("*"));
        assert!(!hash.matches_if_none_match("\"other\""));
        assert!(!hash.matches_if_none_match(hash.as_str()), "unquoted");
        assert!(!hash.matches_if_none_match(""));
    }
}
