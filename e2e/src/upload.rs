//! Bodies for upload tests: images made in memory, and multipart bodies written by hand
//! so that malformed ones can be sent too.

use std::io::Cursor;

use file_svc::image::{DynamicImage, ImageFormat, Rgba, RgbaImage};

pub fn encode(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).expect("encode");
    out.into_inner()
}

/// A PNG with a transparent corner, so its thumbnail stays PNG.
pub fn png(width: u32, height: u32) -> Vec<u8> {
    encode(
        DynamicImage::ImageRgba8(RgbaImage::from_fn(width, height, |x, y| {
            let alpha = if x < width / 4 && y < height / 4 {
                0
            } else {
                255
            };
            Rgba([(x % 256) as u8, (y % 256) as u8, 90, alpha])
        })),
        ImageFormat::Png,
    )
}

pub const BOUNDARY: &str = "commerce-test-boundary-7MA4YWxkTrZu0gW";

pub struct Part<'a> {
    pub name: &'a str,
    pub file_name: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub bytes: &'a [u8],
}

pub fn file_part<'a>(file_name: &'a str, content_type: &'a str, bytes: &'a [u8]) -> Part<'a> {
    Part {
        name: "file",
        file_name: Some(file_name),
        content_type: Some(content_type),
        bytes,
    }
}

pub fn multipart(parts: &[Part<'_>]) -> Vec<u8> {
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(format!("--{BOUNDARY}\r\n").as_bytes());
        let mut disposition = format!("Content-Disposition: form-data; name=\"{}\"", part.name);
        if let Some(file_name) = part.file_name {
            disposition.push_str(&format!("; filename=\"{file_name}\""));
        }
        body.extend_from_slice(format!("{disposition}\r\n").as_bytes());
        if let Some(content_type) = part.content_type {
            body.extend_from_slice(format!("Content-Type: {content_type}\r\n").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(part.bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

pub fn multipart_type() -> String {
    format!("multipart/form-data; boundary={BOUNDARY}")
}
