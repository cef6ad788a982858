//! Builds images in memory (or streamed, for big layers) and pushes them straight to a
//! registry over HTTP, so tests know every digest in advance.

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::http::{self, Body};

pub fn digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// An uncompressed tar holding `files`.
pub fn tar_layer(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        builder.append_data(&mut header, name, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

pub struct Image {
    pub config: Vec<u8>,
    pub layers: Vec<Vec<u8>>,
    pub manifest: Vec<u8>,
    pub digest: String,
    pub layer_digest: String,
}

/// A one-layer linux image for `arch` whose layer holds `files`.
pub fn image(files: &[(&str, &[u8])], arch: &str) -> Image {
    let layer = tar_layer(files);
    image_from_layer_digest(&digest(&layer), layer.len() as u64, arch, vec![layer])
}

fn image_from_layer_digest(
    layer_digest: &str,
    layer_size: u64,
    arch: &str,
    layers: Vec<Vec<u8>>,
) -> Image {
    let config = serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "config": { "Cmd": ["/hello"] },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": { "mediaType": OCI_CONFIG, "digest": digest(&config), "size": config.len() },
        "layers": [{ "mediaType": OCI_LAYER_TAR, "digest": layer_digest, "size": layer_size }],
    }))
    .unwrap();
    Image {
        digest: digest(&manifest),
        layer_digest: layer_digest.to_string(),
        config,
        layers,
        manifest,
    }
}

/// Monolithic upload: POST then PUT with the whole body.
pub fn push_blob(base: &str, repo: &str, data: &[u8]) -> String {
    let d = digest(data);
    push_blob_body(
        base,
        repo,
        &d,
        data.len() as u64,
        http::full(Bytes::copy_from_slice(data)),
    );
    d
}

pub fn push_blob_body(base: &str, repo: &str, digest: &str, len: u64, body: Body) {
    let start = http::request(
        "POST",
        &format!("{base}/v2/{repo}/blobs/uploads/"),
        &[],
        Bytes::new(),
    );
    assert_eq!(start.status, 202, "start upload: {}", start.text());
    let location = start.header("location").unwrap();
    let url = if location.starts_with('/') {
        format!("{base}{location}")
    } else {
        location
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    let len = len.to_string();
    let put = http::request_body(
        "PUT",
        &format!("{url}{sep}digest={digest}"),
        &[
            ("content-type", "application/octet-stream"),
            ("content-length", &len),
        ],
        body,
    );
    assert_eq!(put.status, 201, "finish upload: {}", put.text());
}

pub fn push_manifest(base: &str, repo: &str, reference: &str, media_type: &str, body: &[u8]) {
    let r = http::request(
        "PUT",
        &format!("{base}/v2/{repo}/manifests/{reference}"),
        &[("content-type", media_type)],
        Bytes::copy_from_slice(body),
    );
    assert_eq!(r.status, 201, "put manifest: {}", r.text());
}

/// Pushes an image's blobs and manifest under `repo:tag`.
pub fn push_image(base: &str, repo: &str, tag: &str, img: &Image) {
    push_blob(base, repo, &img.config);
    for l in &img.layers {
        push_blob(base, repo, l);
    }
    push_manifest(base, repo, tag, OCI_MANIFEST, &img.manifest);
}

/// Pushes a multi-arch index over `images` (each `(image, arch)`); returns its digest.
pub fn push_index(base: &str, repo: &str, tag: &str, images: &[(&Image, &str)]) -> String {
    let mut manifests = Vec::new();
    for (img, arch) in images {
        push_image(base, repo, &img.digest, img);
        manifests.push(json!({
            "mediaType": OCI_MANIFEST,
            "digest": img.digest,
            "size": img.manifest.len(),
            "platform": { "architecture": arch, "os": "linux" },
        }));
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    }))
    .unwrap();
    push_manifest(base, repo, tag, OCI_INDEX, &index);
    digest(&index)
}

/// A deterministic pseudo-random tar layer of about `size` bytes, produced on the fly.
pub struct BigLayer {
    pub size: u64,
    pub digest: String,
    data_len: u64,
    seed: u64,
}

impl BigLayer {
    pub fn new(data_len: u64, seed: u64) -> BigLayer {
        let mut layer = BigLayer {
            size: 0,
            digest: String::new(),
            data_len,
            seed,
        };
        let mut h = Sha256::new();
        let mut size = 0u64;
        for chunk in layer.chunks() {
            size += chunk.len() as u64;
            h.update(&chunk);
        }
        layer.size = size;
        layer.digest = format!("sha256:{}", hex::encode(h.finalize()));
        layer
    }

    /// The tar stream: header, data, padding, two zero blocks.
    fn chunks(&self) -> impl Iterator<Item = Bytes> + Send + 'static {
        let mut header = tar::Header::new_gnu();
        header.set_path("big.bin").unwrap();
        header.set_size(self.data_len);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        let head = Bytes::copy_from_slice(header.as_bytes());
        let pad = (512 - (self.data_len % 512)) % 512;
        let tail = Bytes::from(vec![0u8; pad as usize + 1024]);
        let mut state = self.seed | 1;
        let mut left = self.data_len;
        let data = std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            let n = left.min(1 << 20) as usize;
            let mut buf = Vec::with_capacity(n + 8);
            while buf.len() < n {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                buf.extend_from_slice(&state.to_le_bytes());
            }
            buf.truncate(n);
            left -= n as u64;
            Some(Bytes::from(buf))
        });
        std::iter::once(head)
            .chain(data)
            .chain(std::iter::once(tail))
    }

    pub fn body(&self) -> Body {
        let frames = self
            .chunks()
            .map(|c| Ok::<_, http::BoxError>(Frame::data(c)));
        StreamBody::new(stream::iter(frames)).boxed()
    }

    /// Pushes this layer and a one-layer image around it under `repo:tag`.
    pub fn push_image(&self, base: &str, repo: &str, tag: &str) -> Image {
        push_blob_body(base, repo, &self.digest, self.size, self.body());
        let img = image_from_layer_digest(&self.digest, self.size, "amd64", Vec::new());
        push_blob(base, repo, &img.config);
        push_manifest(base, repo, tag, OCI_MANIFEST, &img.manifest);
        img
    }
}
