//! What an upload costs in CPU, with the real pipeline (`imaging::process`: header,
//! pixel check, decode under limits, thumbnail, encode) on images made here: the
//! decoding semaphore and the pixel limit are sized from these numbers. Also the cost of
//! refusing a decompression bomb, which must not depend on its declared size, and how
//! large the same thumbnail would be as PNG (why opaque images get JPEG thumbnails).
//!
//!     cargo bench -p file-svc --bench images
//!
//! Environment: BENCH_ROUNDS (per image, default 5; the median is reported).

use std::io::Cursor;
use std::time::{Duration, Instant};

use file_svc::domain::ImageKind;
use file_svc::imaging::{ImageLimits, process};
use image::{DynamicImage, ImageFormat, Rgb, RgbImage};

const LIMITS: ImageLimits = ImageLimits {
    max_pixels: 40_000_000,
    thumbnail_size: 256,
};

/// Smooth gradients with some grain, like a photo: compresses as photos do.
fn photo(width: u32, height: u32, format: ImageFormat) -> Vec<u8> {
    let mut seed = 0x9e37_79b9_u32;
    let image = RgbImage::from_fn(width, height, |x, y| {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let grain = (seed % 16) as u8;
        Rgb([
            ((x * 255 / width) as u8).saturating_add(grain),
            ((y * 255 / height) as u8).saturating_add(grain),
            (((x + y) * 127 / (width + height)) as u8).saturating_add(grain),
        ])
    });
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(image)
        .write_to(&mut out, format)
        .expect("encode");
    out.into_inner()
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn bomb(side: u32) -> Vec<u8> {
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
        chunk.extend_from_slice(&body);
        chunk.extend_from_slice(&crc32(&body).to_be_bytes());
        chunk
    };
    let mut ihdr = side.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&side.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(chunk(b"IHDR", &ihdr));
    png.extend(chunk(
        b"IDAT",
        &[120, 156, 99, 96, 96, 96, 0, 0, 0, 4, 0, 1],
    ));
    png.extend(chunk(b"IEND", &[]));
    png
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn main() {
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    println!(
        "{:<34} {:>10} {:>12} {:>10} {:>14}",
        "image", "file KiB", "median ms", "thumb KiB", "as PNG KiB"
    );
    let cases = [
        (
            "PNG 1000x1000",
            1000,
            1000,
            ImageFormat::Png,
            ImageKind::Png,
        ),
        (
            "JPEG 1000x1000",
            1000,
            1000,
            ImageFormat::Jpeg,
            ImageKind::Jpeg,
        ),
        (
            "JPEG 4000x3000 (12 MP)",
            4000,
            3000,
            ImageFormat::Jpeg,
            ImageKind::Jpeg,
        ),
        (
            "PNG 4000x3000 (12 MP)",
            4000,
            3000,
            ImageFormat::Png,
            ImageKind::Png,
        ),
        (
            "JPEG 6000x6000 (36 MP)",
            6000,
            6000,
            ImageFormat::Jpeg,
            ImageKind::Jpeg,
        ),
    ];
    for (name, width, height, format, kind) in cases {
        let bytes = photo(width, height, format);
        let mut thumb = 0;
        let times = (0..rounds)
            .map(|_| {
                let started = Instant::now();
                let done = process(&bytes, kind, LIMITS).expect("accepted");
                thumb = done.thumbnail.len();
                started.elapsed()
            })
            .collect();
        let mut as_png = Cursor::new(Vec::new());
        image::load_from_memory(&bytes)
            .expect("decode")
            .thumbnail(LIMITS.thumbnail_size, LIMITS.thumbnail_size)
            .write_to(&mut as_png, ImageFormat::Png)
            .expect("encode");
        println!(
            "{name:<34} {:>10} {:>12.1} {:>10.1} {:>14.1}",
            bytes.len() / 1024,
            median(times).as_secs_f64() * 1000.0,
            thumb as f64 / 1024.0,
            as_png.get_ref().len() as f64 / 1024.0
        );
    }
    for side in [50_000, 1_000_000] {
        let bytes = bomb(side);
        let times = (0..rounds * 100)
            .map(|_| {
                let started = Instant::now();
                assert!(process(&bytes, ImageKind::Png, LIMITS).is_err());
                started.elapsed()
            })
            .collect();
        println!(
            "{:<34} {:>10} {:>12.3} {:>10} {:>14}",
            format!("bomb PNG {side}x{side} (refused)"),
            bytes.len() / 1024,
            median(times).as_secs_f64() * 1000.0,
            "-",
            "-"
        );
    }
}
